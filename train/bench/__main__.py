"""python -m train.bench --config=configs/bench.py[:cpu|tiny|gpu] [--out=bench.json]

Applies the config's XLA flags and CPU affinity before JAX and torch start, runs the harness
(train/bench/harness.py), prints a summary and writes the JSON.
"""
import os

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/bench.py", "bench config (configs/bench.py[:variant])",
                                lock_config=True)
flags.DEFINE_string("out", "", "write the results JSON here")


def _prepare_process(config) -> None:
    """Settings that only take effect before JAX / torch initialise."""
    import jax
    if config.xla_flags:
        if jax._src.xla_bridge.backends_are_initialized():  # noqa: SLF001 - a guard, not an API use
            raise RuntimeError("JAX started before the bench could apply xla_flags")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + config.xla_flags).strip()
    if config.cpu_affinity:  # before JAX and torch size their thread pools
        cores = {int(x) for x in str(config.cpu_affinity).split(",")}
        os.sched_setaffinity(0, cores)
        import torch
        torch.set_num_threads(len(cores))
    # JAX and torch share the GPU: JAX must not grab 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def main(argv):
    del argv
    from olmo_jax.cli import user_errors
    from olmo_jax.fsutil import atomic_write_json
    from train.bench.harness import run_bench
    from train.bench.summary import summary_text
    config = flags.FLAGS.config
    _prepare_process(config)
    with user_errors():
        res = run_bench(config, quiet=False)
    print(summary_text(res), flush=True)
    if flags.FLAGS.out:
        atomic_write_json(flags.FLAGS.out, res)
        print(f"wrote {flags.FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
