"""OLMES-format CSQA evaluation: requests (what to score) and metrics (what the scores mean)."""
from train.eval.metrics import (bootstrap_ci, calibration, choice_scores, correct, evaluate,
                                paired_bootstrap)
from train.eval.requests import (TASKS, Question, Request, build_requests, group_requests,
                                 load_olmes_requests, to_matrix)

__all__ = ["TASKS", "Question", "Request", "bootstrap_ci", "build_requests", "calibration", "choice_scores",
           "correct", "evaluate", "group_requests", "load_olmes_requests", "paired_bootstrap",
           "to_matrix"]
