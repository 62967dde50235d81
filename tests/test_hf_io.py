"""Checkpoint IO: HF round trip, sharded safetensors, Orbax, and clear errors on bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import olmo_jax
from olmo_jax.config import OlmoJaxError
from tests.hf_helpers import tiny_hf_config, torch_model


@pytest.fixture(scope="module", params=["olmo2", "llama"])
def hf_dir(request, tmp_path_factory):
    d = str(tmp_path_factory.mktemp(request.param))
    tm = torch_model(tiny_hf_config(request.param, kv_heads=2, tied=request.param == "llama"))
    tm.save_pretrained(d)
    return d, tm


def _logits(tm, ids):
    with torch.no_grad():
        return tm(torch.tensor(ids)).logits.numpy()


IDS = np.random.RandomState(0).randint(0, 128, (2, 10))


@pytest.mark.parametrize("shard_bytes", [2**31, 20_000])
def test_hf_round_trip(hf_dir, tmp_path, shard_bytes):
    src, tm = hf_dir
    model = olmo_jax.from_pretrained(src)
    out = str(tmp_path / "out")
    olmo_jax.save_pretrained(model, out, max_shard_bytes=shard_bytes)
    if shard_bytes < 2**31:
        assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(_logits(back, IDS) - _logits(tm, IDS)).max() <= 1e-6
    # and ours reads the (possibly sharded) export back to identical logits
    again = olmo_jax.from_pretrained(out)
    np.testing.assert_array_equal(np.asarray(again(IDS)), np.asarray(model(IDS)))


def test_orbax_checkpoint_round_trip(hf_dir, tmp_path):
    src, _ = hf_dir
    model = olmo_jax.from_pretrained(src)
    ck = str(tmp_path / "ck")
    olmo_jax.save_checkpoint(model, ck)
    restored = olmo_jax.from_pretrained(ck)
    assert restored.config == model.config
    np.testing.assert_array_equal(np.asarray(restored(IDS)), np.asarray(model(IDS)))
    with pytest.raises(OlmoJaxError, match="already exists"):
        olmo_jax.save_checkpoint(model, ck)  # never clobbers a finished checkpoint


def test_failed_restore_drops_only_tensorstores_late_callbacks(monkeypatch):
    """After a failed restore, TensorStore reports reads that finished after Orbax closed its loop
    as unraisable RuntimeErrors from `call_soon_threadsafe`; exactly those are dropped."""
    import asyncio
    import types

    from olmo_jax import checkpoint
    passed = []
    monkeypatch.setattr(sys, "unraisablehook", passed.append)
    checkpoint.drop_late_read_callbacks()
    checkpoint.drop_late_read_callbacks()  # installed once: a second call does not wrap it again

    def report(raise_it, obj=None):
        try:
            raise_it()
        except Exception as e:
            unraisable = types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__,
                                               err_msg=None, object=obj)
        sys.unraisablehook(unraisable)
        return unraisable

    closed = asyncio.new_event_loop()
    closed.close()
    late = report(lambda: closed.call_soon_threadsafe(print))  # TensorStore's late callback: dropped
    others = [report(lambda: closed.call_soon(print)),  # the same error from elsewhere
              report(lambda: closed.call_soon_threadsafe(print), obj="a coroutine"),  # reported on an object
              report(lambda: int("Event loop is closed"))]  # another type
    assert str(late.exc_value) == "Event loop is closed" and passed == others


def test_console_drops_only_asyncios_reports_of_abandoned_tensorstore_operations():
    """When training falls back from a damaged step, asyncio reports the reads Orbax abandoned as
    'Task exception was never retrieved'; the console filter drops those and nothing else."""
    import logging

    from olmo_jax.cli import _AbandonedTensorStoreOperations

    def record(name, msg, exc=None):
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None,
                                 (type(exc), exc, None) if exc else None)

    tensorstore = ValueError('OUT_OF_RANGE: Error reading "step/.zarray" [tensorstore_spec=\'{"driver": "zarr"}\']')
    keep = _AbandonedTensorStoreOperations().filter
    assert not keep(record("asyncio", "Task exception was never retrieved\nfuture: <Task ...>", tensorstore))
    assert not keep(record("asyncio", "Future exception was never retrieved\nfuture: <Future ...>", tensorstore))
    assert keep(record("asyncio", "Task exception was never retrieved", ValueError("another failure")))
    assert keep(record("asyncio", "Task was destroyed but it is pending!", tensorstore))
    assert keep(record("train.loop", "exception was never retrieved", tensorstore))


def test_bf16_params_load_and_export(hf_dir, tmp_path):
    src, _ = hf_dir
    model = olmo_jax.from_pretrained(src, dtype="bfloat16")
    assert model.param_dict()["embed"].dtype == np.dtype("bfloat16") or str(model.param_dict()["embed"].dtype) == "bfloat16"
    olmo_jax.save_pretrained(model, str(tmp_path / "bf"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf"))
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16


def test_errors(tmp_path, hf_dir):
    with pytest.raises(OlmoJaxError, match="no such file"):
        olmo_jax.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(OlmoJaxError, match="neither config.json"):
        olmo_jax.from_pretrained(str(tmp_path / "empty"))
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text(json.dumps(tiny_hf_config()))
    with pytest.raises(OlmoJaxError, match="no weights"):
        olmo_jax.from_pretrained(str(noweights))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(OlmoJaxError, match="unsupported architecture: model_type='gpt2'"):
        olmo_jax.from_pretrained(str(gpt2))
    # a weight with the wrong shape: claim a bigger MLP than the file holds
    src, _ = hf_dir
    bad = tmp_path / "badshape"
    bad.mkdir()
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["intermediate_size"] = 100
    (bad / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(src, "model.safetensors"), bad / "model.safetensors")
    with pytest.raises(OlmoJaxError, match=r"mlp.gate_proj.weight has shape \(96, 64\), expected \(100, 64\)"):
        olmo_jax.from_pretrained(str(bad))


def test_cli_one_line_errors(tmp_path):
    for mod in ("olmo_jax.convert", "olmo_jax.export"):
        r = subprocess.run([sys.executable, "-m", mod, f"--src={tmp_path}/nope", f"--out={tmp_path}/o"],
                           capture_output=True, text=True)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines() == [f"error: no such file or directory: {tmp_path}/nope"]


def test_cli_convert_then_export(hf_dir, tmp_path):
    src, tm = hf_dir
    ck, out = str(tmp_path / "ck"), str(tmp_path / "hf")
    for mod, a, b in (("olmo_jax.convert", src, ck), ("olmo_jax.export", ck, out)):
        r = subprocess.run([sys.executable, "-m", mod, f"--src={a}", f"--out={b}"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(_logits(back, IDS) - _logits(tm, IDS)).max() <= 1e-6
