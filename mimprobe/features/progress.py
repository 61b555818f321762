"""Which batches of a store are written, alone or by several ranks, so that any interrupted run resumes (with any
number of processes) and ends byte-identical to one uninterrupted process.

Batch ``b`` of a split holds rows ``[b * batch_size, min((b + 1) * batch_size, rows))``: the store's own batch
size, so a resumed or distributed run feeds the model the very batches of a one-process run.

The manifest records done batches as ``progress`` (rows of the completely written prefix of each split, as a
one-process run always had) plus, only while holes remain, ``batches_done``: intervals ``[first, stop)`` of batch
indices done beyond that prefix.

Several ranks (torchrun) never write the manifest while they run, since they share no memory and perhaps no
machine: rank 0 writes the plan's seed into the manifest before the ranks start (``distributed``: a random
``attempt`` token and the ``world_size``). Every rank derives the same plan from that manifest: the pending
(split, batch) items in order, item ``i`` to rank ``i % world_size``. Each rank records how many of its items it
has finished in its own small file, ``progress.rank{R}.json`` (written atomically after the batch's rows). At the
end, or when a killed run is resumed, rank 0 (or the one process) folds these files into the manifest
(`consolidate`); a file of another attempt (left by a kill between the fold and its deletion) is ignored.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from .store import write_json_atomic

RANK_FILE = "progress.rank{rank}.json"

Item = tuple[str, int]  # (split, batch index)


def num_batches(rows: int, batch_size: int) -> int:
    return -(-rows // batch_size)


def batch_rows(batch: int, batch_size: int, rows: int) -> range:
    """The dataset rows of one batch."""
    return range(batch * batch_size, min((batch + 1) * batch_size, rows))


def done_batches(manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per split, a (batches,) bool array: True for the batches the manifest records as written."""
    size = manifest["batch_size"]
    done = {}
    for split, rows in manifest["dataset"]["splits"].items():
        flags = np.zeros(num_batches(rows, size), dtype=bool)
        flags[:num_batches(manifest["progress"][split], size)] = True
        for first, stop in manifest.get("batches_done", {}).get(split, []):
            flags[first:stop] = True
        done[split] = flags
    return done


def record(manifest: dict[str, Any], done: dict[str, np.ndarray]) -> None:
    """Write ``done`` into the manifest: ``progress`` (the done prefix in rows) and ``batches_done`` (the
    intervals beyond it; the field is absent when there are none, as in a one-process run)."""
    size, extra = manifest["batch_size"], {}
    for split, rows in manifest["dataset"]["splits"].items():
        flags = done[split]
        prefix = int(np.argmin(flags)) if not flags.all() else len(flags)
        manifest["progress"][split] = min(prefix * size, rows)
        beyond = np.concatenate([[False], flags[prefix:], [False]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(beyond))
        if len(edges):
            extra[split] = [[prefix + int(a), prefix + int(b)] for a, b in zip(edges[::2], edges[1::2])]
    if extra:
        manifest["batches_done"] = extra
    else:
        manifest.pop("batches_done", None)


def pending(manifest: dict[str, Any]) -> list[Item]:
    """The batches still to write, split by split (the store's split order) and in batch order."""
    return [(split, int(batch)) for split, flags in done_batches(manifest).items()
            for batch in np.flatnonzero(~flags)]


def rank_items(manifest: dict[str, Any], rank: int, world_size: int) -> list[Item]:
    """This rank's share of the pending batches: every ``world_size``-th, from the ``rank``-th."""
    return pending(manifest)[rank::world_size]


def rank_file(store_dir: Path, rank: int) -> Path:
    return store_dir / RANK_FILE.format(rank=rank)


def rank_files(store_dir: Path) -> list[Path]:
    return sorted(store_dir.glob(RANK_FILE.format(rank="*")))


def write_rank_progress(store_dir: Path, manifest: dict[str, Any], rank: int, done: int,
                        bad_images: list[dict[str, Any]]) -> None:
    """Record that this rank has written its first ``done`` items of the manifest's attempt."""
    write_json_atomic(rank_file(store_dir, rank), {"attempt": manifest["distributed"]["attempt"], "rank": rank,
                                                   "done": done, "bad_images": bad_images})


def start_attempt(manifest: dict[str, Any], world_size: int) -> None:
    """Seed a new distributed attempt (the caller writes the manifest before any rank starts)."""
    manifest["distributed"] = {"attempt": secrets.token_hex(8), "world_size": world_size}


def consolidate(store_dir: Path, manifest: dict[str, Any]) -> bool:
    """Fold the rank files of the manifest's attempt into its ``progress``/``batches_done``/``bad_images`` and end
    the attempt (in the dict; the caller writes it, then calls `remove_rank_files`). Returns whether the manifest
    changed."""
    attempt = manifest.get("distributed")
    if not attempt:
        return False
    done = done_batches(manifest)
    items = pending(manifest)  # the attempt's plan: the manifest is not written while its ranks run
    world_size = int(attempt["world_size"])
    bad = list(manifest["bad_images"])
    for path in rank_files(store_dir):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # cannot happen with atomic writes; a stray file records nothing
        if entry.get("attempt") != attempt["attempt"] or not 0 <= int(entry.get("rank", -1)) < world_size:
            continue
        for split, batch in items[int(entry["rank"])::world_size][:int(entry["done"])]:
            done[split][batch] = True
        bad += entry.get("bad_images", [])
    order = {split: position for position, split in enumerate(manifest["dataset"]["splits"])}
    manifest["bad_images"] = sorted(bad, key=lambda e: (order[e["split"]], e["index"]))  # a one-process run's order
    record(manifest, done)
    del manifest["distributed"]
    return True


def remove_rank_files(store_dir: Path) -> None:
    for path in rank_files(store_dir):
        path.unlink(missing_ok=True)


__all__ = ["batch_rows", "consolidate", "done_batches", "num_batches", "pending", "rank_items", "record",
           "remove_rank_files", "start_attempt", "write_rank_progress"]
