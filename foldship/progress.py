"""Progress display for long stages (rich), silent when not attached to a terminal-like stream, and
the time each stage took (wall clock and this process's CPU time, user and system)."""
from __future__ import annotations

import contextlib
import resource
import time
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class StageProgress:
    """One progress bar per stage (``quiet``: none); every stage's times go to ``timings``, in order.

    A stage yields ``advance(n=1, status=None)``: ``status`` (e.g. a training loss) is shown after the bar.
    """

    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.timings: list[dict] = []

    @contextlib.contextmanager
    def stage(self, description: str, total: int | None = None) -> Iterator:
        start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        try:
            with self._bar(description, total) as advance:
                yield advance
        finally:
            end = resource.getrusage(resource.RUSAGE_SELF)
            self.timings.append({"stage": description, "wall_s": round(time.perf_counter() - start, 2),
                                 "user_s": round(end.ru_utime - usage.ru_utime, 2),
                                 "sys_s": round(end.ru_stime - usage.ru_stime, 2)})

    @contextlib.contextmanager
    def _bar(self, description: str, total: int | None) -> Iterator:
        if self.quiet:
            yield lambda n=1, status=None: None
            return
        columns = [TextColumn("[bold]{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[status]}")]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(description, total=total, status="")

            def advance(n: int = 1, status: str | None = None) -> None:
                progress.update(task, advance=n, **({} if status is None else {"status": status}))

            yield advance
            done = progress.tasks[0].completed
            progress.update(task, total=max(done, 1), completed=max(done, 1))
