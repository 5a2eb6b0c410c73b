"""User-facing errors: one line that names the thing and says what to do."""

from __future__ import annotations


class WanrenderError(Exception):
    """An error caused by input (a file, a flag, a request) that the user can fix.

    The CLI prints ``str(err)`` on one line without a traceback.
    """


class ModelFileError(WanrenderError):
    """A model file is missing, unreadable, of the wrong kind or incomplete."""

    def __init__(self, path: object, problem: str, fix: str) -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.path}: {problem} — {fix}")
