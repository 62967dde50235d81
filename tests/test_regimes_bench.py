"""train.bench.regimes: the retention it plots is what a compacted model keeps; the plot is drawn from
a result on disk; bad input is one error line."""
import json
import subprocess
import sys

import jax
import pytest

import olmo_jax
import prune
from olmo_jax.config import OlmoJaxError
from train.bench import regimes


def test_retention_is_what_the_compacted_model_keeps():
    dense = olmo_jax.from_pretrained("smollm2")
    count = lambda m: sum(x.size for x in jax.tree.leaves(m.param_dict()))
    small = prune.prune(dense, 0.5, "l2")
    assert regimes.retention("l2", 0.5) == pytest.approx(count(small) / count(dense), abs=1e-9)
    assert regimes.retention("dense", None) == 1.0


def _result(heldout, loss):
    return {"heldout_acc": heldout, "lambada_loss": loss, "suite_macro": heldout + 0.1}


def test_plot_is_redrawn_from_a_result_on_disk(tmp_path):
    res = {"dense": _result(0.28, 3.9), "l2:0.1": _result(0.22, 9.5), "l2:0.3": _result(0.21, 12.9),
           "activation:0.5": _result(0.26, 5.3)}
    (tmp_path / "r.json").write_text(json.dumps(res))
    r = subprocess.run([sys.executable, "-m", "train.bench.regimes", f"--out={tmp_path / 'r.json'}",
                        f"--plot={tmp_path / 'r.png'}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]  # no temporary file left


@pytest.mark.parametrize("args, message", [
    (["--regimes=l2:x"], "error: --regimes: 'l2:x' is not dense or CRITERION:RATIO"),
    (["--plot=p.png", "--out=/nonexistent/r.json"], "error: --out=/nonexistent/r.json: no such file to plot"),
])
def test_bad_input_is_one_error_line(args, message):
    r = subprocess.run([sys.executable, "-m", "train.bench.regimes", *args], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == message, r.stderr


def test_parse_refuses_an_unknown_criterion():
    with pytest.raises(OlmoJaxError):
        regimes.parse("nope:0.3")
    assert regimes.parse("dense, l2:0.1") == [("dense", None), ("l2", 0.1)]
