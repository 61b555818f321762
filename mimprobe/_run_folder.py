"""Output folders, one behaviour for every command that writes one (`claim_folder`): a file is refused, a folder
holding another run's (or anyone's) files is refused unless ``--overwrite``, which deletes the command's own files
and nothing else; all of it checked before anything is written. On top of it, for the training commands
(`mimprobe pretrain-mae`, `mimprobe refine`): ``--resume``, the per-step CSV log that a resume trims, and atomic
writes. `mimprobe compare` and `mimprobe run` decide what "another run" is (compare.json, spec.resolved.toml) and
claim their folders the same way.

* `prepare_run_folder`: a file is refused; a folder holding another run's files is refused unless ``resume``
  (continue from its checkpoint) or ``overwrite`` (its files are deleted first, nothing else); the two together are
  refused (they ask for opposite things); ``resume`` without a checkpoint (a run killed before its first one) starts
  afresh. Checked before anything is written.
* `CsvLog`: appends rows under a header written once; `truncate_after` drops the rows a resumed run will log again,
  so an interrupted and resumed run ends with the log of an uninterrupted one.
* `write_json_atomic`: writes beside the target and renames (`mimprobe._disk.replaced_atomically`): a kill or a
  full disk never leaves half a file, and a full disk is a one-line error naming the file and the space needed.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._disk import replaced_atomically
from .errors import BadInputError


def check_resume_overwrite(*, resume: bool, overwrite: bool) -> None:
    """``--resume`` and ``--overwrite`` ask for opposite things: refused together (checked with the options).

    Raises:
        BadInputError: Both given.
    """
    if resume and overwrite:
        raise BadInputError("use either --resume (continue the run in --out) or --overwrite (start it again), "
                            "not both")


def claim_folder(out: Path, *, occupied: str | None, overwrite: bool, own_entries: Sequence[str] = (),
                 advice: str = "choose another --out, or pass --overwrite", label: str = "--out",
                 create: bool = True) -> None:
    """Take ``out`` for a command's output, before anything is written.

    Args:
        out: The folder.
        occupied: What the folder already holds that belongs to someone else ("another refinement run (log.csv)"),
            or None when the command may write there.
        overwrite: The user's ``--overwrite``: write there anyway, deleting ``own_entries`` first.
        own_entries: The names (files or folders) the command writes in ``out``: the only things ``overwrite``
            deletes.
        advice: What the refusal tells the user to do.
        label: How messages name the folder (``--out``, ``run folder``).
        create: Create the folder and delete with ``overwrite`` (False on processes of a distributed run that do
            not own it: they only check).

    Raises:
        BadInputError: ``out`` is a file; ``occupied`` without ``overwrite``; a folder that cannot be written.
    """
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{label} {out} is a file: give a folder")
    if occupied and not overwrite:
        raise BadInputError(f"{label} {out} holds {occupied}: {advice}")
    if not create:
        return
    try:
        if overwrite:
            for name in own_entries:
                path = out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(f"cannot write to {label} {out}: {error.strerror or error}; choose a writable "
                            "folder") from None


def epoch_snapshots(out: Path) -> tuple[str, ...]:
    """The names of a run folder's per-epoch files (``checkpoint-{epoch}.*``, ``--save-every``): a previous run's
    files too, so ``--overwrite`` deletes them and a plain rerun is refused."""
    if not out.is_dir():
        return ()
    return tuple(sorted(path.name for path in out.glob("checkpoint-*.*")
                        if path.name.split(".", 1)[0].split("-", 1)[1].isdigit()))


def prepare_run_folder(out: Path, *, run_files: Sequence[str], checkpoint: str, what: str, resume: bool,
                       overwrite: bool, create: bool = True) -> bool:
    """Make ``out`` ready for a run; return whether it resumes from ``out / checkpoint``.

    Args:
        out: The run folder.
        run_files: The names a run writes there (another run is recognised by them; ``overwrite`` deletes them).
        checkpoint: The file ``resume`` continues from.
        what: The kind of run, for messages ("refinement run", "pre-training run").
        resume, overwrite: The user's options.
        create: Create the folder and delete the old files (False on the processes of a distributed run that do
            not own the folder: they only check).

    Raises:
        BadInputError: ``resume`` with ``overwrite``, ``out`` a file, another run's files without either option, or
            a folder that cannot be written.
    """
    check_resume_overwrite(resume=resume, overwrite=overwrite)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out} is a file: give a folder")
    if resume and (out / checkpoint).is_file():
        return True
    present = [name for name in run_files if (out / name).exists()]
    # --resume of a run killed before its first checkpoint starts afresh over its files
    claim_folder(out, occupied=f"another {what} ({', '.join(present)})" if present else None,
                 overwrite=overwrite or resume, own_entries=present, create=create,
                 advice="pass --resume to continue it, --overwrite to start again, or choose another --out")
    return False


class CsvLog:
    """Append rows to a CSV, writing the header once (``enabled`` False: a process that does not write)."""

    def __init__(self, path: Path, columns: Sequence[str], *, enabled: bool = True):
        self.path, self.columns, self.enabled = path, list(columns), enabled

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        new = not self.path.exists()
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            if new:
                writer.writeheader()
            writer.writerow(row)

    def truncate_after(self, step: int) -> None:
        """On resume, drop the rows logged after the checkpoint's step (they will be logged again)."""
        if not (self.enabled and self.path.exists()):
            return
        with self.path.open(newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= step]
        self.path.unlink()
        for row in rows:
            self.write(row)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON beside ``path`` and rename it into place, so a kill or a full disk never leaves half a file (a
    full disk raises `mimprobe._disk.DiskFullError`, the old file kept)."""
    data = (json.dumps(payload, indent=1) + "\n").encode()  # insertion order: splits keep their order
    with replaced_atomically(path, needed_bytes=len(data), suffix=".tmp") as tmp:
        tmp.write_bytes(data)
