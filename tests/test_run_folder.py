"""One behaviour of the training commands' run folders (`mimprobe._run_folder`): refine and pretrain-mae refuse
the same inputs with the same words, and a resume trims the CSV log to its checkpoint."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mimprobe._run_folder import CsvLog, claim_folder, prepare_run_folder
from mimprobe.cli import app
from mimprobe.errors import BadInputError

runner = CliRunner()
DATA = "synthetic:classes=2,train=8,test=2,size=16"


@pytest.mark.parametrize("command", [["refine", "test_vit", DATA, "--placement", "p.json"],
                                     ["pretrain-mae", "test_vit", DATA]])
def test_resume_with_overwrite_is_refused_alike_before_anything_is_written(command, tmp_path):
    result = runner.invoke(app, [*command, "--out", str(tmp_path / "run"), "--resume", "--overwrite"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: use either --resume (continue the run in --out) or --overwrite (start it "
                                     "again), not both")
    assert not (tmp_path / "run").exists()


def test_another_runs_files_are_kept_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.csv").write_text("step\n1\n")
    (out / "mine.txt").write_text("kept")
    with pytest.raises(BadInputError, match=r"holds another test run \(log.csv\): pass --resume"):
        prepare_run_folder(out, run_files=("log.csv", "ckpt"), checkpoint="ckpt", what="test run", resume=False,
                           overwrite=False)
    assert prepare_run_folder(out, run_files=("log.csv", "ckpt"), checkpoint="ckpt", what="test run", resume=True,
                              overwrite=False) is False  # nothing to resume from: starts afresh
    assert not (out / "log.csv").exists() and (out / "mine.txt").read_text() == "kept"
    (out / "ckpt").write_text("x")
    assert prepare_run_folder(out, run_files=("log.csv", "ckpt"), checkpoint="ckpt", what="test run", resume=True,
                              overwrite=False) is True
    (out / "file").write_text("")
    with pytest.raises(BadInputError, match="is a file"):
        prepare_run_folder(out / "file", run_files=(), checkpoint="ckpt", what="test run", resume=False,
                           overwrite=False)


def test_csv_log_truncates_to_the_resumed_step(tmp_path):
    log = CsvLog(tmp_path / "log.csv", ["step", "loss"])
    for step in range(1, 6):
        log.write({"step": step, "loss": 1 / step})
    log.truncate_after(3)
    log.write({"step": 4, "loss": 0.25})
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0] == "step,loss" and [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3", "4"]
    quiet = CsvLog(tmp_path / "other.csv", ["step"], enabled=False)
    quiet.write({"step": 1})
    assert not (tmp_path / "other.csv").exists()


def test_claim_folder_overwrite_deletes_only_the_commands_own_entries(tmp_path):
    """The one folder behaviour of every command (compare and run claim theirs through it too)."""
    out = tmp_path / "out"
    (out / "features").mkdir(parents=True)
    (out / "features" / "x.npy").write_bytes(b"1")
    (out / "report.html").write_text("old")
    (out / "mine.txt").write_text("the user's")
    with pytest.raises(BadInputError, match=r"--out .* holds another report: do this$"):
        claim_folder(out, occupied="another report", overwrite=False, own_entries=("features", "report.html"),
                     advice="do this")
    assert (out / "report.html").read_text() == "old"       # refused before anything is touched
    claim_folder(out, occupied="another report", overwrite=True, own_entries=("features", "report.html", "gone"))
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(BadInputError, match="run folder .*file is a file: give a folder"):
        claim_folder(tmp_path / "file", occupied=None, overwrite=True, label="run folder")
    claim_folder(tmp_path / "new" / "deep", occupied=None, overwrite=False)
    assert (tmp_path / "new" / "deep").is_dir()
