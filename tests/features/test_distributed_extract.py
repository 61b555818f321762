"""Extraction across processes (torchrun, gloo on CPU): byte-identical to one process, and resumable after a
SIGKILL of the whole launch with the same or another number of processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mimprobe import extract
from mimprobe.features import progress as batch_progress
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
SLOW_EXTRACT = Path(__file__).with_name("slow_extract.py")
DATA = "synthetic:classes=3,train=7,test=3,size=16"   # 21 + 9 rows: batches of 4 end with a short one
OPTIONS = dict(img_size=32, batch_size=4, pool=("cls", "mean"), progress=False)
CLI_OPTIONS = ["--img-size", "32", "--batch-size", "4", "--pool", "cls,mean", "--no-progress"]


def _torchrun(out: Path, dtype: str, nproc: int = 2, *, delay: float = 0.0, extra: tuple[str, ...] = (),
              **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    program = [str(SLOW_EXTRACT), str(delay)] if delay else ["-m", "mimprobe.cli"]  # paused: killable mid-way
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), *program, "extract", "test_vit", DATA,
               "--out", str(out), "--store-dtype", dtype, "--json", *CLI_OPTIONS, *extra]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def _reference(out: Path, dtype: str):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun processes (OMP_NUM_THREADS=1): the same kernels
    try:
        return extract("test_vit", DATA, out=out, store_dtype=dtype, **OPTIONS).store
    finally:
        torch.set_num_threads(threads)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file's bytes; the manifest's git sha is masked (other work may commit while the test runs)."""
    files = {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}
    files["manifest.json"] = re.sub(rb'"git": "[0-9a-f]+"', b'"git": ""', files["manifest.json"])
    return files


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.distributed  # a torchrun launch of gloo processes
def test_two_processes_write_the_bytes_of_one(tmp_path, dtype):
    reference = _reference(tmp_path / "one", dtype)
    process = _torchrun(tmp_path / "two", dtype)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    summary = json.loads(stdout)  # rank 0 alone prints
    assert summary["images_processed"] == 30 and summary["complete"]
    assert "2 processes extract 9 batches" in stderr
    store = tmp_path / "two" / reference.path.name
    assert Path(summary["store"]).resolve() == store.resolve()
    assert _tree_bytes(store) == _tree_bytes(reference.path)  # no progress files left, the same manifest


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own, so killpg misses them)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _rank_done(store: Path) -> list[int]:
    done = []
    for path in batch_progress.rank_files(store):
        try:
            done.append(json.loads(path.read_text())["done"])
        except (OSError, ValueError, KeyError):
            pass
    return done


