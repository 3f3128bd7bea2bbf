"""Progress display for long work: a rich progress bar on a terminal, periodic lines otherwise."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")
console = Console(highlight=False, soft_wrap=True)


def table_console() -> Console:
    """The console for wide tables: a terminal's own width, 180 columns into a file or pipe."""
    return console if console.is_terminal else Console(highlight=False, width=180)


def quiet() -> bool:
    """Only the first process of a distributed job talks."""
    return os.environ.get("RANK", "0") != "0" or os.environ.get("KILN_QUIET") == "1"


def progress_bar(items: Iterable[T], description: str, unit: str = "items", every_s: float = 10.0) -> Iterator[T]:
    """Yield `items`, showing a bar on a terminal or a line every `every_s` seconds elsewhere."""
    total = len(items) if isinstance(items, Sized) else None
    if quiet():
        yield from items
        return
    if sys.stderr.isatty() or console.is_terminal:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    last = time.perf_counter()
    start = last
    for i, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last >= every_s:
            last = now
            rate = i / (now - start)
            eta = f", ETA {format_seconds((total - i) / rate)}" if total else ""
            print(f"{description}: {i}/{total or '?'} {unit}{eta}", flush=True)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
