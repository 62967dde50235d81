"""Shared CLI behaviour: a user error is one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import contextlib
import sys

from olmo_jax.config import OlmoJaxError

EXIT_USER_ERROR = 2


@contextlib.contextmanager
def user_errors():
    try:
        yield
    except OlmoJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
