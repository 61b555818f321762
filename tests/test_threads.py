"""One --threads for every command: torch, BLAS/OpenMP (threadpoolctl) and FAISS, set for the command and restored;
`mimprobe --version`; the top-level exports."""

from __future__ import annotations

import os

import pytest
import torch
from threadpoolctl import threadpool_info
from typer.testing import CliRunner

import mimprobe
from mimprobe._threads import cpu_threads
from mimprobe.cli import app
from mimprobe.errors import BadInputError

runner = CliRunner()


def _pools() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info()}


def test_cpu_threads_sets_every_pool_and_restores_them():
    faiss = pytest.importorskip("faiss")
    before_torch, before_faiss, before_env = torch.get_num_threads(), faiss.omp_get_max_threads(), \
        os.environ.get("MKL_NUM_THREADS")
    target = 3 if before_torch != 3 else 2
    with cpu_threads(target):
        assert torch.get_num_threads() == target and faiss.omp_get_max_threads() == target
        assert _pools() == {target}  # every loaded BLAS/OpenMP pool (numpy's BLAS, torch's and FAISS's OpenMP)
        assert os.environ["OMP_NUM_THREADS"] == str(target)
    assert torch.get_num_threads() == before_torch and faiss.omp_get_max_threads() == before_faiss
    assert os.environ.get("MKL_NUM_THREADS") == before_env
    with cpu_threads(None):
        assert torch.get_num_threads() == before_torch
    for bad in (0, -1, 1.5):
        with pytest.raises(BadInputError, match="--threads must be a whole number"):
            with cpu_threads(bad):
                pass


@pytest.mark.parametrize("command", [["extract", "test_vit", "synthetic", "--out", "x"],
                                     ["profile", "test_vit", "synthetic", "--out", "x"],
                                     ["refine", "test_vit", "synthetic", "--out", "x"],
                                     ["pretrain-mae", "test_vit", "synthetic", "--out", "x"],
                                     ["compare", "a", "b", "--out", "x"],
                                     ["run", "spec.toml"],
                                     ["demo", "--out", "x"],
                                     ["info", "test_vit"]])
def test_every_compute_command_takes_threads_with_one_meaning(command, monkeypatch):
    """Each command's body runs under cpu_threads(--threads) (here a stand-in that records the count and refuses
    to start, so no command runs), and every --help says the same thing."""
    from contextlib import contextmanager

    import mimprobe._threads as threads_module

    seen = []

    @contextmanager
    def recording(threads):
        seen.append(threads)
        raise BadInputError("stopped before the command body")
        yield

    monkeypatch.setattr(threads_module, "cpu_threads", recording)
    result = runner.invoke(app, [*command, "--threads", "1"])
    assert seen == [1] and result.exit_code == 2, result.output
    assert "stopped before the command body" in result.output
    assert "BLAS/OpenMP" in runner.invoke(app, [command[0], "--help"]).output


def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"mimprobe {mimprobe.__version__}"


def test_the_commands_are_exported_at_the_top_level():
    from mimprobe.metrics.profile import ProfileConfig
    from mimprobe.pipeline import api
    from mimprobe.pipeline.profiling import run_profile

    for name in ("extract", "profile", "place", "refine", "compare", "pretrain_mae", "info"):
        assert getattr(mimprobe, name) is getattr(api, name) and name in mimprobe.__all__
    assert mimprobe.run_profile is run_profile and mimprobe.ProfileConfig is ProfileConfig


def test_the_console_says_random_init_when_no_weights_are_given(tmp_path):
    result = runner.invoke(app, ["extract", "test_vit", "synthetic:classes=2,train=4,test=2,size=16", "--out",
                                 str(tmp_path), "--img-size", "32", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "weights: random init (seeded) of test_vit" in result.stderr
    store = next(path for path in tmp_path.iterdir() if (path / "manifest.json").is_file())
    again = runner.invoke(app, ["profile", str(store), "--out", str(tmp_path / "profile"), "--metrics", "rank",
                                "--no-progress"])
    assert again.exit_code == 0 and "random init" in again.stderr  # the store's manifest says how it was made
    bad = runner.invoke(app, ["extract", "test_vit", "synthetic", "--out", str(tmp_path), "--img-size", "30"])
    assert bad.exit_code == 2 and "random init" not in bad.output  # bad input: its one-line error only
