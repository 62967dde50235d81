#!/usr/bin/env bash
# Ahead-of-time compile every OLMo2 preset for its hardware (docs/ACCELERATORS.md is made from this):
#   bash scripts/aot_presets.sh [OUT_DIR]     (default docs/results/aot; needs libtpu: bash scripts/setup.sh)
# Also compiles 7b, 13b and 32b for one H200 to record why those presets do not exist.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/results/aot}
mkdir -p "$out"
run() {  # config, topology
  local name="${1//[:,\/]/_}_$2"
  echo "== $1 on $2"
  /usr/bin/time -f "%e s, %M KB peak RSS" python -m train.aot --config="$1" --topology="$2" --out="$out/$name.json" \
    > "$out/$name.txt" 2>&1
  echo "exit $? ($(tail -n 1 "$out/$name.txt"))"
}
for size in 1b 7b 13b 32b; do
  for hw in v5p-64 v6e-256 v5p-512; do run "configs/olmo2.py:$size,$hw" "$hw"; done
done
run "configs/olmo2.py:1b,h200" h200
for size in 7b 13b 32b; do run "configs/olmo2.py:$size" h200; done
