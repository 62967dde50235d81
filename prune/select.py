"""Layer-wise selection: every layer keeps the same number k of its highest-scoring neurons."""
from __future__ import annotations

import numpy as np

from olmo_jax.config import OlmoJaxError


def kept_count(intermediate_size: int, ratio: float, multiple_of: int = 1) -> int:
    """k = round((1 - ratio) * I), optionally rounded to the nearest multiple of `multiple_of`."""
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0):
        raise OlmoJaxError(f"pruning ratio must be in [0, 1), got {ratio!r}")
    if multiple_of < 1:
        raise OlmoJaxError(f"multiple_of must be >= 1, got {multiple_of}")
    k = int(round((1.0 - ratio) * intermediate_size))
    if multiple_of > 1:
        k = min(intermediate_size, int(round(k / multiple_of)) * multiple_of)
    if k < 1:
        raise OlmoJaxError(f"ratio {ratio} leaves 0 of {intermediate_size} neurons per layer")
    return k


def select_k(scores_LxI, k: int) -> np.ndarray:
    """Boolean mask [L, I] keeping the k highest scores per layer.

    Ties are broken deterministically in favour of the lower neuron index (a stable sort of -score).
    """
    scores = np.asarray(scores_LxI, np.float64)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def select(scores_LxI, ratio: float, multiple_of: int = 1) -> np.ndarray:
    """Mask [L, I] pruning `ratio` of every layer's neurons (the same count in each layer)."""
    return select_k(scores_LxI, kept_count(np.shape(scores_LxI)[1], ratio, multiple_of))
