"""Plain periodic progress lines when the output is not a terminal (DINO MetricLogger style)."""

from __future__ import annotations

import sys

from mimprobe._messages import PlainProgress, progress_display


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_come_every_period_with_rate_and_eta():
    clock, lines = Clock(), []
    bar = PlainProgress(every=30, write=lines.append, clock=clock)
    with bar:
        task = bar.add_task("refine", total=600, completed=0, loss="--", lr="--", ips="--")
        for step in range(1, 601):
            clock.now = step * 0.5  # 2 steps per second
            bar.update(task, completed=step, description="stage 1 ep 0", loss=f"{5 - step / 200:.4f}",
                       lr="1.00e-04", ips="128")
    # 300 s of work: a line every 30 s (10) and none extra at the end (the 300 s line is the completed one)
    assert len(lines) == 10
    assert lines[0] == ("stage 1 ep 0 60/600 (10 %)  loss 4.7000  lr 1.00e-04  128 img/s  elapsed 0:00:30  "
                        "ETA 0:04:30")
    assert lines[-1].startswith("stage 1 ep 0 600/600 (100 %)") and "ETA 0:00:00" in lines[-1]


def test_a_task_that_finishes_between_periods_reports_once_and_advance_counts():
    clock, lines = Clock(), []
    bar = PlainProgress(every=30, write=lines.append, clock=clock)
    task = bar.add_task("extract test", total=10)
    for _ in range(10):
        clock.now += 1
        bar.update(task, advance=1)
    bar.update(task, advance=0)
    assert lines == ["extract test 10/10 (100 %)  elapsed 0:00:10  ETA 0:00:00"]


def test_the_display_is_rich_on_a_terminal_and_plain_otherwise():
    rich = object()
    assert progress_display(lambda console: rich, enabled=True, interactive=True) is rich
    assert progress_display(lambda console: rich, enabled=False, interactive=False) is rich  # disabled: no-op
    assert isinstance(progress_display(lambda console: rich, enabled=True, interactive=False), PlainProgress)


def test_rich_bars_go_to_stderr():
    """stdout keeps only results (--json), as the plain lines and status messages do."""
    from rich.progress import Progress

    bar = progress_display(lambda console: Progress(console=console), enabled=True, interactive=True)
    assert bar.console.stderr and bar.console.file is sys.stderr


def test_a_counted_unit_shows_its_rate():
    clock, lines = Clock(), []
    bar = PlainProgress(every=10, write=lines.append, clock=clock, unit="img")
    task = bar.add_task("extract train", total=1000)
    for _ in range(5):
        clock.now += 10
        bar.update(task, advance=100)
    assert lines[0] == "extract train 100/1,000 (10 %)  10 img/s  elapsed 0:00:10  ETA 0:01:30"
    assert len(lines) == 5
