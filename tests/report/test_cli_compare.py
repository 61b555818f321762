"""`mimprobe compare` through Typer's CliRunner: the summary, --json, and exit code 2 with one line for bad input."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from mimprobe.cli import app

runner = CliRunner()
FAST = ("--resamples", "100", "--no-cka")


def test_compare_prints_the_summary_and_writes_the_report(profiles, tmp_path):
    result = runner.invoke(app, ["compare", str(profiles.before), str(profiles.after), "--out", str(tmp_path / "r"),
                                 "--labels", "base,refined", *FAST])
    assert result.exit_code == 0, result.output
    assert "best block for k-NN top-1" in result.stdout and "refinement heads were on blocks 3, 4, 5" in result.stdout
    assert "block 0 is the first transformer block" in result.stdout
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "report.md").is_file()


def test_compare_json(profiles, tmp_path):
    result = runner.invoke(app, ["compare", str(profiles.before), str(profiles.after), "--out", str(tmp_path / "r"),
                                 "--json", *FAST])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    pair = summary["comparisons"][0]
    assert pair["before"] == "before" and pair["after"] == "after" and pair["head_blocks"] == [3, 4, 5]
    knn = next(row for row in pair["best"] if row["metric"].startswith("k-NN top-1") and row["pooling"] == "cls"
               and row["metric"].endswith("test"))
    assert knn["low"] <= knn["delta"] <= knn["high"]
    assert summary["files"]["html"].endswith("report.html")


def _bad(*args: str) -> str:
    result = runner.invoke(app, ["compare", *args])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


def test_bad_inputs_exit_2_with_one_line(profiles, tmp_path):
    missing = _bad(str(profiles.before), str(tmp_path / "nope"), "--out", str(tmp_path / "a"))
    assert "nope not found" in missing and "mimprobe profile MODEL DATA --out" in missing
    assert "at least two" in _bad(str(profiles.before), "--out", str(tmp_path / "b"))
    assert "holds other files" in _bad(str(profiles.before), str(profiles.after), "--out", str(profiles.run))
    assert "one non-empty label per profile" in _bad(str(profiles.before), str(profiles.after), "--labels", "x",
                                                      "--out", str(tmp_path / "c"))
    other = tmp_path / "other"
    shutil.copytree(profiles.after, other)
    meta = json.loads((other / "profile.json").read_text())
    meta["dataset"]["fingerprint"] = "f" * 64
    (other / "profile.json").write_text(json.dumps(meta))
    assert "--allow-different-data" in _bad(str(profiles.before), str(other), "--out", str(tmp_path / "d"))
    assert "--resamples must be at least 1" in _bad(str(profiles.before), str(profiles.after), "--resamples", "0",
                                                    "--out", str(tmp_path / "f"))
    broken = tmp_path / "broken-placement.json"
    broken.write_text("{}")
    assert "not a placement" in _bad(str(profiles.before), str(profiles.after), "--placement", str(broken),
                                     "--out", str(tmp_path / "e"), *FAST)


def test_help_has_examples():
    result = runner.invoke(app, ["compare", "--help"])
    assert result.exit_code == 0 and "Examples" in result.output and "--allow-different-data" in result.output
