"""Progress bars on stderr (hidden when stderr is not a terminal)."""
from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn, MofNCompleteColumn)

stderr = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def bytes_progress(label: str):
    """Yields progress(total) → advance(nbytes), the shape build() takes."""
    cols = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*cols, console=stderr, transient=True, disable=not stderr.is_terminal) as p:
        def start(total):
            task = p.add_task(label, total=total)
            return lambda n: p.advance(task, n)
        yield start


@contextlib.contextmanager
def steps_progress(label: str, total: int):
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*cols, console=stderr, transient=True, disable=not stderr.is_terminal) as p:
        task = p.add_task(label, total=total)
        yield lambda desc=None: p.update(task, advance=1, **({"description": desc} if desc else {}))


@contextlib.contextmanager
def status(label: str):
    """A spinner with `label` on stderr while a step without a measurable total runs (a terminal only)."""
    if stderr.is_terminal:
        with stderr.status(label):
            yield
    else:
        yield


def notice(text: str) -> None:
    stderr.print(f"[yellow]note:[/] {text}", highlight=False, markup=True)
