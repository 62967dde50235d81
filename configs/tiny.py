"""A tiny random Llama with SmolLM2's tokenizer (cut to 2048 ids by the tests): the pipeline end to
end in seconds (tests/CI).

    python -m train.pipeline --config=configs/tiny.py --workdir=/tmp/tiny \
        --config.model.src=DIR   # DIR: made by tests (tiny HF dir with tokenizer files)
"""
from configs.base import base


def get_config(arg: str | None = None):
    c = base()
    c.model.src = arg or ""
    c.prune.calib_examples = 16
    c.data.train_examples = 32
    c.data.batch_size = 8  # divisible by the 8 virtual CPU devices the tests use
    c.train.steps = 4
    c.train.ckpt_every = 2
    c.train.progress = False
    c.opt.lr = 1e-3
    c.opt.warmup_steps = 1
    c.eval.limit = 12
    c.eval.batch_size = 8
    c.pipeline.ratios = (0.5,)
    c.pipeline.data_sizes = (8, 16)
    c.pipeline.data_size_ratio = 0.5
    return c