@pytest.mark.parametrize("resume_processes", [2, 1])
@pytest.mark.distributed  # a torchrun launch of gloo processes
def test_a_killed_two_process_run_resumes_byte_identical(tmp_path, resume_processes):
    dtype = "float16"
    reference = _reference(tmp_path / "one", dtype)
    store = tmp_path / "run" / reference.path.name
    # paused 0.4 s after each recorded batch (tests/features/slow_extract.py) so that the kill lands mid-way
    process = _torchrun(tmp_path / "run", dtype, delay=0.4)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        done = _rank_done(store)
        if len(done) == 2 and min(done) >= 1 and sum(done) >= 3:
            break
        time.sleep(0.01)
    assert process.poll() is None, process.communicate()[1]
    for pid in [*_descendants(process.pid), process.pid]:  # both workers and the agent, as a lost node would
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.communicate()
    manifest = json.loads((store / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["distributed"]["world_size"] == 2
    assert sum(manifest["progress"].values()) == 0  # ranks never write the manifest while they run
    recorded = sum(_rank_done(store))
    assert 3 <= recorded < 9
    folded = json.loads(json.dumps(manifest))
    assert batch_progress.consolidate(store, folded)  # what the resumed run will find recorded (not written here)
    rows_recorded = sum(len(batch_progress.batch_rows(int(b), 4, folded["dataset"]["splits"][split]))
                        for split, flags in batch_progress.done_batches(folded).items() for b in np.flatnonzero(flags))
    if resume_processes == 2:
        resumed = _torchrun(tmp_path / "run", dtype)
        stdout, stderr = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, stderr
        images = json.loads(stdout)["images_processed"]
        assert "resuming feature store" in stderr
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = extract("test_vit", DATA, out=tmp_path / "run", store_dtype=dtype, **OPTIONS)
        finally:
            torch.set_num_threads(threads)
        assert result.resumed
        images = result.images
    assert images == 30 - rows_recorded  # only the batches no rank had recorded were run again
    assert _tree_bytes(store) == _tree_bytes(reference.path)


def test_done_batches_round_trip_with_holes():
    manifest = {"batch_size": 4, "dataset": {"splits": {"train": 21, "test": 9}},
                "progress": {"train": 0, "test": 0}, "bad_images": []}
    done = batch_progress.done_batches(manifest)
    assert [len(flags) for flags in done.values()] == [6, 3]
    done["train"][[0, 1, 3, 5]] = True
    done["test"][[2]] = True
    batch_progress.record(manifest, done)
    assert manifest["progress"] == {"train": 8, "test": 0}
    assert manifest["batches_done"] == {"train": [[3, 4], [5, 6]], "test": [[2, 3]]}
    assert batch_progress.pending(manifest) == [("train", 2), ("train", 4), ("test", 0), ("test", 1)]
    assert batch_progress.rank_items(manifest, 1, 3) == [("train", 4)]
    again = batch_progress.done_batches(manifest)
    assert all(np.array_equal(again[s], done[s]) for s in done)
    for split in done:
        done[split][:] = True
    batch_progress.record(manifest, done)
    assert manifest["progress"] == {"train": 21, "test": 9} and "batches_done" not in manifest


def test_consolidate_folds_rank_files_of_the_attempt_only(tmp_path):
    manifest = {"batch_size": 4, "dataset": {"splits": {"train": 21, "test": 9}},
                "progress": {"train": 4, "test": 0}, "bad_images": []}
    batch_progress.start_attempt(manifest, 2)
    # pending: train 1..5, test 0..2 -> rank 0: train 1, 3, 5, test 1; rank 1: train 2, 4, test 0, 2
    bad = {"split": "train", "index": 20, "image": "x", "error": "e"}  # row 20: train batch 5
    batch_progress.write_rank_progress(tmp_path, manifest, 0, 3, [bad])
    batch_progress.write_rank_progress(tmp_path, manifest, 1, 1, [])
    # left by an attempt already folded in (killed before its files were removed): ignored
    (tmp_path / "progress.rank7.json").write_text(json.dumps({"attempt": "another", "rank": 1, "done": 4}))
    assert batch_progress.consolidate(tmp_path, manifest)
    assert "distributed" not in manifest
    assert manifest["progress"] == {"train": 16, "test": 0}      # train 0-3 done: rows 0-15
    assert manifest["batches_done"] == {"train": [[5, 6]]}
    assert manifest["bad_images"] == [bad]
    assert batch_progress.pending(manifest) == [("train", 4), ("test", 0), ("test", 1), ("test", 2)]


@pytest.mark.distributed  # a torchrun launch of gloo processes
def test_rank_0_refusing_stops_every_rank(tmp_path):
    """--no-wait while another run holds the store's lock: rank 0 refuses (exit 2, naming the holder) and the other
    rank stops too (told by a collective) instead of waiting at a barrier; nothing is written."""
    from mimprobe._lock import exclusive_lock

    name = _reference(tmp_path / "one", "float32").path.name
    out = tmp_path / "two"
    out.mkdir()
    with exclusive_lock(out / f".{name}.lock", what="test holder", wait=False):
        process = _torchrun(out, "float32", extra=("--no-wait",))
        stdout, stderr = process.communicate(timeout=600)
    assert process.returncode != 0
    assert "is being written by pid" in stderr  # rank 0's one-line refusal (exit 2)
    assert "rank 1: stopping because rank 0 could not prepare" in stderr
    assert not (out / name).exists()


@pytest.mark.distributed  # a torchrun launch of gloo processes
def test_a_killed_one_process_run_resumes_with_two(tmp_path):
    dtype = "float32"
    reference = _reference(tmp_path / "one", dtype)
    store = tmp_path / "run" / reference.path.name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, str(SLOW_EXTRACT), "0.4", "extract", "test_vit", DATA, "--out",
                                str(tmp_path / "run"), "--store-dtype", dtype, *CLI_OPTIONS], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        try:
            if json.loads((store / "manifest.json").read_text())["progress"]["train"] >= 12:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    process.kill()
    process.wait()
    manifest = json.loads((store / "manifest.json").read_text())
    assert not manifest["complete"] and 12 <= manifest["progress"]["train"] < 21
    resumed = _torchrun(tmp_path / "run", dtype)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert json.loads(stdout)["images_processed"] == 30 - manifest["progress"]["train"]
    assert _tree_bytes(store) == _tree_bytes(reference.path)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has stopped; only its exit status is left


@pytest.mark.distributed  # a torchrun launch of gloo processes
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from Linux's /proc")
def test_killing_the_launcher_stops_its_workers(tmp_path):
    """`kill -9` of torchrun's agent: its workers, mid-extraction, get SIGTERM from the kernel and stop, instead of
    waiting in a collective for the 24 h timeout; the store then resumes as after any kill."""
    process = _torchrun(tmp_path / "run", "float32", delay=5.0)  # 5 s per batch: 15 s or more of work left
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        stores = list((tmp_path / "run").glob("test_vit__*"))
        if stores and len(_rank_done(stores[0])) == 2:  # both workers are writing
            break
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1]
    workers = [pid for pid in _descendants(process.pid) if _running(pid)]
    assert len(workers) >= 2

    process.kill()  # the launcher only
    process.wait()  # not communicate(): the workers hold the same output pipes open until they exit
    deadline = time.time() + 10  # orphaned workers would go on for 15 s or more, then wait in a collective
    while any(_running(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)

    still = [pid for pid in workers if _running(pid)]
    for pid in still:  # leave nothing behind if the test fails
        os.kill(pid, signal.SIGKILL)
    process.communicate()
    assert not still, f"workers {still} outlived their launcher"
