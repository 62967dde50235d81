"""olmo-jax: OLMo2 / Llama-family models in JAX, for pruning and recovery studies."""
from olmo_jax.api import from_pretrained, load_config, load_tokenizer, save_checkpoint, save_pretrained
from olmo_jax.config import ModelConfig, OlmoJaxError
from olmo_jax.gguf_export import save_gguf
from olmo_jax.model import Transformer

__all__ = ["from_pretrained", "save_pretrained", "save_checkpoint", "save_gguf", "load_config",
           "load_tokenizer", "ModelConfig", "OlmoJaxError", "Transformer"]
