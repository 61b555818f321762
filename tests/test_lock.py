"""The store lock: mutual exclusion between processes, waiting or refusing with the holder's pid, and taking
over the lock of a killed holder."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from mimprobe._lock import LockedError, exclusive_lock, read_holder

FORK = multiprocessing.get_context("fork")


def _hold(path: str, seconds: float, held, release_at_exit: bool = True) -> None:
    with exclusive_lock(path, what="the test store"):
        held.set()
        time.sleep(seconds)
        if not release_at_exit:
            os.kill(os.getpid(), signal.SIGKILL)  # dies holding the lock, as a killed run does


def _start_holder(path: Path, seconds: float, release_at_exit: bool = True):
    held = FORK.Event()
    process = FORK.Process(target=_hold, args=(str(path), seconds, held, release_at_exit))
    process.start()
    assert held.wait(30)
    return process


def test_a_held_lock_refuses_naming_the_pid_or_waits_with_a_message(tmp_path):
    lock = tmp_path / ".store.lock"
    holder = _start_holder(lock, 1.0)
    assert read_holder(lock)["pid"] == holder.pid
    with pytest.raises(LockedError, match=rf"being written by pid {holder.pid} on .*: wait for that run .*--no-wait"):
        with exclusive_lock(lock, what="the test store", wait=False):
            pass
    messages: list[str] = []
    started = time.monotonic()
    with exclusive_lock(lock, what="the test store", say=messages.append) as previous:
        waited = time.monotonic() - started
        assert read_holder(lock)["pid"] == os.getpid()
    holder.join()
    assert waited > 0.3 and holder.exitcode == 0
    assert previous == {}  # the holder released it cleanly
    assert len(messages) == 1 and messages[0].startswith(f"waiting for pid {holder.pid} on ")
    assert read_holder(lock) == {}  # released: emptied, not deleted


def test_the_lock_of_a_killed_holder_is_taken_over_at_once(tmp_path):
    lock = tmp_path / ".store.lock"
    holder = _start_holder(lock, 0.0, release_at_exit=False)
    holder.join()
    assert holder.exitcode == -signal.SIGKILL
    assert read_holder(lock)["pid"] == holder.pid  # the file still names the dead holder
    messages: list[str] = []
    started = time.monotonic()
    with exclusive_lock(lock, what="the test store", wait=False, say=messages.append) as previous:
        assert time.monotonic() - started < 5
    assert previous["pid"] == holder.pid
    assert messages == [f"taking over the lock of pid {holder.pid} on {previous['host']} since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(previous['started']))} UTC, which ended "
                        "without releasing it (killed?); continuing from what it recorded in the test store"]


def _increment(path: str, counter: str, times: int) -> None:
    for _ in range(times):
        with exclusive_lock(path, what="the counter"):
            value = int(Path(counter).read_text())
            time.sleep(0.002)  # widen the read-modify-write window
            Path(counter).write_text(str(value + 1))


def test_processes_take_turns(tmp_path):
    """Read-modify-write of a counter by 4 processes: without mutual exclusion, increments are lost."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    workers = [FORK.Process(target=_increment, args=(str(tmp_path / ".lock"), str(counter), 25)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0] * 4
    assert int(counter.read_text()) == 100
