"""One process of the 2-process teacher-cache build (tests/test_teacher_cache.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=1 python tests/teacher_cache_worker.py \
        --coordinator=localhost:PORT --process_id=I --dir=DIR

Both processes call build_cache on the same rows with a teacher_fn that is a cross-process
collective (a process_allgather per call), as a teacher sharded over processes would be: a
process that called it a different number of times than the other would hang. Prints one JSON
line with this process's number of teacher calls.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--process_id", type=int, required=True)
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    import jax
    import numpy as np
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=2, process_id=args.process_id)
    from jax.experimental import multihost_utils

    from tests.test_teacher_cache import MULTIHOST, FakeTeacher, _build, _rows

    kind, k, T = MULTIHOST["kind"], MULTIHOST["k"], MULTIHOST["T"]
    teacher = FakeTeacher(kind, k, T)

    def collective(batch, keys):
        multihost_utils.process_allgather(np.asarray([teacher.calls], np.int32))
        return teacher(batch, keys)

    _build(args.dir, _rows(n=MULTIHOST["rows"]), collective, kind, k, T)
    print(json.dumps({"process": jax.process_index(), "calls": teacher.calls}), flush=True)


if __name__ == "__main__":
    main()
