import os
import tempfile

# 8 virtual CPU devices for the sharding tests; must be set before JAX initialises its backend.
# Compile time dominates the suite on a 2-core CI machine (tiny models, many shapes): XLA's cheap CPU
# backend settings compile the same HLO without LLVM's expensive passes (tests/test_step.py 146 s ->
# 83 s, both beside the same background job; the real-model tests, dominated by loading and torch,
# unchanged). Results are the same programs' within float rounding; speed is measured by the
# benchmarks, never here.
CHEAP_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {CHEAP_XLA}")
# One persistent compilation cache for the whole test run, shared by the xdist workers and every
# subprocess they launch (they inherit the controller's environment): many files and launched
# pipelines compile the same programs for the same tiny models. A fresh directory per run (removed
# at the end), so no run reads another's entries; a user's JAX_COMPILATION_CACHE_DIR is respected.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="olmo_jax_tests_jit_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # cheap-XLA compiles are short
# Likewise one GGUF conversion cache (olmo_jax/gguf_cache.py) per run: the packaged model is
# dequantised once per run, not once per test file that loads it.
_OWN_GGUF_CACHE = "OLMO_JAX_CACHE" not in os.environ
if _OWN_GGUF_CACHE:
    os.environ["OLMO_JAX_CACHE"] = tempfile.mkdtemp(prefix="olmo_jax_tests_gguf_")
# xdist runs one worker per core: a worker's PyTorch (the reference models) with its default one
# thread per core spins against the other workers. One thread each: test_eval_parity's transformers
# loop 88 s -> 23 s beside a busy core (measured 2026-12-03). Users' and benchmarks' settings stand.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Silent broadcasting bugs (e.g. [B,T] vs [T]) become errors in tests.
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_sessionfinish(session, exitstatus):
    if "PYTEST_XDIST_WORKER" in os.environ:
        # Once a worker reports that it finished, execnet gives it 5 s to exit and then sends it
        # SIGINT; pytest's exit runs gc.collect() five times, each calling JAX's gc callback, and a
        # worker that held real models and hundreds of programs took longer: the SIGINT landed in
        # that callback and printed a KeyboardInterrupt traceback after every full run. Collect
        # here, before the report, and freeze what survives, so those collections are instant.
        import gc
        gc.collect()
        gc.freeze()
        return
    import shutil
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    if _OWN_GGUF_CACHE:
        shutil.rmtree(os.environ["OLMO_JAX_CACHE"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """`compile` tests run only when the -m expression names them (e.g. `-m compile`)."""
    if "compile" in (config.option.markexpr or ""):
        return
    import pytest
    skip = pytest.mark.skip(reason="torch.compile is slow: select it with -m compile")
    for item in items:
        if "compile" in item.keywords:
            item.add_marker(skip)
