"""Rich progress bars for every long loop; silent when `quiet` is set."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressTracker:
    """Creates one rich task per long loop and returns an `advance_to(done)` callback for it."""

    def __init__(self, console: Optional[Console] = None, quiet: bool = False, transient: bool = False):
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console or Console(stderr=True), disable=quiet, transient=transient,
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
    """The `progress` and `note` arguments of memaudit.data.load_dataset for a command: a transient bar (gone
    once the load ends, so a failed load leaves only its one-line error) that starts with a folder's first
    progress report (an array file shows none), and notes printed beside it; nothing with `quiet`, and no bar
    when stderr is not a terminal (rich would leave a blank line there, before an error too)."""
    if quiet:
        yield {"progress": None, "note": None}
        return
    show_bar = _interactive()
    with contextlib.ExitStack() as stack:
        bar: list = []  # (tracker, advance) once started

        def progress(done: int, total: int) -> None:
            if not show_bar:
                return
            if not bar:
                tracker = stack.enter_context(ProgressTracker(transient=True))
                bar.append((tracker, tracker.task(description, total)))
            bar[0][1](done)

        def note(line: str) -> None:
            console = bar[0][0].progress.console if bar else Console(stderr=True)
            console.print(line, markup=False, highlight=False)

        yield {"progress": progress, "note": note}


def _interactive() -> bool:
    """Whether stderr is a terminal (where a transient bar can be drawn and erased)."""
    return Console(stderr=True).is_terminal
