"""What the commands show while they work: rich on a terminal, plain lines elsewhere (CI logs, pipes, files)."""

from __future__ import annotations

from typing import Any


def console(stderr: bool = True):
    """Messages are never wrapped (soft_wrap): a long path stays on one line in a log or a pipe."""
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True)


def progress(shown_on=None):
    """A rich progress bar on a terminal; elsewhere (CI logs, pipes, files) plain lines (``LineProgress``)."""
    shown_on = shown_on if shown_on is not None else console()
    if not shown_on.is_terminal:
        return LineProgress(shown_on)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=shown_on,
        transient=False,
    )


class LineProgress:
    """The part of ``rich.progress.Progress`` the commands use, as plain lines for consoles that are not terminals.

    A bar redrawn in place turns into one truncated line (or nothing) in a CI log; this prints
    ``description: step/total (pct%)  elapsed h:mm:ss  info`` each time a task crosses another ``every_percent`` of
    its total, at least every ``every_seconds`` (always, for tasks without a total), and once at the end.
    """

    def __init__(self, console, every_percent: float = 10.0, every_seconds: float = 30.0, clock=None):
        import time

        self.console, self.every_percent, self.every_seconds = console, every_percent, every_seconds
        self.clock = clock or time.monotonic
        self.tasks: list[dict[str, Any]] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task in self.tasks:
            if task["visible"] and task["completed"] and task["completed"] != task["printed"]:
                self._print(task)

    def add_task(self, description: str, total: float | None = None, info: str = "", visible: bool = True, **_):
        now = self.clock()
        self.tasks.append(
            dict(description=description, total=total, completed=0, info=info, visible=visible, start=now)
        )
        self.tasks[-1].update(last=now, bucket=0, printed=0)
        return len(self.tasks) - 1

    def update(self, task_id: int, *, total=None, completed=None, advance=None, info=None, visible=None, **_):
        task = self.tasks[task_id]
        for key, value in (("total", total), ("completed", completed), ("info", info), ("visible", visible)):
            if value is not None:
                task[key] = value
        if advance is not None:
            task["completed"] += advance
        if not task["visible"]:
            return
        now, done, total = self.clock(), task["completed"], task["total"]
        bucket = int(100 * done / total // self.every_percent) if total else 0
        if bucket > task["bucket"] or (total and done >= total and task["printed"] != done):
            self._print(task, bucket)
        elif now - task["last"] >= self.every_seconds and done != task["printed"]:
            self._print(task, bucket)

    def _print(self, task: dict[str, Any], bucket: int | None = None) -> None:
        now = self.clock()
        elapsed = int(now - task["start"])
        clock = f"{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}"
        done, total = task["completed"], task["total"]
        count = f"{done:g}/{total:g} ({100 * done / total:.0f}%)" if total else f"{done:g}"
        line = f"{task['description']}: {count}  elapsed {clock}  {task['info']}".rstrip()
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        task.update(last=now, printed=done, bucket=task["bucket"] if bucket is None else bucket)


def loss_info(m: dict) -> str:
    """``loss 0.123``, after the phase when the pre-training reports one (``tokenizer``, ``model``)."""
    return " ".join(filter(None, (m.get("phase"), f"loss {m['loss']:.3f}")))
