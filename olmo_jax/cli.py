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
    """A CLI's body: user errors and interruptions as one line, library INFO logs off the console."""
    _console_warnings_only()
    try:
        yield
    except OlmoJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Interrupted as e:
        print(str(e), flush=True)
        sys.exit(e.exit_code)


class _WorkdirLogHandler(logging.FileHandler):
    """Appends to a file in the run's directory once that directory exists (the run creates it);
    records before that wait in memory. A run refused before it creates anything leaves nothing."""

    def __init__(self, path: str):
        super().__init__(path, delay=True)
        self._early: list[logging.LogRecord] = []

    def emit(self, record):
        if self.stream is None and not os.path.isdir(os.path.dirname(self.baseFilename)):
            self._early.append(record)
            return
        early, self._early = self._early, []
        for r in early:
            super().emit(r)
        super().emit(record)


def library_logs_to(path: str) -> None:
    """Python/absl log records of level INFO and above are appended to `path`; the console keeps
    only warnings and errors, unless the user asked for more with absl's `--verbosity` / `-v`."""
    from absl import logging as absl_logging

    file_handler = _WorkdirLogHandler(path)
    file_handler.setFormatter(absl_logging.PythonFormatter())
    file_handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(file_handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    _console_warnings_only()


def _console_warnings_only() -> None:
    """The console (absl's handler) shows warnings and errors, unless --verbosity / -v was given,
    and never asyncio's reports of TensorStore operations Orbax abandoned (they stay in the log file)."""
    from absl import flags
    from absl import logging as absl_logging
    handler = absl_logging.get_absl_handler()
    if not (flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present):
        handler.setLevel(logging.WARNING)
    if not any(isinstance(f, _AbandonedTensorStoreOperations) for f in handler.filters):
        handler.addFilter(_AbandonedTensorStoreOperations())


class _AbandonedTensorStoreOperations(logging.Filter):
    """When a train-state restore fails and training falls back to an earlier step (train.loop), the
    reads Orbax started for the damaged step and stopped awaiting end in asyncio's "Task exception
    was never retrieved" ERROR, a traceback on the console after our one-line warning. The failure
    is already reported; the record is kept off the console (the run's log.txt keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "asyncio" or "exception was never retrieved" not in record.getMessage():
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return "tensorstore_spec" not in str(exc)  # TensorStore's errors name the spec they failed on


@contextlib.contextmanager
def study_run(workdir: str | None):
    """A pipeline/training CLI: user errors and interruptions handled, logs into WORKDIR/log.txt."""
    with user_errors():
        if workdir and "://" not in workdir:
            library_logs_to(os.path.join(workdir, LOG_FILE))
        yield


def define_run_flags() -> None:
    """--config (configs/NAME.py[:variant], overridable: --config.opt.lr=...) and --workdir, for the
    entry points that run a study (called by them: importing this module defines no flag)."""
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:variant]).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory; relaunch to resume.")
    flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=cli.parse_flags)`), with the config file
    loaded at once: a bad flag, a missing config file, an unknown variant, a refused preset or an
    override of a field that does not exist is one error line and exit 2, never a traceback."""
    from absl import flags
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS["config"].present:
            flags.FLAGS.config.to_dict()  # ml_collections loads the file lazily: load it now
        return rest
    except Exception as e:  # noqa: BLE001 - whatever the config file raises, it is the user's input
        print(f"error: {_root_message(e)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def _root_message(e: BaseException) -> str:
    """The innermost cause of an exception chain, on one line (a "did you mean" hint kept)."""
    chain = [e]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    hint = next((str(x.args[0]) for x in chain if x.args and "Did you mean" in str(x.args[0])), "")
    root = chain[-1]
    text = hint or (root.args[0] if isinstance(root, KeyError) and root.args else str(root))
    text = " ".join(str(text).replace("\\n", " ").replace("\\'", "'").split()).strip("'\"")
    if isinstance(root, (KeyError, AttributeError)):
        return "unknown config field " + text.replace("' Did", ": did").replace("'", "")
    return text


def print_primary(text: str) -> None:
    """Print on process 0 only (a multi-host run prints its results once)."""
    import jax
    if jax.process_index() == 0:
        print(text, flush=True)
