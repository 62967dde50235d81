"""A study's config is checked before its first stage runs: the model source, the batch against every
preset's mesh, every training row against the buckets; a broken config.json is one error line."""
import json
import os
import subprocess
import sys

import pytest

from configs import olmo2
from olmo_jax.config import ModelConfig, OlmoJaxError
from olmo_jax.sharding import mesh_sizes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("size", sorted(olmo2.MODELS))
@pytest.mark.parametrize("hw", sorted(olmo2.HARDWARE))
def test_every_preset_batch_divides_its_mesh(size, hw):
    spec = olmo2.HARDWARE[hw]
    if size not in spec["sizes"]:
        with pytest.raises(ValueError, match=f"does not fit {hw}"):
            olmo2.get_config(f"{size},{hw}")
        return
    c = olmo2.get_config(f"{size},{hw}")
    data, fsdp, tensor = mesh_sizes(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, spec["chips"])
    micro = c.data.batch_size // c.train.grad_accum
    assert c.data.batch_size % c.train.grad_accum == 0 and micro % (data * fsdp) == 0, (micro, data, fsdp)
    cfg = ModelConfig.from_hf(c.model.hf_config.to_dict())
    assert cfg.num_heads % tensor == 0 and cfg.num_kv_heads % tensor == 0
    assert c.model.teacher_dtype in ("", "bfloat16") and c.model.compute_dtype == "bfloat16"


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=600)


def test_a_missing_model_is_refused_before_any_stage(tmp_path):
    workdir = tmp_path / "w"
    r = _run("-m", "train.pipeline", "--config=configs/olmo2.py:7b", f"--workdir={workdir}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: no such file or directory: allenai/OLMo-2-1124-7B-SFT"
    assert "[stage]" not in r.stdout and not workdir.exists()


def test_config_json_without_heads_is_one_error_line(tmp_path):
    hf = dict(olmo2.HF_CONFIGS["1b"])
    del hf["num_attention_heads"]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(OlmoJaxError, match="config.json lacks num_attention_heads"):
        ModelConfig.from_hf(str(tmp_path / "m"))
    r = _run("-m", "olmo_jax.convert", f"--src={tmp_path / 'm'}", f"--out={tmp_path / 'out'}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: config.json lacks num_attention_heads (model_type='olmo2')"


def test_rows_longer_than_the_buckets_are_refused_before_any_stage(tmp_path):
    from tests.hf_helpers import tiny_model_dir
    src = tiny_model_dir(tmp_path / "model")
    workdir = tmp_path / "w"
    r = _run("-m", "train.pipeline", "--config=configs/tiny.py", f"--config.model.src={src}",
             "--config.data.seq_buckets=(32,)", f"--workdir={workdir}")
    assert r.returncode == 2, r.stderr[-1000:]
    assert "exceeds the largest bucket 32" in r.stderr.strip().splitlines()[-1]
    assert "[stage]" not in r.stdout and not workdir.exists()
