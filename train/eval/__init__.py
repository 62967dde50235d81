"""OLMES evaluation: scoring (with a shared-prefix cache), metrics, and the runner over task specs
(olmo_jax/tasks names what to score)."""
from train.eval.metrics import (bootstrap_ci, calibration, choice_scores, correct, evaluate, lm_health,
                                macro_average, paired_bootstrap, paired_loss, paired_macro)

__all__ = ["bootstrap_ci", "calibration", "choice_scores", "correct", "evaluate", "lm_health", "macro_average",
           "paired_bootstrap", "paired_loss", "paired_macro"]
