"""SmolLM2-135M-Instruct (the packaged GGUF) pruned and recovered on CommonsenseQA, on CPU.

    python -m train.pipeline --config=configs/smollm2_csqa.py --workdir=runs/demo        # the demo
    python -m train.pipeline --config=configs/smollm2_csqa.py:study --workdir=runs/study # docs/RESULTS.md
    python -m train.pipeline --config=configs/smollm2_csqa.py:tuned --workdir=runs/tuned # docs/RESULTS.md
    python -m train.pipeline --config=configs/smollm2_csqa.py:cache --workdir=runs/cache # docs/RESULTS.md
    python -m train.main --config=configs/smollm2_csqa.py:kl --workdir=runs/smol_kl      # one recovery run

Variants (`:name`): demo (default) | study | tuned | cache | cache_full | ce | kl. Override anything: `--config.opt.lr=1e-4`.
"""
from ml_collections import ConfigDict


def base() -> ConfigDict:
    c = ConfigDict()
    # teacher_dtype: the KL teacher's parameters ("" = compute_dtype: float32 here, bfloat16 on the
    # accelerator presets). attention_impl: xla | splash (TPU) | cudnn (GPU) | auto (olmo_jax/model.py).
    c.model = ConfigDict(dict(src="smollm2", dtype="float32", compute_dtype="float32", teacher_dtype="",
                              attention_impl="auto"))
    c.prune = ConfigDict(dict(ratio=0.3, criterion="l2", mode="compact", multiple_of=1, calib_examples=128))
    # batch_size counts questions; train_examples limits the train split (nested subsets).
    # seq/tgt buckets: the padded lengths a training batch can take (few shapes, few compiles; the
    # largest bound every step's shape: train.aot compiles at them). CSQA rows are short (CE ~25
    # tokens, five packed choices ~45), hence the fine steps at the short end.
    c.data = ConfigDict(dict(train_examples=256, batch_size=8, seed=0, hf_hub=False,
                             seq_buckets=(32, 48, 64, 96, 128, 256, 512), tgt_buckets=(8, 16, 32, 64, 128, 256)))
    c.train = ConfigDict(dict(loss="ce", steps=32, grad_accum=1, remat=False, ckpt_every=16, keep=2,
                              log_every=1, eval_every=0, progress=True))
    # lr 5e-5 / clip 1 / batch 8 as in the reference PyTorch run (REFERENCE.md); `pipeline.tune` picks
    # lr and steps per method on the heldout split instead (the `tuned` variant does).
    c.opt = ConfigDict(dict(lr=5e-5, warmup_steps=3, min_lr_ratio=0.1, weight_decay=0.0, b1=0.9, b2=0.95,
                            eps=1e-8, grad_clip=1.0, mu_dtype=""))
    # Label-free KL over the five candidate answers (the texts the RC eval scores), T=1, forward KL.
    # source: "online" (the teacher runs in every step) | "cache" (its entries are computed once,
    # offline: kind full | topk | topk_tail | sampled, k ids or draws; train/teacher_cache.py).
    c.distill = ConfigDict(dict(temperature=1.0, reverse=False, top_k=0, alpha=0.0, inputs="choices",
                                positions="continuation", chunk=128, source="online"))
    c.distill.cache = ConfigDict(dict(kind="topk_tail", k=64, seed=0, dtype="float32", rows_per_shard=1024))
    c.eval = ConfigDict(dict(task="csqa:rc_0shot", limit=300, batch_size=32, heldout_limit=0))
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    # Sequences are tuples, so they can be overridden: --config.pipeline.ratios="(0.1, 0.5)".
    # methods: ce | kl | kl-cache-KIND-K (KL from a cached teacher, e.g. kl-cache-topk_tail-64);
    # seeds: data seeds each ratio's runs repeat over (() = data.seed once); extra_methods: run once,
    # at data_size_ratio and the first seed (e.g. more cache kinds); hparams: fixed per-loss
    # {"ce": {"lr": .., "steps": ..}, ...} (what tuning would choose; tuning overrides them).
    c.pipeline = ConfigDict(dict(ratios=(0.3,), methods=("ce", "kl"), seeds=(), extra_methods=(), criteria=("l2",),
                                 data_sizes=(),
                                 data_size_ratio=0.3, data_size_epochs=0, export_hf=False, equal_compute=False,
                                 eval_dense=True))
    # Model selection on the heldout split (500 train questions never trained on), at
    # data_size_ratio with prune.criterion: per method, each lr trains max(steps) steps and is scored
    # on heldout at every candidate step count; the best (lr, steps) is then used by every run of
    # that method. Empty lrs = no tuning (opt.lr, train.steps).
    c.pipeline.tune = ConfigDict(dict(lrs=(), steps=(), limit=300))
    c.pipeline.hparams = ConfigDict()
    # The edge stage: GGUF files of the dense and every recovered model, run in llama.cpp (file MB,
    # prompt/generation tokens/s at each thread count, peak RSS) and scored again from the file.
    c.pipeline.edge = ConfigDict(dict(enabled=False, quants=("f16", "q8_0", "q4_0"), threads=(1, 2),
                                      gen_tokens=64, eval_limit=0))
    # compilation_cache_dir: JAX's persistent compilation cache (a relaunch, or the next run of the
    # same shapes, loads its programs instead of compiling them again); "" = off.
    c.jax = ConfigDict(dict(distributed=False, coordinator_address="", num_processes=1, process_id=0,
                            compilation_cache_dir=""))
    return c


