"""LAMBADA (OpenAI's test set, 5153 book passages whose last word needs the whole passage), as
OLMES ships it (`lambada/bpb_0shot`): context = the passage without its last word, continuation =
" " + that word. An LM-health task, not a multiple choice: what a pruned model keeps of plain
language modelling (train/eval/run.py reports per-token loss, bits per byte of the last word and
last-word accuracy)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from olmo_jax.tasks import olmes

TASK, FORMAT = "lambada", "bpb_0shot"


@dataclass(frozen=True)
class Passage:
    doc_id: int
    native_id: Any
    context: str
    continuation: str   # " " + the last word

    @property
    def num_bytes(self) -> int:
        # OLMES's bits per byte divide by the continuation's UTF-8 length, leading space included
        return len(self.continuation.encode("utf-8"))


def passages(limit: int | None = None) -> list[Passage]:
    """The first `limit` passages (all 5153 by default), in file order."""
    return [Passage(r.doc_id, r.native_id, r.context, r.continuation)
            for r in olmes.read_requests(TASK, FORMAT, limit)]
