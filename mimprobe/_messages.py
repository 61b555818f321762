"""One-line status messages and progress of the long-running commands (extract, profile, pretrain-mae, refine), all
on stderr: stdout keeps only results (``--json``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

PLAIN_EVERY_SECONDS = 30.0   # a plain progress line at most this often (DINO's MetricLogger prints every N steps)


def status_logger(log: Callable[[str], None] | None, *, progress: bool,
                  messages: list[str] | None = None) -> Callable[[str], None]:
    """A ``say(message)`` that records the message in ``messages`` (when given) and passes it to ``log``, or,
    without one, prints it on stderr (rich, no markup) when ``progress`` is on."""

    def say(message: str) -> None:
        if messages is not None:
            messages.append(message)
        if log is not None:
            log(message)
        elif progress:
            from rich.console import Console

            Console(stderr=True).print(message, markup=False, highlight=False)

    return say


def progress_display(make_rich: Callable[[Any], Any], *, enabled: bool, interactive: bool | None = None,
                     every: float = PLAIN_EVERY_SECONDS, write: Callable[[str], None] | None = None,
                     unit: str | None = None) -> Any:
    """The progress display of a long command: ``make_rich(console)`` (a rich ``Progress`` on ``console``, a rich
    Console on stderr) when stderr is a terminal, else a `PlainProgress` that prints one plain line now and then on
    stderr, as DINO's ``MetricLogger`` does in a log file.

    Args:
        make_rich: Builds the rich Progress on the console it is given (called only when it is shown, or disabled).
        enabled: Whether progress is wanted at all (False: the rich Progress, disabled).
        interactive: Whether the output is a terminal (default: rich's view of stderr, where the bars go).
        every: Seconds between plain lines.
        write: Where plain lines go (default: stderr, as the status messages).
        unit: What a task counts, when its rate should be shown (``"img"``: ``312 img/s``).
    """
    from rich.console import Console

    console = Console(stderr=True)
    if not enabled:
        return make_rich(console)
    if interactive is None:
        interactive = console.is_terminal
    if interactive:
        return make_rich(console)
    return PlainProgress(every=every, write=write, unit=unit)


class PlainProgress:
    """The subset of rich's ``Progress`` the trainers use (``add_task``, ``update``, ``advance``, a context), shown
    as plain lines: ``refine 120/585 (21 %)  loss 4.2113  lr 1.00e-04  312 img/s  elapsed 0:01:02  ETA 0:04:02``,
    at most every ``every`` seconds and once when a task completes."""

    def __init__(self, *, every: float = PLAIN_EVERY_SECONDS, write: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, unit: str | None = None) -> None:
        self.every, self.clock, self.unit = every, clock, unit
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        task = len(self.tasks)
        now = self.clock()
        self.tasks[task] = {"description": description, "total": total, "completed": completed, "start": now,
                            "start_completed": completed, "last": now, "fields": dict(fields)}
        return task

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, completed=self.tasks[task]["completed"] + advance)

    def update(self, task: int, *, completed: float | None = None, advance: float | None = None,
               description: str | None = None, **fields: Any) -> None:
        state = self.tasks[task]
        if completed is not None:
            state["completed"] = completed
        if advance is not None:
            state["completed"] += advance
        if description is not None:
            state["description"] = description
        state["fields"].update(fields)
        now = self.clock()
        done = state["total"] is not None and state["completed"] >= state["total"]
        if now - state["last"] >= self.every or (done and not state.get("reported_done")):
            state["last"] = now
            state["reported_done"] = done
            self.write(self.line(task))

    def line(self, task: int) -> str:
        """The plain line of a task now: count, share, its fields, elapsed time and the remaining time."""
        state = self.tasks[task]
        completed, total = state["completed"], state["total"]
        elapsed = self.clock() - state["start"]
        text = f"{state['description']} {completed:,.0f}" + (f"/{total:,.0f} ({100 * completed / total:.0f} %)"
                                                             if total else "")
        for name, value in state["fields"].items():
            if name in ("ips", "rate"):
                text += f"  {value} img/s"
            elif value not in (None, "--"):
                text += f"  {name} {value}"
        rate = (completed - state["start_completed"]) / elapsed if elapsed > 0 else 0.0
        if self.unit:
            text += f"  {rate:,.0f} {self.unit}/s"
        text += f"  elapsed {timedelta(seconds=round(elapsed))}"
        if total and rate > 0:
            text += f"  ETA {timedelta(seconds=round((total - completed) / rate))}"
        return text
