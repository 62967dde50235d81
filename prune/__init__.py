"""Layer-wise MLP-neuron pruning: importance -> select -> apply_masks (mask mode) or compact."""
from __future__ import annotations

from olmo_jax.config import OlmoJaxError
from olmo_jax.distributed import to_host
from olmo_jax.model import NeuronMask, Transformer
from prune.compact import compact, compact_params, kept_indices
from prune.importance import CRITERIA, DATA_CRITERIA, importance
from prune.masks import apply_masks, masked_updates
from prune.report import report
from prune.schedule import iterative, nested_masks, round_mask
from prune.select import kept_count, select, select_k

MODES = ("compact", "mask")


def prune(model: Transformer, ratio: float, criterion: str = "l2", *, mode: str = "compact",
          multiple_of: int = 1, batches=None) -> Transformer:
    """One-shot layer-wise pruning of `ratio` of every layer's MLP neurons.

    mode="compact": a smaller dense model (intermediate_size = k).
    mode="mask": same shapes, pruned weights zeroed; the mask is `model.neuron_mask.get_value()`.
    """
    if mode not in MODES:
        raise OlmoJaxError(f"unknown prune mode {mode!r}; choose from {MODES}")
    mask = select(to_host(importance(model, criterion, batches=batches)), ratio, multiple_of)  # scores may span hosts
    if mode == "compact":
        return compact(model, mask)
    return Transformer(model.config, apply_masks(model.param_dict(), mask), source=model.source, neuron_mask=mask)


__all__ = ["prune", "importance", "select", "select_k", "kept_count", "apply_masks", "masked_updates",
           "compact", "compact_params", "kept_indices", "iterative", "nested_masks", "round_mask", "report",
           "CRITERIA", "DATA_CRITERIA", "MODES",
           "NeuronMask"]
