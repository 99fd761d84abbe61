"""Rich progress bars for every long loop; silent when `quiet` is set."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressTracker:
    """Creates one rich task per long loop and returns an `advance_to(done)` callback for it."""

    def __init__(self, console: Optional[Console] = None, quiet: bool = False):
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console or Console(stderr=True), disable=quiet, transient=False,
        )

    def task(self, description: str, total: int) -> Callable[..., None]:
        """Add a task; the callback takes the number done so far and an optional info string."""
        task_id = self.progress.add_task(description, total=total, info="")

        def advance_to(done: int, info: str = "") -> None:
            self.progress.update(task_id, completed=done, info=info)

        return advance_to

    def __enter__(self) -> "ProgressTracker":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)


@contextlib.contextmanager
def progress_tracker(console: Optional[Console] = None, quiet: bool = False) -> Iterator[ProgressTracker]:
    tracker = ProgressTracker(console, quiet)
    with tracker:
        yield tracker
