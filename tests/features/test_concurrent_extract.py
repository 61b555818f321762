"""Two extractions into the same store at once: they take turns, and every store ends byte-identical to a single
run; `--no-wait` refuses naming the holder's pid; a killed run's lock is taken over and its store resumed."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
from pathlib import Path

import pytest

from mimprobe import extract
from mimprobe._lock import exclusive_lock, read_holder
from mimprobe.errors import BadInputError
from mimprobe.features.store import MANIFEST

FORK = multiprocessing.get_context("fork")
DATA = "synthetic:classes=3,train=8,test=4,size=16"  # 24 train and 12 test images
OPTIONS = dict(img_size=32, batch_size=4, pool=("cls", "mean"), progress=False)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file's bytes; the manifest's git sha is masked (other work may commit while the test runs)."""
    files = {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}
    files[MANIFEST] = re.sub(rb'"git": "[0-9a-f]+"', b'"git": ""', files[MANIFEST])
    return files


def _extract_after(barrier, out: str, report, slow: bool) -> None:
    import time

    import torch

    torch.set_num_threads(1)  # see _killed_mid_way: no parallel region of the parent's OpenMP pool in a fork
    messages: list[str] = []
    barrier.wait(60)
    try:
        result = extract("test_vit", DATA, out=out, log=messages.append, **OPTIONS,
                         on_batch=(lambda *args: time.sleep(0.1)) if slow else None)
        report.put((os.getpid(), "ok", result.reused, result.images, messages))
    except Exception as error:  # reported to the test, which fails on it
        report.put((os.getpid(), f"{type(error).__name__}: {error}", None, 0, messages))


@pytest.mark.slow  # 8 trials of two processes racing for one store (5 s); CI runs it
def test_eight_concurrent_pairs_end_byte_identical_to_a_single_run(tmp_path):
    reference = extract("test_vit", DATA, out=tmp_path / "single", **OPTIONS).store
    expected = _tree_bytes(reference.path)
    for trial in range(8):
        out = tmp_path / f"pair{trial}"
        barrier, report = FORK.Barrier(2), FORK.Queue()
        pair = [FORK.Process(target=_extract_after, args=(barrier, str(out), report, True)) for _ in range(2)]
        for process in pair:
            process.start()
        results = [report.get(timeout=240) for _ in pair]
        for process in pair:
            process.join(60)
        assert [process.exitcode for process in pair] == [0, 0]
        assert [status for _, status, *_ in results] == ["ok", "ok"], results
        # one run extracted all 36 images, the other waited for it and then reused its store
        assert sorted((reused, images) for _, _, reused, images, _ in results) == [(False, 36), (True, 0)]
        waiter = next(messages for _, _, reused, _, messages in results if reused)
        writer_pid = next(pid for pid, _, reused, _, _ in results if not reused)
        assert any(m.startswith(f"waiting for pid {writer_pid} on ") for m in waiter), waiter
        assert _tree_bytes(out / reference.path.name) == expected
        assert read_holder(out / f".{reference.path.name}.lock") == {}


def test_no_wait_refuses_naming_the_pid_and_writes_nothing(tmp_path):
    reference = extract("test_vit", DATA, out=tmp_path / "single", **OPTIONS).store
    out = tmp_path / "busy"
    out.mkdir()
    lock = out / f".{reference.path.name}.lock"
    with exclusive_lock(lock, what="held by the test"):
        with pytest.raises(BadInputError, match=rf"feature store .* is being written by pid {os.getpid()} on "):
            extract("test_vit", DATA, out=out, wait=False, **OPTIONS)
    assert [path.name for path in out.iterdir()] == [lock.name]


def _killed_mid_way(out: str) -> None:
    import torch

    # A forked child must not enter an OpenMP parallel region of the parent's pool (libgomp is not fork-safe once
    # its threads exist: the child waits on a futex forever, as CI saw with torch's default 2 threads).
    torch.set_num_threads(1)

    def die(split: str, done: int, total: int) -> None:
        if split == "train" and done == 12:
            os.kill(os.getpid(), signal.SIGKILL)

    extract("test_vit", DATA, out=out, on_batch=die, **OPTIONS)


def test_a_killed_runs_lock_is_taken_over_and_its_store_resumed(tmp_path):
    reference = extract("test_vit", DATA, out=tmp_path / "single", **OPTIONS).store
    out = tmp_path / "killed"
    process = FORK.Process(target=_killed_mid_way, args=(str(out),))
    process.start()
    process.join(240)
    assert process.exitcode == -signal.SIGKILL
    assert read_holder(out / f".{reference.path.name}.lock")["pid"] == process.pid
    messages: list[str] = []
    result = extract("test_vit", DATA, out=out, wait=False, log=messages.append, **OPTIONS)
    assert result.resumed and result.images == 36 - 12
    assert messages[0].startswith(f"taking over the lock of pid {process.pid} on ")
    assert (out / reference.path.name / MANIFEST).is_file()
    assert _tree_bytes(result.store.path) == _tree_bytes(reference.path)
