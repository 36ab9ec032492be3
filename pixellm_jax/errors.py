"""Errors the user can fix (bad input files, unwritable outputs): the CLI reports them in one line.

`pixellm` prints a `UserError` as `pixellm <command>: <message>` and exits with its `exit_code`
(`--debug` shows the traceback instead), so the message alone must name the file at fault and what
was expected.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class UserError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = 2  # the `pixellm` exit status


class OutputError(UserError):
    """An output file or directory that cannot be written (permissions, full disk, a file in the way)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path = str(path)
        self.reason = reason


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an OSError raised while writing `path` (or a file in it) into an OutputError naming the file."""
    try:
        yield
    except OSError as e:
        raise OutputError(e.filename or path, e.strerror or str(e)) from e
