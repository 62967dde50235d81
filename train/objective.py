"""What a recovery step minimises, from the run's settings: a weighted sum of normalised terms.

  CE run:  ce                                                            (L2PFT)
  KL run:  alpha * ce + (1 - alpha) * (token_weight * kl + choice_weight * choice_kl)   (L2PSD)

  ce         cross-entropy of the gold answer's tokens (CE rows: every target; KL rows with a
             label, alpha > 0: the targets of the gold branch only)       / their count
  kl         T**2 * KL(teacher || student) per target, weighted by tgt_kl_weight (each position
             of the row once with positions="all_once")                   / sum of those weights
  choice_kl  T**2 * KL over the softmax of per-character answer scores    / rows with 2+ choices

Each term is normalised by its own count over the whole step (every micro-batch and device), so
gradient accumulation and data parallelism weigh every target equally, and the counts come from
the batch alone (its weights), before any forward pass: the loss of a micro-batch is
sum_t coef_t * sum_t(micro-batch) / count_t(step), and the step's loss is their sum. alpha and T
follow linear schedules from their start to their `_end` value over the run when those are set.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from olmo_jax.config import ModelConfig
from olmo_jax.model import gather_positions, head_weight, hidden_states
from train import losses
from train.settings import DistillSettings, Settings


@dataclasses.dataclass(frozen=True)
class Objective:
    loss: str                   # ce | kl
    distill: DistillSettings
    total_steps: int

    @classmethod
    def from_settings(cls, run: Settings) -> "Objective":
        return cls(run.train.loss, run.distill, run.train.steps)

    @property
    def terms(self) -> tuple[str, ...]:
        if self.loss == "ce":
            return ("ce",)
        d = self.distill
        return tuple(t for t, on in (("ce", d.max_alpha > 0), ("kl", d.token_weight > 0),
                                     ("choice_kl", d.choice_weight > 0)) if on)

    @property
    def needs_teacher(self) -> bool:
        return self.loss == "kl" and self.distill.source == "online"

    def _linear(self, start: float, end: float | None, step):
        if end is None:
            return jnp.asarray(start, jnp.float32)
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(self.total_steps - 1, 1), 0.0, 1.0)
        return start + (end - start) * frac

    def temperature(self, step):
        return self._linear(self.distill.temperature, self.distill.temperature_end, step)

    def coefficients(self, step) -> dict[str, jax.Array]:
        if self.loss == "ce":
            return {"ce": jnp.ones((), jnp.float32)}
        d = self.distill
        alpha = self._linear(d.alpha, d.alpha_end, step)
        coef = {"ce": alpha, "kl": (1 - alpha) * d.token_weight, "choice_kl": (1 - alpha) * d.choice_weight}
        return {t: coef[t] for t in self.terms}

    def weights(self, batch) -> dict[str, jax.Array]:
        """Per-target (per-row for choice_kl) weights of each term, from the batch alone."""
        out = {}
        for term in self.terms:
            if term == "ce":
                w = batch["tgt_weight"]
                if self.loss == "kl":  # the gold branch of a labelled choice row
                    w = w * (batch["tgt_group"] == batch["label"][..., None]).astype(w.dtype)
                out[term] = w
            elif term == "kl":
                out[term] = batch["tgt_kl_weight"]
            else:
                out[term] = (jnp.sum(batch["choice_chars"] > 0, axis=-1) >= 2).astype(jnp.float32)
        return out

    def counts(self, batch) -> dict[str, jax.Array]:
        """Each term's normaliser over the whole batch (all leading axes: micro-batches too)."""
        return {t: jnp.sum(w) for t, w in self.weights(batch).items()}


def _targets(cfg, params, mb, remat, attention_impl):
    h = hidden_states(cfg, params, mb["tokens"], mb["positions"], mb["segment_ids"], remat=remat,
                      attention_impl=attention_impl)
    return gather_positions(h, mb["tgt_pos"]), head_weight(cfg, params)


def term_sums(objective: Objective, cfg: ModelConfig, teacher_cfg: ModelConfig | None, params, teacher_params, mb,
              *, temperature, remat: bool = False, attention_impl: str = "xla") -> dict[str, jax.Array]:
    """{term: weighted sum over this micro-batch} (the numerators of the module docstring)."""
    hs, ws = _targets(cfg, params, mb, remat, attention_impl)
    d, terms = objective.distill, objective.terms
    want = tuple(dict.fromkeys((["ce"] if "ce" in terms else []) + (["kl"] if "kl" in terms else [])
                               + (["logp_s", "logp_t"] if "choice_kl" in terms else [])))
    kw = {}
    if objective.needs_teacher:  # the teacher runs forward only: stop_gradient keeps it out of autodiff
        ht, wt = _targets(teacher_cfg, jax.lax.stop_gradient(teacher_params), mb, False, attention_impl)
        kw = dict(ht_BxSxD=ht, wt_DxV=wt, reverse=d.reverse, top_k=d.top_k)
    elif objective.loss == "kl" and "kl" in terms:
        kw = dict(cache=mb["cache"], cache_kind=d.cache.kind)
    per = losses.per_target(hs, ws, mb["tgt_tok"], want=want, temperature=temperature, chunk=d.chunk, **kw)
    weights = objective.weights(mb)
    out = {}
    for term in terms:
        if term == "choice_kl":
            out[term] = losses.choice_kl(per["logp_s"], per["logp_t"], mb["tgt_group"], mb["tgt_weight"],
                                         mb["choice_chars"], temperature)[0]
        else:
            out[term] = jnp.sum(per[term] * weights[term])
    return out
