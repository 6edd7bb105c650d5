"""Progress display for long stages (rich), silent when not attached to a terminal-like stream."""
from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class StageProgress:
    """One progress bar per stage; ``quiet`` turns every call into a no-op.

    A stage yields ``advance(n=1, status=None)``: ``status`` (e.g. a training loss) is shown after the bar.
    """

    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet

    @contextlib.contextmanager
    def stage(self, description: str, total: int | None = None) -> Iterator:
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
