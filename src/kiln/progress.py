"""Progress display for long work: a rich progress bar on a terminal, periodic lines otherwise."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

T = TypeVar("T")
console = Console(highlight=False, soft_wrap=True)


def table_console() -> Console:
    """The console for wide tables: a terminal's own width, 180 columns into a file or pipe."""
    return console if console.is_terminal else Console(highlight=False, width=180)


def quiet() -> bool:
    """Only the first process of a distributed job talks."""
    return os.environ.get("RANK", "0") != "0" or os.environ.get("KILN_QUIET") == "1"


class _Rate(ProgressColumn):
    """The task's speed in its unit per second (rich's own speed columns assume bytes)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:,.1f} {self.unit}/s" if task.speed else "")


class _ExtraRate(ProgressColumn):
    """A second count's rate (e.g. tokens written while megabytes are read), from the task's fields."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        count = task.fields.get("extra", 0.0)
        return Text(f"{count / elapsed:,.0f} {self.unit}/s" if elapsed > 0 and count else "")


def progress_bar(
    items: Iterable[T],
    description: str,
    unit: str = "items",
    every_s: float = 10.0,
    weight: Callable[[T], float] | None = None,
    total: float | None = None,
    extra: tuple[Callable[[], float], str] | None = None,
) -> Iterator[T]:
    """Yield `items`, showing a bar on a terminal or a line every `every_s` seconds elsewhere, with
    the rate and an ETA. `weight(item)`: how much of `total` an item is (e.g. megabytes of text);
    by default each item counts 1 and the total is `len(items)`. `extra` = (count, unit): a second
    running count whose rate is shown too (tokens written while text is read)."""
    if total is None and weight is None and isinstance(items, Sized):
        total = len(items)
    if quiet():
        yield from items
        return
    size = weight or (lambda _: 1.0)
    if sys.stderr.isatty() or console.is_terminal:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn() if weight is None else TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
            TextColumn(unit),
            _Rate(unit),
            *([_ExtraRate(extra[1])] if extra else []),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                if extra:
                    bar.update(task, advance=size(item), extra=extra[0]())
                else:
                    bar.advance(task, size(item))
        return
    last = time.perf_counter()
    start = last
    done = 0.0
    for item in items:
        yield item
        done += size(item)
        now = time.perf_counter()
        if now - last >= every_s:
            last = now
            rate = done / (now - start)
            eta = f", ETA {format_seconds((total - done) / rate)}" if total and rate else ""
            also = f", {extra[0]() / (now - start):,.0f} {extra[1]}/s" if extra else ""
            of = f"{total:,.0f}" if total else "?"
            print(f"{description}: {done:,.0f}/{of} {unit} ({rate:,.1f} {unit}/s{also}){eta}", flush=True)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
