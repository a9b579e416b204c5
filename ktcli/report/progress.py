"""Progress bars on stderr (hidden when stderr is not a terminal)."""
from __future__ import annotations

import contextlib
import sys
import time

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
def steps_progress(label: str, total: int, every_s: float = 5.0):
    """A bar on a terminal; elsewhere (logs, CI, a pipe) a plain line at most every `every_s` seconds and at the
    end, so a long run is never silent."""
    if stderr.is_terminal:
        cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*cols, console=stderr, transient=True) as p:
            task = p.add_task(label, total=total)
            yield lambda desc=None: p.update(task, advance=1, **({"description": desc} if desc else {}))
        return
    t0, state = time.monotonic(), {"done": 0, "shown": time.monotonic()}

    def tick(desc=None):
        state["done"] += 1
        now = time.monotonic()
        if now - state["shown"] >= every_s or state["done"] == total:
            state["shown"] = now
            print(f"{label}: {state['done']}/{total} steps, {now - t0:.0f} s", file=sys.stderr, flush=True)
    yield tick


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


def preparing(engine, spinner: bool = True):
    """Around Engine.prepare(): with graphs on it runs a warm-up and captures the decode step. With runtime.compile
    the first one-token forward (that warm-up, or the first decoded token with graphs off) compiles each layer's
    attention, norms and router: about a second a layer, long enough that a silent wait looks like a hang."""
    if engine.built.profile.runtime.compile:
        notice("runtime.compile: the first decode step compiles each layer's attention, norms and router "
               "(about a second a layer, once per run)")
    if not spinner:   # inside another live display (bench's progress bar): rich allows one at a time
        return contextlib.nullcontext()
    return status("capturing the decode graph" if engine.mode != "off" else "preparing")
