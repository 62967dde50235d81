"""SmolLM2-135M-Instruct (the packaged GGUF) pruned and recovered on CommonsenseQA, on CPU.

    python -m train.pipeline --config=configs/smollm2_csqa.py --workdir=runs/demo        # the demo
    python -m train.pipeline --config=configs/smollm2_csqa.py:study --workdir=runs/study # docs/RESULTS.md
    python -m train.pipeline --config=configs/smollm2_csqa.py:tuned --workdir=runs/tuned # docs/RESULTS.md
    python -m train.pipeline --config=configs/smollm2_csqa.py:cache --workdir=runs/cache # docs/RESULTS.md
    python -m train.main --config=configs/smollm2_csqa.py:kl --workdir=runs/smol_kl      # one recovery run

Variants (`:name`): demo (default) | study | tuned | cache | cache_full | ce | kl. Override anything: `--config.opt.lr=1e-4`.
"""
from ml_collections import ConfigDict

from configs.base import base


def smollm2() -> ConfigDict:
    """The CPU settings every variant shares: the packaged model, CSQA's short rows, the
    reference PyTorch run's optimiser (../shared/REFERENCE.md)."""
    c = base()
    c.model.src = "smollm2"
    # batch_size counts questions; train_examples limits the train split (nested subsets).
    # seq/tgt buckets: the padded lengths a training batch can take (few shapes, few compiles; the
    # largest bound every step's shape: train.aot compiles at them). CSQA rows are short (CE ~25
    # tokens, five packed choices ~45), hence the fine steps at the short end.
    c.data.train_examples = 256
    c.data.seq_buckets = (32, 48, 64, 96, 128, 256, 512)
    # lr 5e-5 / clip 1 / batch 8 as in the reference PyTorch run; `pipeline.tune` picks lr and
    # steps per method on the heldout split instead (the `tuned` variant does).
    return c


def get_config(arg: str | None = None) -> ConfigDict:
    c = smollm2()
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
