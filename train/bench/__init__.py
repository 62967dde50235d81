"""Benchmarks, beside training (nothing in the library imports them):

    harness.py     JAX vs PyTorch train/forward/decode throughput (`python -m train.bench`)
    jax_side.py    our timed programs;  torch_side.py  the transformers/PyTorch ones
    measure.py     timing, memory and CPU-contention helpers shared by both sides
    eval_speed.py  evaluation wall time vs a transformers loop (`python -m train.bench.eval_speed`)
    torch_ref.py   the transformers scorer that evaluation is tested and benchmarked against
"""
