"""Llama 3.x RoPE scaling in the config: both HF spellings, round trips (HF config, save_pretrained,
our checkpoint JSON), and one-line errors for RoPE types we do not implement."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers

import olmo_jax
from olmo_jax import checkpoint
from olmo_jax.config import ModelConfig, OlmoJaxError
from tests.hf_helpers import tiny_hf_config, torch_model
from tests.test_model_parity import LLAMA3_ROPE, llama3_hf_config

SCALING = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}


def test_llama3_from_either_spelling():
    new = ModelConfig.from_hf(llama3_hf_config())  # transformers 5: rope_parameters
    old = ModelConfig.from_hf(tiny_hf_config("llama", kv_heads=2, tied=True, rope_scaling=SCALING))
    assert new == old
    assert (new.rope_type, new.rope_theta, new.rope_factor, new.rope_low_freq_factor, new.rope_high_freq_factor,
            new.rope_original_max_position_embeddings) == ("llama3", 10000.0, 8.0, 1.0, 4.0, 32)


def test_llama3_config_round_trips_through_hf_config_and_checkpoint_json():
    cfg = ModelConfig.from_hf(llama3_hf_config())
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    hf = transformers.AutoConfig.for_model(**cfg.to_hf())
    assert {k: hf.rope_parameters[k] for k in LLAMA3_ROPE} == LLAMA3_ROPE
    stored = json.loads(json.dumps(dataclasses.asdict(cfg)))  # what checkpoint.save writes
    assert ModelConfig(**stored) == cfg and hash(ModelConfig(**stored)) == hash(cfg)


def test_checkpoint_json_from_before_rope_scaling_still_reads():
    cfg = ModelConfig.from_hf(tiny_hf_config("olmo2"))
    stored = {k: v for k, v in dataclasses.asdict(cfg).items() if not k.startswith("rope_") or k == "rope_theta"}
    assert ModelConfig(**stored) == cfg and cfg.rope_type == "default"


def test_llama3_model_round_trips_through_save_pretrained_and_checkpoint(tmp_path):
    tm = torch_model(llama3_hf_config())
    tm.save_pretrained(str(tmp_path / "src"))
    model = olmo_jax.from_pretrained(str(tmp_path / "src"))
    ids = np.random.RandomState(0).randint(0, 128, (2, 80))
    olmo_jax.save_pretrained(model, str(tmp_path / "hf"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert back.config.rope_parameters["rope_type"] == "llama3"
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(ids)).logits.numpy(), tm(torch.tensor(ids)).logits.numpy(),
                                   rtol=0, atol=1e-6)
    olmo_jax.save_checkpoint(model, str(tmp_path / "ck"))
    assert checkpoint.read_config(str(tmp_path / "ck"))[0] == model.config
    np.testing.assert_array_equal(np.asarray(olmo_jax.from_pretrained(str(tmp_path / "ck"))(ids)),
                                  np.asarray(model(ids)))


@pytest.mark.parametrize("rope,message", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "unsupported RoPE type 'yarn'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "unsupported RoPE type 'linear'"),
    (dict(rope_parameters={k: v for k, v in LLAMA3_ROPE.items() if k != "low_freq_factor"}),
     "llama3 RoPE scaling lacks low_freq_factor"),
    (dict(rope_parameters=LLAMA3_ROPE | {"low_freq_factor": 4.0}), "0 < low_freq_factor < high_freq_factor"),
])
def test_unsupported_or_incomplete_rope_is_one_line(tmp_path, rope, message):
    hf = tiny_hf_config("llama") | rope
    with pytest.raises(OlmoJaxError, match=message) as err:
        ModelConfig.from_hf(hf)
    assert "\n" not in str(err.value)
    with open(tmp_path / "config.json", "w") as f:  # and through the loader, before any weights are read
        json.dump(hf, f)
    with pytest.raises(OlmoJaxError, match=message):
        olmo_jax.from_pretrained(str(tmp_path))


def test_config_refuses_scaling_parameters_that_do_not_fit_the_type():
    base = dataclasses.asdict(ModelConfig.from_hf(tiny_hf_config("llama")))
    with pytest.raises(OlmoJaxError, match="rope_type 'llama3' needs factor, low_freq_factor"):
        ModelConfig(**base | {"rope_type": "llama3"})
    with pytest.raises(OlmoJaxError, match="rope_type 'default' takes no scaling parameters"):
        ModelConfig(**base | {"rope_factor": 8.0})
