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


def shown(text: object) -> str:
    """``text`` (a path, a prompt) for a message: bytes that are not UTF-8 (lone
    surrogates from argv) as \\x escapes, so printing the message cannot fail."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_utf8(text: str, what: str) -> None:
    """Names and text end up in the UTF-8 JSON sidecar: bytes that are not UTF-8
    would fail there, after the work."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise WanrenderError(
            f"{what} '{shown(text)}' is not valid UTF-8 — rename it (or pass the text) in UTF-8"
        ) from None
