"""Progress and log output on stderr (rich); stdout stays for results."""

from __future__ import annotations

import contextlib
import sys


def console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        sys.stderr.write(msg.rstrip("\n") + "\n")


@contextlib.contextmanager
def steps_bar(description: str, quiet: bool = False):
    """Yields a callback(done, total) that drives a rich progress bar on stderr."""
    if quiet or not sys.stderr.isatty():
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console(), transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
