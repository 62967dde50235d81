"""Shared CLI behaviour: a user error is one line on stderr and a non-zero exit, never a traceback;
library INFO logs (absl, Orbax, JAX) go to a log file, not between the progress bars."""
from __future__ import annotations

import contextlib
import logging
import os
import sys

from olmo_jax.config import OlmoJaxError

EXIT_USER_ERROR = 2
LOG_FILE = "log.txt"


class Interrupted(Exception):
    """A run that stopped cleanly and can be relaunched (e.g. preempted): its message is printed
    and the process exits with `exit_code`."""
    exit_code = 1


@contextlib.contextmanager
def user_errors():
    try:
        yield
    except OlmoJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Interrupted as e:
        print(str(e), flush=True)
        sys.exit(e.exit_code)


class _LazyFileHandler(logging.FileHandler):
    """Opens (and creates the directory of) its file at the first record, so a run refused before
    it writes anything leaves no log file behind."""

    def __init__(self, path: str):
        super().__init__(path, delay=True)

    def _open(self):
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()


def library_logs_to(path: str) -> None:
    """Python/absl log records of level INFO and above are appended to `path`; the console keeps
    only warnings and errors, unless the user asked for more with absl's `--verbosity` / `-v`."""
    from absl import flags
    from absl import logging as absl_logging

    file_handler = _LazyFileHandler(path)
    file_handler.setFormatter(absl_logging.PythonFormatter())
    file_handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(file_handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    verbosity_given = flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present
    if not verbosity_given:
        absl_logging.get_absl_handler().setLevel(logging.WARNING)


@contextlib.contextmanager
def study_run(workdir: str | None):
    """A pipeline/training CLI: user errors and interruptions handled, logs into WORKDIR/log.txt."""
    with user_errors():
        if workdir and "://" not in workdir:
            library_logs_to(os.path.join(workdir, LOG_FILE))
        yield


def print_primary(text: str) -> None:
    """Print on process 0 only (a multi-host run prints its results once)."""
    import jax
    if jax.process_index() == 0:
        print(text, flush=True)
