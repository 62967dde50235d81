"""What a pruned model keeps: parameters (all and MLP), retention both ways, and bytes."""
from __future__ import annotations

from olmo_jax.config import ModelConfig


def report(dense: ModelConfig, kept_per_layer: int, *, criterion: str | None = None,
           ratio: float | None = None, mode: str | None = None) -> dict:
    """Counts for a model whose every layer keeps `kept_per_layer` of dense.intermediate_size neurons
    (the same numbers whether the neurons are masked or compacted away)."""
    pruned = dense.replace(intermediate_size=kept_per_layer)
    d, p = dense.num_params(), pruned.num_params()
    return {
        "criterion": criterion,
        "ratio": ratio,
        "mode": mode,
        "intermediate_size": {"dense": dense.intermediate_size, "kept": kept_per_layer},
        "params": {"dense_total": d["total"], "pruned_total": p["total"],
                   "dense_mlp": d["mlp"], "pruned_mlp": p["mlp"]},
        # Retention of all parameters is what an edge device stores; of MLP parameters is what the
        # pruning touched. The paper quotes retention; we always state which.
        "retention_all_params": p["total"] / d["total"],
        "retention_mlp_params": p["mlp"] / d["mlp"],
        "bytes": {"fp32": 4 * p["total"], "bf16": 2 * p["total"],
                  "dense_fp32": 4 * d["total"], "dense_bf16": 2 * d["total"]},
    }
