"""SmolLM2-135M-Instruct (the packaged GGUF) pruned and recovered on CommonsenseQA, on CPU.

    python -m train.pipeline --config=configs/smollm2_csqa.py --workdir=runs/demo        # the demo
    python -m train.pipeline --config=configs/smollm2_csqa.py:study --workdir=runs/study # docs/RESULTS.md
    python -m train.pipeline --config=configs/smollm2_csqa.py:tuned --workdir=runs/tuned # docs/RESULTS.md
    python -m train.pipeline --config=configs/smollm2_csqa.py:cache --workdir=runs/cache # docs/RESULTS.md
    python -m train.pipeline --config=configs/smollm2_csqa.py:recovery --workdir=runs/recovery # docs/RESULTS.md part 4
    python -m train.pipeline --config=configs/smollm2_csqa.py:recovery_tune --workdir=runs/recovery_tune # part 4, tuned
    python -m train.pipeline --config=configs/smollm2_csqa.py:recovery_epoch --workdir=runs/recovery_epoch # one epoch
    python -m train.pipeline --config=configs/smollm2_csqa.py:recovery_distill --workdir=runs/recovery_distill # T, alpha
    python -m train.pipeline --config=configs/smollm2_csqa.py:recovery_blend --workdir=runs/recovery_blend # CE blend
    python -m train.pipeline --config=configs/smollm2_csqa.py:recovery_schedule --workdir=runs/recovery_schedule # rounds
    python -m train.main --config=configs/smollm2_csqa.py:kl --workdir=runs/smol_kl      # one recovery run

Variants (`:name`): demo (default) | recovery | recovery_tune | recovery_epoch | recovery_distill |
recovery_blend | recovery_schedule | recovery_schedule_late | study | tuned | cache | cache_full | ce |
kl. Override anything: `--config.opt.lr=1e-4`.
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


def recovering(c: ConfigDict) -> None:
    """The regime where recovery can be measured (docs/RESULTS.md part 4): activation importance at
    50% leaves a damaged but working language model (L2 at any ratio leaves LAMBADA loss above
    uniform). KL on every position of the choice rows, the shared prompt counted once; the part-2
    learning rates (CE 5e-5, KL 1.5e-4, tuned on heldout); CSQA plus the OLMES suite and LAMBADA."""
    c.prune.criterion, c.prune.ratio = "activation", 0.5
    c.pipeline.criteria = ("activation",)
    c.pipeline.ratios = (0.5,)
    c.pipeline.data_size_ratio = 0.5
    c.distill.positions = "all_once"
    c.pipeline.hparams = ConfigDict({"ce": {"lr": 5e-5}, "kl": {"lr": 1.5e-4}})
    c.eval.suite = "olmes"
    c.eval.lambada = 200


def demo(c: ConfigDict) -> None:
    """The recovering regime in small (<= 15 min on 2 cores), with the edge stage."""
    recovering(c)
    c.data.train_examples = 0  # questions drawn from the whole split (40 steps x 8 see 320)
    c.train.steps = 40
    c.train.ckpt_every = 20
    c.eval.suite_limit = 10    # 10 documents per OLMES task (90 questions): a coarse macro average
    c.eval.lambada = 100
    c.pipeline.edge.enabled = True
    c.pipeline.edge.quants = ("q8_0",)
    c.pipeline.edge.threads = (2,)


def recovery(c: ConfigDict) -> None:
    """docs/RESULTS.md part 4: 3 seeds x {none, CE, KL}, KL + choice-level KL at seed 0."""
    recovering(c)
    c.methods = ConfigDict({"kl-choice": {"choice_weight": 1.0}})
    c.pipeline.extra_methods = ("kl-choice",)
    c.pipeline.hparams["kl-choice"] = {"lr": 1.5e-4}
    c.pipeline.seeds = (0, 1, 2)
    c.pipeline.curves.every = 30
    c.data.train_examples = 0  # each seed draws its 480 questions from the whole split
    c.train.steps = 60         # sized to ~1 h on 2 cores; cache_full is the full budget
    c.train.ckpt_every = 30
    c.eval.limit = 0           # full validation (1221)
    c.eval.suite_limit = 20    # 20 documents per OLMES task (180 questions)


def recovery_tune(c: ConfigDict) -> None:
    """docs/RESULTS.md part 4, tuning: per method, lr x steps chosen on the full 500-question
    heldout split (CSQA accuracy chooses; LAMBADA loss on 100 passages is recorded beside it), then
    the part-4 grid (3 seeds, no choice-level arm) at the chosen settings."""
    recovery(c)
    c.methods = ConfigDict()
    c.pipeline.extra_methods = ()
    c.pipeline.hparams = ConfigDict()  # chosen by the tuning stage
    c.pipeline.tune.lrs = (5e-5, 1.5e-4, 4e-4)
    c.pipeline.tune.steps = (30, 60, 120)
    c.pipeline.tune.limit = 500
    c.pipeline.tune.lambada = 100


def recovery_epoch(c: ConfigDict) -> None:
    """docs/RESULTS.md part 4, one epoch: CE and KL at the lrs `recovery_tune` chose, each over the
    whole 9241-question train split once (1155 steps x 8), seed 0; curve points (200 heldout
    questions, 50 LAMBADA passages) every 165 steps. Measured on 2 idle cores: CE trains 30-39 min,
    KL 70 min (docs/RESULTS.md, "One epoch"). Seeds 1 and 2 ran as their own workdirs
    (`--config.pipeline.seeds="(2,)"`), reported together by `python -m train.report --pool=A,B
    --workdir=DIR`."""
    recovery(c)
    c.methods = ConfigDict()
    c.pipeline.extra_methods = ()
    c.pipeline.seeds = (0,)
    c.pipeline.hparams = ConfigDict({"ce": {"lr": 1.5e-4}, "kl": {"lr": 4e-4}})
    c.train.steps = 9241 // c.data.batch_size
    c.train.ckpt_every = 165
    c.pipeline.curves.every = 165
    c.pipeline.curves.heldout = 200


# The Tunix/MaxText distillation blend: alpha 0.9 -> 0.5 of CE on the gold answer, the rest KL with
# T 2 -> 1 (it reads labels: its own arm, never "label-free").
BLEND = {"alpha": 0.9, "alpha_end": 0.5, "temperature": 2.0, "temperature_end": 1.0}


def recovery_distill(c: ConfigDict) -> None:
    """docs/RESULTS.md part 4, the distillation options on heldout: KL with T 2 -> 1 (label-free)
    and the Tunix/MaxText blend, alpha 0.9 -> 0.5 of CE with T 2 -> 1 (it reads labels: its own
    arm). Each one 120-step run at KL's lr 1.5e-4, scored on the 500 heldout questions and 100
    LAMBADA passages after 30, 60 and 120 steps, from the same pruned start and data as
    `recovery_tune`, whose grid holds the T = 1 rows to set them beside. Tuning only: no grid."""
    recovery_tune(c)
    c.methods = ConfigDict({"kl-t2": {"temperature": 2.0, "temperature_end": 1.0}, "kd-blend": BLEND})
    c.pipeline.methods = ("kl-t2", "kd-blend")
    c.pipeline.tune.lrs = (1.5e-4,)
    c.pipeline.ratios = ()


def recovery_blend(c: ConfigDict) -> None:
    """docs/RESULTS.md part 4, the CE blend at part 4's budget and lrs: `BLEND` at KL's lr 1.5e-4,
    60 steps, 3 seeds, beside part 4's CE and KL runs (same pruned start, data and evaluation;
    paired with both). No recovery curves (time)."""
    recovery(c)
    c.methods = ConfigDict({"kd-blend": BLEND})
    c.pipeline.methods = ("ce", "kl", "kd-blend")
    c.pipeline.extra_methods = ()
    c.pipeline.hparams = ConfigDict({"ce": {"lr": 5e-5}, "kl": {"lr": 1.5e-4}, "kd-blend": {"lr": 1.5e-4}})
    c.pipeline.curves.every = 0


def recovery_schedule(c: ConfigDict) -> None:
    """docs/RESULTS.md part 4, the paper's identical pruning schedule: activation pruning to 50% in
    three rounds of 256 neurons a layer (ratios 1/6, 1/3, 1/2: 1280, 1024, 768 kept), 20 recovery
    steps after each, the same neurons for CE and KL, part 4's lrs, 3 seeds. The rounds together
    train on the questions, in the order, of part 4's 60-step one-shot runs, which run beside them:
    schedule vs one-shot is paired at equal data and steps. No recovery curves (time)."""
    recovery(c)
    c.methods = ConfigDict()
    c.pipeline.extra_methods = ()
    c.pipeline.hparams = ConfigDict({"ce": {"lr": 5e-5}, "kl": {"lr": 1.5e-4}})
    c.pipeline.curves.every = 0
    c.pipeline.schedule.rounds = (1 / 6, 1 / 3, 1 / 2)
    c.pipeline.schedule.steps = (20,)


def recovery_schedule_late(c: ConfigDict) -> None:
    """docs/RESULTS.md part 4, why the schedule costs LAMBADA: `recovery_schedule` with its 60 steps
    split 10 / 10 / 40, so that the last cut gets 40 recovery steps instead of 20 (same neurons,
    data and order, same one-shot runs beside it)."""
    recovery_schedule(c)
    c.pipeline.schedule.steps = (10, 10, 40)


def study(c: ConfigDict) -> None:
    """docs/RESULTS.md part 1 (L2 at three ratios, activation at one); ~1 h on 2 CPU cores."""
    c.pipeline.ratios = (0.1, 0.3, 0.5)
    c.pipeline.criteria = ("l2", "activation")  # activation only at data_size_ratio
    c.pipeline.data_sizes = ()  # cut for time on 2 cores; the pipeline supports e.g. (250, 4000)
    c.pipeline.equal_compute = True  # plus a CE run with as many FLOPs as the KL run
    c.data.train_examples = 1000
    c.train.steps = 40
    c.train.ckpt_every = 20
    c.eval.limit = 0  # the full 1221-question validation set


def tuned(c: ConfigDict) -> None:
    """docs/RESULTS.md part 2: L2 30% with lr/steps tuned on heldout, a data-size curve."""
    c.pipeline.ratios = (0.3,)
    c.pipeline.tune.lrs = (2e-5, 5e-5, 1.5e-4)
    c.pipeline.tune.steps = (40, 80)
    c.pipeline.data_sizes = (160, 320, 640)
    c.pipeline.data_size_epochs = 1  # one pass over n questions: 20 / 40 / 80 steps
    c.pipeline.equal_compute = True
    c.data.train_examples = 1000
    c.train.ckpt_every = 20
    c.eval.limit = 0


def cache(c: ConfigDict, full: bool = False) -> None:
    """docs/RESULTS.md part 3: CE vs online vs cached KL, 3 seeds; other cache kinds, 1 seed.
    full: the same grid at full budget (one H200: scripts/h200.sh)."""
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
    if full:
        c.data.train_examples = 0  # all 9241 training questions
        c.train.steps = 2 * (9241 // c.data.batch_size)  # two epochs
        c.train.ckpt_every = 500


def _loss(name: str):
    def variant(c: ConfigDict) -> None:
        c.train.loss = name
    return variant


VARIANTS = {"demo": demo, "recovery": recovery, "recovery_tune": recovery_tune, "recovery_epoch": recovery_epoch,
            "recovery_distill": recovery_distill, "recovery_blend": recovery_blend,
            "recovery_schedule": recovery_schedule, "recovery_schedule_late": recovery_schedule_late,
            "study": study, "tuned": tuned, "cache": cache, "cache_full": lambda c: cache(c, full=True),
            "ce": _loss("ce"), "kl": _loss("kl")}


def get_config(arg: str | None = None) -> ConfigDict:
    arg = arg or "demo"
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; choose {' | '.join(VARIANTS)}")
    c = smollm2()
    VARIANTS[arg](c)
    return c
