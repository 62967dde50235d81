"""`python -m train.aot`: the real XLA:TPU compiler on abstract chips (libtpu, no TPU) proves a study's
programs fit before anyone rents a slice. CI installs libtpu (scripts/setup.sh puts it in .tpu/)."""
import json
import os
import subprocess
import sys

import pytest

from olmo_jax.config import OlmoJaxError
from train.aot import hardware

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(hardware.find_libtpu() is None,
                                  reason='libtpu is not installed (bash scripts/setup.sh, or pip install -e ".[tpu]")')


def _aot(*args, timeout=1200):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one host device is enough: the chips are abstract
    return subprocess.run([sys.executable, "-m", "train.aot", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)


# OLMo2's architecture at narrow widths (head_dim stays 128, which the splash kernel tiles): XLA:TPU's
# compile time follows the programs' structure far more than their widths, so this is what CI can
# afford. 1b's own widths (--layers=2) compiled in 164-175 s on the 2-core VM, these in 61 s
# (2026-12-07); the presets' real-size reports are docs/results/aot/ (docs/ACCELERATORS.md).
NARROW_OLMO2 = {"hidden_size": 512, "intermediate_size": 1024, "vocab_size": 8192, "num_attention_heads": 4,
                "num_key_value_heads": 4}


@pytest.mark.slow
@needs_libtpu
def test_olmo2_programs_fit_a_v5p_8_and_the_report_says_so(tmp_path):
    out = tmp_path / "aot.json"
    narrow = [f"--config.model.hf_config.{k}={v}" for k, v in NARROW_OLMO2.items()]
    r = _aot("--config=configs/olmo2.py:1b", "--topology=v5p-8", "--layers=2", *narrow, f"--out={out}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert (rep["topology"], rep["compiled_for"], rep["chips"], rep["devices"]) == ("v5p-8", "v5p:2x2x1", 4, 4)
    assert rep["hbm_bytes_per_chip"] == hardware.CHIPS["v5p"].hbm_bytes
    assert (rep["model"]["arch"], rep["model"]["layers"], rep["model"]["hidden"]) == ("olmo2", 2, 512)
    progs = {p["name"]: p for p in rep["programs"]}
    assert set(progs) == {"ce_step", "kl_step", "eval_layers", "eval_head", "activation_scores", "compaction"}
    for p in progs.values():
        b = p["per_device_bytes"]
        assert p["compiled"] and p["fits"] and 0 < b["total"] < rep["hbm_bytes_per_chip"] and p["compile_s"] > 0
        assert b["total"] == b["arguments"] + b["outputs"] - b["aliased"] + b["temporaries"] + b["code"] + b["resident"]
    # evaluation runs on a bfloat16 copy of the float32 weights: the program takes the copy (all of it,
    # the head's program too), the masters stay resident beside it, twice the copy's bytes
    evals = [progs["eval_layers"]["per_device_bytes"], progs["eval_head"]["per_device_bytes"]]
    assert evals[0]["resident"] == evals[1]["resident"] > 0
    assert all(e["arguments"] > e["resident"] / 2 for e in evals)
    assert all(p["per_device_bytes"]["resident"] == 0 for n, p in progs.items() if not n.startswith("eval_"))
    # the CE step's plain rows take the splash kernel on TPU; the KL step's branch-packed rows do not
    assert progs["ce_step"]["attention"] == "splash" and progs["kl_step"]["attention"] == "xla"
    # sharded FSDP over 4 chips: the KL step's arguments (student state + teacher) are ~1/4 of the whole
    assert progs["kl_step"]["flops"] > progs["ce_step"]["flops"] > 0
    assert progs["kl_step"]["flops"] == pytest.approx(progs["kl_step"]["model_flops"] / 4)
    assert progs["kl_step"]["step_time_lower_bound_s"] == pytest.approx(
        progs["kl_step"]["flops"] / hardware.CHIPS["v5p"].peak_flops)
    # the compiler counts the layer scan's body once: its figure is far below the formula's
    assert 0 < progs["kl_step"]["compiler_flops_loop_bodies_once"] < progs["kl_step"]["flops"]
    assert "| kl_step | xla |" in r.stdout


@needs_libtpu
def test_chip_memory_table_is_what_the_compiler_reports():
    code = ("from train.aot import hardware as h; h.prepare_tpu_compiler(); "
            "print([h.compiler_hbm_bytes(h.parse(n)) for n in ('v5p-8', 'v6e-4')])")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == [hardware.CHIPS["v5p"].hbm_bytes, hardware.CHIPS["v6e"].hbm_bytes]


@pytest.mark.parametrize("name, hw", [("v5p-64", ("v5p:4x4x2", 32)), ("v6e-256", ("v6e:16x16", 256)),
                                      ("v5p-512", ("v5p:8x8x4", 256)), ("h200", (None, 1))])
def test_hardware_names(name, hw):
    h = hardware.parse(name)
    assert (h.topology, h.chips) == hw


def test_bad_topology_is_one_error_line():
    r = _aot("--config=configs/olmo2.py:1b", "--topology=v5p-63", timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown v5p slice 'v5p-63'; sizes: v5p-8,")
    with pytest.raises(OlmoJaxError, match="unknown hardware 'a100'"):
        hardware.parse("a100")


def test_unknown_program_is_one_error_line():
    r = _aot("--config=configs/olmo2.py:1b,h200", "--programs=eval_layers,eval", timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "error: unknown program eval; choose from ce_step, kl_step, eval_layers, eval_head, activation_scores, compaction")


def test_missing_libtpu_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(hardware.TPU_LIBRARY_ENV, str(tmp_path / "nothing.so"))
    monkeypatch.setattr(hardware, "PRIVATE_LIBTPU", str(tmp_path / "nothing.so"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(OlmoJaxError, match=r'pip install -e "\.\[tpu\]"'):
        hardware.prepare_tpu_compiler()
