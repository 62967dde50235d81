import os

# 8 virtual CPU devices for the sharding tests; must be set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Silent broadcasting bugs (e.g. [B,T] vs [T]) become errors in tests.
jax.config.update("jax_numpy_rank_promotion", "raise")
