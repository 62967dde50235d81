"""Losses on gathered hidden states, by job:
  chunks   the one chunked driver over target positions (no [B, S, V] logits tensor)
  online   CE, KL and their mix with the teacher in the step; evaluation log-probs
  cached   the KL against a cached teacher's per-target entries
  entries  building those entries from the teacher, offline
  terms    the per-target quantities a training objective combines, and the choice-level KL
"""
from train.losses.cached import CACHE_KEYS, CACHE_KINDS, TEMPERED_KINDS, cached_kl_loss
from train.losses.chunks import DEFAULT_CHUNK, over_chunks
from train.losses.entries import teacher_cache_entries
from train.losses.online import (ce_from_logits, ce_loss, distill_from_logits, distill_loss, kl_from_logits, kl_loss,
                                 token_logprobs)
from train.losses.terms import choice_kl, choice_scores, per_target

__all__ = ["CACHE_KEYS", "CACHE_KINDS", "DEFAULT_CHUNK", "TEMPERED_KINDS", "cached_kl_loss", "ce_from_logits", "ce_loss",
           "choice_kl", "choice_scores", "distill_from_logits", "distill_loss", "kl_from_logits", "kl_loss",
           "over_chunks", "per_target", "teacher_cache_entries", "token_logprobs"]
