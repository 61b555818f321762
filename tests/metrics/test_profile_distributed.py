"""`profile` under torchrun (gloo, 2 processes): extraction and k-NN across ranks, the rest on rank 0, the same
table as one process; rank 0 alone writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.distributed  # a torchrun launch of 2 gloo processes

REPO = Path(__file__).resolve().parents[2]
ARGS = ["profile", "test_vit", "synthetic:classes=3,train=12,test=4,size=16", "--img-size", "32", "--batch-size", "8",
        "--pool", "cls", "--metrics", "knn,rank", "--no-progress"]


def test_two_process_profile_equals_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    one = subprocess.run([sys.executable, "-m", "mimprobe.cli", *ARGS, "--out", str(tmp_path / "one")], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), "-m", "mimprobe.cli", *ARGS, "--out",
                          str(tmp_path / "two")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("best blocks") == 1  # rank 0 alone reports
    a, b = (pd.read_csv(tmp_path / name / "profile.csv") for name in ("one", "two"))
    assert set(a["metric"]) >= {"knn_top1", "rankme"}  # rank: on rank 0 alone
    pd.testing.assert_frame_equal(a, b)  # k-NN sharded over the ranks gives the same numbers
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
