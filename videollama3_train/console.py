"""What a command tells its user: user errors (a line or two, no traceback) and the log file of a run.

No dependencies beyond the standard library, so every module (and ``cli.py`` before anything heavy is imported)
can use it.

A :class:`UserError` is a mistake in what was asked: the config, a path, the data, a run directory. ``cli.py``
prints its message (problem, then the fix) on one rank and exits 1; ``VL3_TRACEBACK=1`` adds the traceback. Any
other exception is a bug and keeps its full traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

TRACEBACK_ENV = "VL3_TRACEBACK"  # 1 = print the traceback of user errors too
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class UserError(Exception):
    """A mistake in the config, a path, the data or a run directory: the message names it and the fix."""


class ConfigError(UserError, ValueError):
    """A command line that cannot become a config (e.g. ``+key=`` for a key the schema lacks)."""


def rank() -> int:
    """This process's global rank under torchrun / deepspeed / accelerate / Slurm (0 when launched alone)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def relative_hint(path: str | os.PathLike) -> str:
    """`` (relative to the working directory <cwd>)`` for a relative path, else ``""``."""
    return "" if Path(path).is_absolute() else f" (relative to the working directory {Path.cwd()})"


@contextlib.contextmanager
def log_file(path: str | os.PathLike | None, *, enabled: bool = True) -> Iterator[Path | None]:
    """Copy the ``videollama3_train`` loggers' records (and warnings) into ``path`` (appended) while inside."""
    if path is None or not enabled:
        yield None
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()


__all__ = ["LOG_FORMAT", "TRACEBACK_ENV", "ConfigError", "UserError", "log_file", "rank", "relative_hint"]
