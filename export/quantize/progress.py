"""A rich progress bar around long iterations (calibration runs), shown only on an interactive terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_iter(items: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items`` while a transient rich progress bar counts them (silent when stderr is not a tty)."""
    if not sys.stderr.isatty():
        yield from items
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=total)
        for item in items:
            yield item
            bar.advance(task)
