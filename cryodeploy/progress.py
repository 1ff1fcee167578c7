"""Progress bars for long work (rich), silenced by ``quiet``; one place so every command looks alike.

On a terminal a live rich bar; elsewhere (a log file, a batch job's output) one final line,
``<description>: <done>/<total> in <s> s <last fields>``, instead of a truncated bar.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Protocol

__all__ = ["ProgressTask", "progress"]


class ProgressTask(Protocol):
    """What long-running library code calls to report progress."""

    def advance(self, n: float = 1, **fields: object) -> None: ...


class _Silent:
    def advance(self, n: float = 1, **fields: object) -> None:
        return None


class _RichTask:
    def __init__(self, prog: object, task_id: object) -> None:
        self._prog = prog
        self._id = task_id

    def advance(self, n: float = 1, **fields: object) -> None:
        status = " ".join(f"{k}={v}" for k, v in fields.items())
        self._prog.update(self._id, advance=n, status=status)  # type: ignore[attr-defined]


class _PlainTask:
    def __init__(self, total: float | None) -> None:
        self.total, self.done, self.status = total, 0.0, ""

    def advance(self, n: float = 1, **fields: object) -> None:
        self.done += n
        self.status = " ".join(f"{k}={v}" for k, v in fields.items())


@contextlib.contextmanager
def progress(total: float | None, description: str, quiet: bool = False) -> Iterator[ProgressTask]:
    """A progress bar on stderr with ``description``; ``quiet`` gives a silent one."""
    if quiet:
        yield _Silent()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if not console.is_terminal:
        plain, start = _PlainTask(total), time.perf_counter()
        try:
            yield plain
        finally:
            of = f"/{plain.total:g}" if plain.total is not None else ""
            line = f"{description}: {plain.done:g}{of} in {time.perf_counter() - start:.1f} s {plain.status}"
            print(line.rstrip(), file=sys.stderr, flush=True)
        return
    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    )
    with prog:
        task_id = prog.add_task(description, total=total, status="")
        yield _RichTask(prog, task_id)
