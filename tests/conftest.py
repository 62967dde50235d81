import os

# 8 virtual CPU devices for the sharding tests; must be set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Silent broadcasting bugs (e.g. [B,T] vs [T]) become errors in tests.
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_collection_modifyitems(config, items):
    """`compile` tests run only when the -m expression names them (e.g. `-m compile`)."""
    if "compile" in (config.option.markexpr or ""):
        return
    import pytest
    skip = pytest.mark.skip(reason="torch.compile is slow: select it with -m compile")
    for item in items:
        if "compile" in item.keywords:
            item.add_marker(skip)
