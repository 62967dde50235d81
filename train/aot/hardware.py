"""Accelerator presets: which chips a hardware name means, what one chip holds and computes, and the
abstract devices the XLA:TPU compiler builds for (no TPU needed).

Names follow Cloud TPU: `v5p-N` counts TensorCores (2 per chip, so v5p-64 is 32 chips), `v6e-N` and
`v5e-N` count chips. `h200` is one NVIDIA H200.

HBM per chip is what the XLA:TPU compiler (libtpu 0.0.42.1) reports as available: an oversized
program fails with "exceeds available HBM (95.74G)" on v5p, 31.25G on v6e, 15.75G on v5e
(G = GiB). `tests/test_aot.py` re-measures them, so a libtpu that changes them fails a test.
Peak FLOP/s are the datasheet bf16 dense peaks per chip (Cloud TPU system architecture pages;
NVIDIA H200 SXM datasheet).
"""
from __future__ import annotations

import dataclasses
import os
import re

from olmo_jax.config import OlmoJaxError

GIB = 1024 ** 3
TPU_LIBRARY_ENV = "TPU_LIBRARY_PATH"
# where scripts/setup.sh installs libtpu: beside the repo, not on sys.path, so a CPU-only run never
# loads it (loaded, it probes for TPUs and prints warnings at every JAX start-up)
PRIVATE_LIBTPU = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              ".tpu", "libtpu", "libtpu.so")


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str
    platform: str              # "tpu" (compiled for abstract TPU devices) | "gpu" (compiled on the host)
    hbm_bytes: int
    peak_flops: float          # bf16 dense, per chip
    cores_per_chip: int = 1    # in the slice name (v5p-64 = 64 TensorCores = 32 chips)


CHIPS = {
    "v5p": Chip("v5p", "tpu", int(95.74 * GIB), 459e12, cores_per_chip=2),
    "v6e": Chip("v6e", "tpu", int(31.25 * GIB), 918e12),
    "v5e": Chip("v5e", "tpu", int(15.75 * GIB), 197e12),
    "h200": Chip("h200", "gpu", 141 * 10 ** 9, 989e12),
}

# chips -> the topology the compiler is asked for (the shapes Cloud TPU slices of that size have)
_TOPOLOGIES = {
    "v5p": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "4x4x2", 64: "4x4x4", 128: "4x4x8", 256: "8x8x4",
            512: "8x8x8"},
    "v6e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str          # as in a config variant: "v5p-64", "h200"
    chip: Chip
    chips: int
    topology: str | None  # e.g. "v5p:4x4x2"; None for a GPU

    @property
    def step_floor_s(self):
        """Seconds per FLOP at the chip's peak (a program's time is at least flops * this)."""
        return 1.0 / self.chip.peak_flops


def parse(name: str) -> Hardware:
    """`v5p-64`, `v6e-256`, `v5e-8`, `h200` -> Hardware; one clear error for anything else."""
    if name == "h200":
        return Hardware(name, CHIPS["h200"], 1, None)
    m = re.fullmatch(r"(v5p|v6e|v5e)-(\d+)", name or "")
    if not m:
        raise OlmoJaxError(f"unknown hardware {name!r}; expected h200 or a Cloud TPU slice such as "
                           f"v5p-64, v6e-256, v5e-8")
    chip = CHIPS[m.group(1)]
    cores = int(m.group(2))
    chips, rest = divmod(cores, chip.cores_per_chip)
    shape = _TOPOLOGIES[chip.kind].get(chips) if not rest else None
    if shape is None:
        sizes = sorted(n * chip.cores_per_chip for n in _TOPOLOGIES[chip.kind])
        raise OlmoJaxError(f"unknown {chip.kind} slice {name!r}; sizes: {', '.join(f'{chip.kind}-{s}' for s in sizes)}")
    return Hardware(name, chip, chips, f"{chip.kind}:{shape}")


def find_libtpu() -> str | None:
    """libtpu.so: $TPU_LIBRARY_PATH, the `libtpu` package, or the copy scripts/setup.sh installs."""
    if os.environ.get(TPU_LIBRARY_ENV) and os.path.isfile(os.environ[TPU_LIBRARY_ENV]):
        return os.environ[TPU_LIBRARY_ENV]
    import importlib.util
    spec = importlib.util.find_spec("libtpu")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "libtpu.so")
        if os.path.isfile(path):
            return path
    return PRIVATE_LIBTPU if os.path.isfile(PRIVATE_LIBTPU) else None


def prepare_tpu_compiler() -> None:
    """Before JAX starts: compile for TPUs on this CPU host (JAX runs on the CPU, libtpu compiles)."""
    path = find_libtpu()
    if path is None:
        raise OlmoJaxError('the TPU compiler (libtpu) is not installed: pip install -e ".[tpu]" '
                           "(or bash scripts/setup.sh, which puts it in .tpu/)")
    os.environ[TPU_LIBRARY_ENV] = path
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: not on a TPU VM
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # silences libtpu's host probing warnings
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def devices(hw: Hardware):
    """The devices to compile for: abstract TPU chips of the topology, or this host's first device
    (the GPU presets are compiled on the host: see docs/ACCELERATORS.md for how far that goes)."""
    import jax
    if hw.topology is None:
        return jax.devices()[:1]
    from jax.experimental import topologies
    return topologies.get_topology_desc(topology_name=hw.topology, platform="tpu").devices


def compiler_hbm_bytes(hw: Hardware) -> int:
    """The HBM one chip offers, as the XLA:TPU compiler itself reports it: a program needing far
    more than any chip has fails with "... exceeds available HBM (95.74G)" (checks `CHIPS`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.asarray(devices(hw))[:1], ("x",))
    huge = jax.ShapeDtypeStruct((1024, 1024, 1024, 256), jnp.float32, sharding=NamedSharding(mesh, P()))  # 1 TiB
    try:
        jax.jit(lambda a: jnp.sin(a)[::-1]).trace(huge).lower().compile()
    except Exception as e:  # noqa: BLE001 - the expected out-of-memory error
        m = re.search(r"available HBM \(([\d.]+)G\)", str(e))
        if m:
            return int(float(m.group(1)) * GIB)
        raise
    raise AssertionError("a 1 TiB program compiled: no HBM limit to read")
