"""Pruning schedules: one-shot, or iterative over cumulative ratios with recovery in between."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from olmo_jax.config import OlmoJaxError
from olmo_jax.model import Transformer
from prune.compact import compact
from prune.importance import importance
from prune.select import kept_count, select_k

RecoverFn = Callable[[Transformer, int], Transformer]


def iterative(model: Transformer, ratios: Sequence[float], *, criterion: str = "l2",
              multiple_of: int = 1, recover: RecoverFn | None = None,
              batches_fn: Callable[[], Iterable[dict]] | None = None) -> Transformer:
    """Prunes to each cumulative ratio in turn (of the ORIGINAL neuron count), recomputing
    importance on what remains and calling `recover(model, step)` after each step but the last
    only if given. The last step ends at exactly kept_count(I, ratios[-1]) neurons per layer, the
    same count as one-shot pruning at that ratio."""
    ratios = list(ratios)
    if not ratios or any(b <= a for a, b in zip(ratios, ratios[1:])):
        raise OlmoJaxError(f"iterative ratios must be a non-empty increasing list, got {ratios}")
    dense_i = model.config.intermediate_size
    for step, ratio in enumerate(ratios):
        k = kept_count(dense_i, ratio, multiple_of)
        if k > model.config.intermediate_size:
            raise OlmoJaxError(f"ratio {ratio} keeps {k} neurons but only {model.config.intermediate_size} remain")
        scores = importance(model, criterion, batches=batches_fn() if batches_fn else None)
        model = compact(model, select_k(np.asarray(scores), k))
        if recover is not None:
            model = recover(model, step)
    return model
