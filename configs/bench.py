"""Throughput harness config: JAX (ours) vs transformers/PyTorch on the same OLMo2 weights and batch.

    python -m train.bench --config=configs/bench.py            # cpu variant (default), a few minutes
    python -m train.bench --config=configs/bench.py:cpu --out=bench.json
    python -m train.bench --config=configs/bench.py:tiny       # CI smoke run, seconds
    python -m train.bench --config=configs/bench.py:gpu --out=bench_gpu.json   # one H200, < 5 min

Variants (`:name`):
  cpu   Olmo2, 4 layers, d512, 8 heads (head_dim 64), intermediate 1536, vocab 32000; batch 4x256, fp32.
        The reference CPU target (docs/BENCHMARKS.md).
  tiny  2 layers, d64, vocab 256, batch 2x32, 2 timed steps per framework, no torch.compile (tests).
  gpu   OLMo2-1B shapes: 16 layers, d2048, 16 heads x 128, intermediate 8192, vocab 100352; bf16;
        batch 4x2048 (see `batch_size`).
Override anything, e.g. `--config.torch_compile=False --config.steps=10 --config.loss_chunk=128`.
See train/bench/harness.py for what every number means.
"""
from ml_collections import ConfigDict

VARIANTS = ("cpu", "tiny", "gpu")


def _model(**kw) -> ConfigDict:
    m = dict(arch="olmo2", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=4,
             num_heads=8, num_kv_heads=8, head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-6,
             tie_word_embeddings=False, max_position_embeddings=4096, pad_token_id=1, bos_token_id=None,
             eos_token_id=2, param_dtype="float32", compute_dtype="float32")
    m.update(kw)
    return ConfigDict(m)


def get_config(arg: str | None = None) -> ConfigDict:
    arg = arg or "cpu"
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {VARIANTS}")
    c = ConfigDict()
    c.variant = arg
    c.model = _model()
    c.batch_size = 4
    c.seq_len = 256
    c.seed = 0
    c.steps = 5             # timed steps per measurement (after warm-up)
    c.warmup = 2            # untimed steps (the first JAX call compiles; it is reported as compile_s)
    # The timed sections (train/bench/harness.py SECTIONS); empty = all. A tuple, so that
    # `--config.sections="('jax_ce', 'torch_eager')"` works on the command line.
    c.sections = ()
    # JAX train step knobs (train.step): loss chunk along the target axis (0 = one chunk, no logits
    # recomputation in the backward pass), layer remat, and the learning rate (AdamW as in training).
    c.loss_chunk = 0
    c.remat = False
    c.attention_impl = "auto"  # the bench's rows are plain causal sequences: cuDNN on GPU, ours on CPU
    c.lr = 1e-4
    c.torch_device = "cpu"
    c.torch_compile = True  # ~50 s of compilation on the cpu variant
    c.prune_ratio = 0.5     # masked vs compacted training, dense vs compacted decoding
    c.decode_prompt_len = 32
    c.decode_new_tokens = 32
    c.decode_repeats = 3
    c.matmul_n = 2048       # the square matmul whose best time defines the measured peak
    c.datasheet_peak_flops = 0.0  # > 0: also report MFU against it (gpu: H200 bf16 dense)
    # Extra XLA flags, applied by `python -m train.bench` before JAX starts (library callers must set
    # XLA_FLAGS themselves). The flags in effect are recorded in the output.
    c.xla_flags = ""
    # Shared machines: a section during which other processes kept more than `contention_threshold`
    # cores busy (on average) is measured again after waiting (up to idle_wait_s) for an idle machine,
    # at most `contention_retries` times; the least contended attempt is kept. 0 = measure once.
    c.contention_retries = 0
    c.contention_threshold = 0.1
    c.idle_wait_s = 300.0
    # "1" or "0,1": pin the process to these cores (and size torch's thread pool to them) before JAX
    # starts; applied by `python -m train.bench` only. "" = all cores.
    c.cpu_affinity = ""

    {"tiny": _tiny, "gpu": _gpu}.get(arg, lambda c: None)(c)
    return c


def _tiny(c: ConfigDict) -> None:
    c.model = _model(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=4, head_dim=16, max_position_embeddings=128)
    c.batch_size, c.seq_len = 2, 32
    c.steps, c.warmup = 2, 1
    c.torch_compile = False
    c.decode_prompt_len, c.decode_new_tokens, c.decode_repeats = 8, 4, 1
    c.matmul_n = 256


def _gpu(c: ConfigDict) -> None:
    c.model = _model(vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_layers=16,
                     num_heads=16, num_kv_heads=16, head_dim=128, pad_token_id=100277,
                     eos_token_id=100257, param_dtype="bfloat16", compute_dtype="bfloat16")
    c.batch_size, c.seq_len = 4, 2048
    c.steps, c.warmup = 5, 2
    c.loss_chunk = 512      # [B, 512, V] float32 logits per chunk instead of [B, T, V]
    c.torch_device = "cuda"
    c.torch_compile = False  # opt-in (--config.torch_compile=True): its compile alone takes minutes
    c.decode_prompt_len, c.decode_new_tokens = 128, 64
    c.matmul_n = 8192
    c.datasheet_peak_flops = 989e12  # H200 SXM bf16 dense tensor-core peak
    # MaxText's single-GPU XLA flags: the latency-hiding scheduler, cuBLAS(Lt) GEMMs rather than
    # Triton's, no command buffers, a high-priority stream for async work.
    c.xla_flags = ("--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false "
                   "--xla_gpu_enable_cublaslt=true --xla_gpu_enable_command_buffer= "
                   "--xla_gpu_enable_highest_priority_async_stream=true")
