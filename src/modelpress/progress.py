"""Progress and messages for long work; everything below the CLI reports through this, never print()."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Reporter:
    """Shows progress bars and log lines on stderr (rich), or nothing when quiet."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._console = None
        if not quiet:
            from rich.console import Console

            self._console = Console(stderr=True)

    def log(self, message: str) -> None:
        if self._console is not None:
            self._console.print(message, highlight=False)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        """Iterate with a progress bar."""
        if self._console is None:
            yield from items
            return
        from rich.progress import track

        yield from track(items, description=description, total=total, console=self._console, transient=True)

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        """A spinner for one long step without a known length."""
        if self._console is None:
            yield
            return
        with self._console.status(description):
            yield
        self._console.print(f"[green]done[/green] {description}", highlight=False)


QUIET = Reporter(quiet=True)
