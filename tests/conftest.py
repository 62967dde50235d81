import os

# 8 virtual CPU devices for the sharding tests; must be set before JAX initialises its backend.
# Compile time dominates the suite on a 2-core CI machine (tiny models, many shapes): XLA's cheap CPU
# backend settings compile the same HLO without LLVM's expensive passes (tests/test_step.py 146 s ->
# 83 s, both beside the same background job; the real-model tests, dominated by loading and torch,
# unchanged). Results are the same programs' within float rounding; speed is measured by the
# benchmarks, never here.
CHEAP_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {CHEAP_XLA}")
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
