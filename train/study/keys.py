"""What identifies a model of a study: a `RunKey` value, from which its stage name is derived (for
people and directories; nothing parses a name back)."""
from __future__ import annotations

import dataclasses

UNRECOVERED = "none"  # the method of a pruned model before any recovery


@dataclasses.dataclass(frozen=True)
class RunKey:
    criterion: str
    ratio: float
    method: str = UNRECOVERED      # a method name, or "none": the pruned model itself
    seed: int | None = None        # None: the data seed once (no seed grid)
    variant: str = ""              # "" main | "n160" data size | "eqflops" | "sched" iterative schedule

    @property
    def stage(self) -> str:
        if self.variant == "sched":
            return f"sched-{self.criterion}-{self.method}" + ("" if self.seed is None else f"-s{self.seed}")
        if self.method == UNRECOVERED:
            return f"prune-{self.criterion}-{self.ratio}"
        name = f"run-{self.criterion}-{self.ratio}-{self.method}"
        return name + (f"-{self.variant}" if self.variant else "") + ("" if self.seed is None else f"-s{self.seed}")

    @property
    def group(self) -> "RunKey":
        """The same run with the seed left out: what pooling over seeds pools."""
        return dataclasses.replace(self, seed=None)

    @property
    def unrecovered(self) -> "RunKey":
        """The pruned model this run recovered (for a schedule: one-shot pruning to its last ratio)."""
        return RunKey(self.criterion, self.ratio)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunKey":
        return cls(**d)
