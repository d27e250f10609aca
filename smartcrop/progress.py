"""Progress display: a rich progress bar on a terminal (stderr), nothing at all when piped."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def stderr_is_tty() -> bool:
    return is_tty(sys.stderr)


class _NullBar:
    def advance(self, n: int = 1, **fields) -> None:
        pass

    def update(self, **fields) -> None:
        pass


class _RichBar:
    def __init__(self, progress, task):
        self._p, self._t = progress, task

    def advance(self, n: int = 1, **fields) -> None:
        self._p.update(self._t, advance=n, **fields)

    def update(self, **fields) -> None:
        self._p.update(self._t, **fields)


@contextmanager
def progress_bar(total: int | None, description: str, enabled: bool | None = None, status: bool = False):
    """Context manager yielding a bar with ``advance(n, status=...)``; a no-op bar when not on a TTY.

    With ``status=True`` a free text field (``status=...`` in ``advance``/``update``) is shown, e.g. the loss.
    """
    if enabled is None:
        enabled = stderr_is_tty()
    if not enabled:
        yield _NullBar()
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn()]
    if status:
        cols.append(TextColumn("{task.fields[status]}"))
    # the bar draws on stderr; what the run prints to stdout (--json, --dry-run lines) goes around it only when
    # stdout is that terminal too: redirected (> out.jsonl, | jq) it must stay on stdout, not join the bar
    with Progress(*cols, console=Console(stderr=True), transient=True, redirect_stdout=is_tty(sys.stdout)) as p:
        task = p.add_task(description, total=total, status="")
        yield _RichBar(p, task)


def track(items: Iterable[T], total: int | None, description: str, enabled: bool | None = None) -> Iterator[T]:
    with progress_bar(total, description, enabled) as bar:
        for it in items:
            yield it
            bar.advance()
