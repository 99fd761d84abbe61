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


@contextlib.contextmanager
def data_loading(description: str, quiet: bool = False) -> Iterator[dict]:
    """The `progress` and `note` arguments of memaudit.data.load_dataset for a command: a bar that appears once
    a folder starts decoding (an array file shows none), and notes printed beside it; nothing with `quiet`."""
    if quiet:
        yield {"progress": None, "note": None}
        return
    with progress_tracker() as tracker:
        advance: list = []

        def progress(done: int, total: int) -> None:
            if not advance:
                advance.append(tracker.task(description, total))
            advance[0](done)

        def note(line: str) -> None:
            tracker.progress.console.print(line, markup=False, highlight=False)

        yield {"progress": progress, "note": note}
