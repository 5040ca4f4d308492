"""User-facing errors: a short message naming the problem and what to do about it."""

from __future__ import annotations


class ModelpressError(Exception):
    """An error caused by the user's input or environment; the CLI prints it without a traceback."""

    def __init__(self, problem: str, hint: str | None = None) -> None:
        self.problem = problem
        self.hint = hint
        super().__init__(problem if hint is None else f"{problem}\n  -> {hint}")
