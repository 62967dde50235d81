"""OLMo-2 SFT models on TPU pods / GPUs: prune MLP neurons, recover with CE (L2PFT) or KL (L2PSD).

    # first, on any CPU host: does every program fit the hardware? (docs/ACCELERATORS.md)
    python -m train.aot --config=configs/olmo2.py:7b,v5p-64

    # one host (one H200, or one TPU VM host such as v5p-8 / v6e-8): one process, all local devices
    python -m train.pipeline --config=configs/olmo2.py:1b,h200 --workdir=/data/runs/olmo2-1b \
        --config.model.src=/data/OLMo-2-0425-1B-SFT

    # a multi-host TPU slice: the same command on every host (jax.distributed auto-detects the pod)
    gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd olmo-jax && \
        python -m train.pipeline --config=configs/olmo2.py:7b,v5p-64 --workdir=/mnt/gcs/olmo2-7b \
        --config.model.src=/mnt/gcs/OLMo-2-1124-7B-SFT --config.jax.distributed=True"

Variants: 1b | 7b (default) | 13b | 32b, optionally with a hardware suffix: `1b,h200`, `7b,v5p-64`,
`32b,v6e-256`, `13b,v5p-512`. Multi-host: every process runs every stage on the global mesh; the workdir and the
model must be the same POSIX path on every host (NFS/Filestore, or the bucket mounted with gcsfuse;
`gs://` URLs are refused). On GPU clusters without auto-detection add
`--config.jax.coordinator_address=HOST:PORT --config.jax.num_processes=N --config.jax.process_id=I`.
Tested with 2 CPU processes (tests/test_multihost_pipeline.py); not yet run on a TPU slice. The
weights are read shard by shard straight into their place on the mesh and stay sharded in every
stage (pruning, evaluation, export): a model never has to fit on one device.
"""
from ml_collections import ConfigDict

from configs.base import base
from olmo_jax.sharding import mesh_sizes

MODELS = {
    "1b": "allenai/OLMo-2-0425-1B-SFT",
    "7b": "allenai/OLMo-2-1124-7B-SFT",
    "13b": "allenai/OLMo-2-1124-13B-SFT",
    "32b": "allenai/OLMo-2-0325-32B-SFT",
}

# The released models' config.json fields (../shared/REFERENCE.md): what `python -m train.aot` compiles
# for before the weights are on disk. With a local model.src its own config.json is used (and the
# pipeline only ever reads that).
_OLMO2 = dict(model_type="olmo2", vocab_size=100352, head_dim=128, rms_norm_eps=1e-6, rope_theta=500000.0,
              max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=100277, bos_token_id=None,
              eos_token_id=100257)
HF_CONFIGS = {
    "1b": dict(_OLMO2, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=16),
    "7b": dict(_OLMO2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "13b": dict(_OLMO2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
    "32b": dict(_OLMO2, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8),
}

# Per hardware: its chips, the (data, fsdp, tensor) mesh (fsdp=-1 takes the remaining devices) and
# the sizes that fit it (docs/ACCELERATORS.md has the AOT table). A micro-batch (data.batch_size /
# train.grad_accum questions) is split over data x fsdp, so that product must divide it: on 256
# chips, tensor=4 keeps it at 64 (one question per FSDP group and micro-batch).
HARDWARE = {
    # 7B on one H200 needs 149-174 GiB for its train steps by the host-CPU compile (AdamW state alone
    # is ~80 GB): the 7B presets are TPU slices (docs/ACCELERATORS.md)
    "h200": dict(chips=1, mesh=dict(data=1, fsdp=1, tensor=1), sizes=("1b",)),
    "v5p-64": dict(chips=32, mesh=dict(data=1, fsdp=-1, tensor=1), sizes=("1b", "7b", "13b", "32b")),
    "v6e-256": dict(chips=256, mesh=dict(data=1, fsdp=-1, tensor=4), sizes=("1b", "7b", "13b", "32b")),
    "v5p-512": dict(chips=256, mesh=dict(data=1, fsdp=-1, tensor=4), sizes=("1b", "7b", "13b", "32b")),
}
GRAD_ACCUM = {"1b": 1, "7b": 2, "13b": 4, "32b": 4}  # at most: a micro-batch must span the mesh


def get_config(arg: str | None = None) -> ConfigDict:
    size, _, hw = (arg or "7b").partition(",")
    if size not in MODELS:
        raise ValueError(f"unknown model size {size!r}; choose from {sorted(MODELS)}")
    c = base()
    c.model.src = MODELS[size]  # a local HF directory in practice (no hub access at run time)
    c.model.hf_config = ConfigDict(HF_CONFIGS[size])
    c.hardware = hw
    c.model.dtype = "float32"          # float32 master weights
    c.model.compute_dtype = "bfloat16"  # bf16 matmuls; the KL teacher is held in bf16 too (teacher_dtype "")
    c.prune.multiple_of = 128           # TPU/GPU-friendly kept widths
    c.pipeline.ratios = (0.1, 0.3, 0.5)
    c.pipeline.data_sizes = (1000, 4000, 9241)
    c.data.train_examples = 0  # all of train minus heldout
    # CSQA rows are short (at most 86 tokens / 42 targets with SmolLM2's tokenizer); 3x headroom for
    # OLMo2's, checked against every row before the first stage. train.aot compiles at the largest.
    c.data.seq_buckets = (32, 64, 128, 256)
    c.data.tgt_buckets = (16, 32, 64, 128)
    c.data.batch_size = 64
    c.train.steps = 300
    c.train.remat = size != "1b"
    c.train.grad_accum = GRAD_ACCUM[size]
    c.train.ckpt_every = 50
    c.opt.lr = {"1b": 2e-5, "7b": 1e-5, "13b": 1e-5, "32b": 5e-6}[size]
    c.opt.warmup_steps = 20
    c.distill.chunk = 64  # 100352-entry vocab: bound the float32 logits held per chunk
    c.eval.limit = 0
    c.eval.batch_size = 64
    c.pipeline.export_hf = True
    if hw:
        if hw not in HARDWARE:
            raise ValueError(f"unknown hardware {hw!r}; choose from {sorted(HARDWARE)}")
        spec = HARDWARE[hw]
        if size not in spec["sizes"]:
            raise ValueError(f"OLMo2-{size} does not fit {hw} (AOT, docs/ACCELERATORS.md); "
                             f"{hw} takes {', '.join(spec['sizes'])}")
        c.mesh = ConfigDict(spec["mesh"])
        data, fsdp, _ = mesh_sizes(**spec["mesh"], num_devices=spec["chips"])
        c.train.grad_accum = min(GRAD_ACCUM[size], c.data.batch_size // (data * fsdp))
    return c
