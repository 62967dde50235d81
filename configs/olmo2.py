"""OLMo-2 SFT models on TPU pods / GPUs: prune MLP neurons, recover with CE (L2PFT) or KL (L2PSD).

    # one host (one H200, or one TPU VM host such as v5p-8 / v6e-8): one process, all local devices
    python -m train.pipeline --config=configs/olmo2.py:7b,h200 --workdir=/data/runs/olmo2-7b \
        --config.model.src=/data/OLMo-2-1124-7B-SFT

    # a multi-host TPU slice: the same command on every host (jax.distributed auto-detects the pod)
    gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd olmo-jax && \
        python -m train.pipeline --config=configs/olmo2.py:7b,v5p-64 --workdir=/mnt/gcs/olmo2-7b \
        --config.model.src=/mnt/gcs/OLMo-2-1124-7B-SFT --config.jax.distributed=True"

Variants: 1b | 7b (default) | 13b | 32b, optionally with a hardware suffix: `7b,h200`, `7b,v5p-64`,
`32b,v6e-256`. Multi-host: every process runs every stage on the global mesh; the workdir and the
model must be the same POSIX path on every host (NFS/Filestore, or the bucket mounted with gcsfuse;
`gs://` URLs are refused). On GPU clusters without auto-detection add
`--config.jax.coordinator_address=HOST:PORT --config.jax.num_processes=N --config.jax.process_id=I`.
Tested with 2 CPU processes (tests/test_multihost_pipeline.py); not yet run on a TPU slice. The
weights are read shard by shard straight into their place on the mesh and stay sharded in every
stage (pruning, evaluation, export): a model never has to fit on one device.
"""
from ml_collections import ConfigDict

from configs.smollm2_csqa import base

MODELS = {
    "1b": "allenai/OLMo-2-0425-1B-SFT",
    "7b": "allenai/OLMo-2-1124-7B-SFT",
    "13b": "allenai/OLMo-2-1124-13B-SFT",
    "32b": "allenai/OLMo-2-0325-32B-SFT",
}

# (data, fsdp, tensor) per hardware; fsdp=-1 takes the remaining devices.
MESHES = {
    "h200": dict(data=1, fsdp=1, tensor=1),        # one H200 (141 GB): 7B bf16 + teacher fit
    "v5p-64": dict(data=1, fsdp=-1, tensor=1),     # 32 chips, FSDP over all
    "v6e-256": dict(data=4, fsdp=-1, tensor=1),    # 4 data-parallel replicas of 64-way FSDP
    "v5p-512": dict(data=2, fsdp=-1, tensor=4),    # 32B: tensor-parallel heads/neurons inside a host
}


def get_config(arg: str | None = None) -> ConfigDict:
    size, _, hw = (arg or "7b").partition(",")
    if size not in MODELS:
        raise ValueError(f"unknown model size {size!r}; choose from {sorted(MODELS)}")
    c = base()
    c.model.src = MODELS[size]  # a local HF directory in practice (no hub access at run time)
    c.model.dtype = "float32"          # float32 master weights
    c.model.compute_dtype = "bfloat16"  # bf16 matmuls
    c.prune.multiple_of = 128           # TPU/GPU-friendly kept widths
    c.pipeline.ratios = (0.1, 0.3, 0.5)
    c.pipeline.data_sizes = (1000, 4000, 9241)
    c.data.train_examples = 0  # all of train minus heldout
    c.data.batch_size = {"1b": 64, "7b": 64, "13b": 64, "32b": 64}[size]
    c.train.steps = 300
    c.train.remat = size != "1b"
    c.train.grad_accum = {"1b": 1, "7b": 2, "13b": 4, "32b": 4}[size]
    c.train.ckpt_every = 50
    c.opt.lr = {"1b": 2e-5, "7b": 1e-5, "13b": 1e-5, "32b": 5e-6}[size]
    c.opt.warmup_steps = 20
    c.distill.chunk = 64  # 100352-entry vocab: bound the float32 logits held per chunk
    c.eval.limit = 0
    c.eval.batch_size = 64
    c.pipeline.export_hf = True
    if hw:
        if hw not in MESHES:
            raise ValueError(f"unknown hardware {hw!r}; choose from {sorted(MESHES)}")
        c.mesh = ConfigDict(MESHES[hw])
    return c
