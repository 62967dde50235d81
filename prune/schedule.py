"""Pruning schedules: one-shot, or iterative (the paper's "identical pruning schedules"): prune to
each cumulative ratio in turn, recovering in between, every method removing the same neurons.

The neurons of every round come from ONE importance ranking of the model the schedule starts
from (`nested_masks`): round r keeps the top k_r neurons of each layer, so the kept sets are
nested and fixed before any recovery. Round r then removes, from the model recovered after round
r - 1, exactly the neurons that leave the kept set (`round_mask` maps them to that smaller model's
indices). Two recovery methods therefore see identical masks in every round, and each round
prunes the weights its own recovery produced. (`rescore=True` instead ranks again on each
recovered model, as Minitron's iterative pruning does; the masks then depend on the recovery.)
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from olmo_jax.config import OlmoJaxError
from olmo_jax.distributed import to_host
from olmo_jax.model import Transformer
from prune.compact import compact
from prune.importance import importance
from prune.select import kept_count, select_k

RecoverFn = Callable[[Transformer, int], Transformer]


def nested_masks(scores_LxI, ratios: Sequence[float], multiple_of: int = 1) -> list[np.ndarray]:
    """[L, I] masks keeping the top kept_count(I, r) neurons per layer for each cumulative ratio r:
    one ranking (ties to the lower index), so each mask is a subset of the one before."""
    ratios = list(ratios)
    if not ratios or any(b <= a for a, b in zip(ratios, ratios[1:])):
        raise OlmoJaxError(f"iterative ratios must be a non-empty increasing list, got {ratios}")
    scores = np.asarray(scores_LxI)
    return [select_k(scores, kept_count(scores.shape[1], r, multiple_of)) for r in ratios]


def round_mask(kept_before_LxI, kept_after_LxI) -> np.ndarray:
    """The mask over a model that holds the neurons `kept_before` (original indices, in order) that
    keeps those also in `kept_after`: [L, k_before] bool."""
    before, after = np.asarray(kept_before_LxI, bool), np.asarray(kept_after_LxI, bool)
    if (after & ~before).any():
        raise OlmoJaxError("a later round keeps a neuron an earlier round removed: the masks are not nested")
    return np.stack([a[np.flatnonzero(b)] for a, b in zip(after, before)])


def iterative(model: Transformer, ratios: Sequence[float], *, criterion: str = "l2", multiple_of: int = 1,
              recover: RecoverFn | None = None, batches_fn: Callable[[], Iterable[dict]] | None = None,
              rescore: bool = False) -> Transformer:
    """Prunes to each cumulative ratio in turn (of the ORIGINAL neuron count), calling
    `recover(model, round)` after each round if given. The last round ends at exactly
    kept_count(I, ratios[-1]) neurons per layer, the same count as one-shot pruning at that ratio."""
    def scores(m):
        return to_host(importance(m, criterion, batches=batches_fn() if batches_fn else None))

    masks = nested_masks(scores(model), ratios, multiple_of)
    kept = np.ones_like(masks[0])
    for r, mask in enumerate(masks):
        if rescore and r:  # rank what remains again, keeping this round's count per layer
            small = select_k(scores(model), int(mask[0].sum()))
            model, kept = compact(model, small), _expand(kept, small)
        else:
            model, kept = compact(model, round_mask(kept, mask)), mask
        if recover is not None:
            model = recover(model, r)
    return model


def _expand(kept_LxI, small_mask_LxK) -> np.ndarray:
    """Original-index mask of the neurons a compacted model's `small_mask` keeps."""
    out = np.zeros_like(kept_LxI)
    for layer, (k, s) in enumerate(zip(kept_LxI, small_mask_LxK)):
        out[layer, np.flatnonzero(k)[s]] = True
    return out