def get_config(arg: str | None = None) -> ConfigDict:
    c = base()
    arg = arg or "demo"
    if arg == "demo":
        c.pipeline.edge.enabled = True  # q8_0 / q4_0 pad the 1075-wide MLP to 1088 with zero neurons
    elif arg in ("ce", "kl"):
        c.train.loss = arg
    elif arg == "study":  # docs/RESULTS.md; sized for ~1 h on 2 CPU cores
        c.pipeline.ratios = (0.1, 0.3, 0.5)
        c.pipeline.criteria = ("l2", "activation")  # activation only at data_size_ratio
        c.pipeline.data_sizes = ()  # cut for time on 2 cores; the pipeline supports e.g. (250, 4000)
        c.pipeline.equal_compute = True  # plus a CE run with as many FLOPs as the KL run
        c.data.train_examples = 1000
        c.train.steps = 40
        c.train.ckpt_every = 20
        c.eval.limit = 0  # the full 1221-question validation set
    elif arg == "tuned":  # docs/RESULTS.md, second part: L2 30% with lr/steps tuned on heldout
        c.pipeline.ratios = (0.3,)
        c.pipeline.tune.lrs = (2e-5, 5e-5, 1.5e-4)
        c.pipeline.tune.steps = (40, 80)
        c.pipeline.data_sizes = (160, 320, 640)
        c.pipeline.data_size_epochs = 1  # one pass over n questions: 20 / 40 / 80 steps
        c.pipeline.equal_compute = True
        c.data.train_examples = 1000
        c.train.ckpt_every = 20
        c.eval.limit = 0
    elif arg in ("cache", "cache_full"):  # docs/RESULTS.md part 3: CE vs online vs cached KL, 3 seeds; kinds, 1 seed
        c.pipeline.ratios = (0.3,)
        c.pipeline.methods = ("ce", "kl", "kl-cache-topk_tail-64")
        c.pipeline.seeds = (0, 1, 2)
        c.pipeline.extra_methods = ("kl-cache-topk-64", "kl-cache-sampled-64", "kl-cache-topk-8",
                                    "kl-cache-sampled-8", "kl-cache-topk_tail-8")
        c.pipeline.hparams = ConfigDict({"ce": {"lr": 5e-5}, "kl": {"lr": 1.5e-4}})  # part 2's tuned lrs
        c.data.train_examples = 1000
        c.train.steps = 120  # longer than part 2 (40-80): what the cache saves, spent on training
        c.train.ckpt_every = 40
        c.eval.limit = 0
        if arg == "cache_full":  # the same grid at full budget (one H200: scripts/h200.sh)
            c.data.train_examples = 0  # all 9241 training questions
            c.train.steps = 2 * (9241 // c.data.batch_size)  # two epochs
            c.train.ckpt_every = 500
    else:
        raise ValueError(f"unknown variant {arg!r}; choose demo | study | tuned | cache | cache_full | ce | kl")
    return c
