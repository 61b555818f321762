"""`refine --auto` under torchrun: every rank takes part in the profile (distributed extraction, sharded k-NN), rank 0
places the heads while the others wait, then every rank trains with the placement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
def test_auto_placement_with_two_processes_does_not_deadlock(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "mimprobe.cli", "refine", "test_vit", "synthetic:classes=4,train=12,test=4,size=16", "--img-size", "32",
               "--head-dims", "32,16,32", "--no-progress", "--epochs-heads", "1", "--epochs", "0", "--queue-size",
               "16", "--topk", "4", "--batch-size", "16", "--auto", "--max-heads", "1", "--device", "cpu",
               "--out", str(tmp_path / "run")]
    # a profile on rank 0 alone would wait in a collective that rank 1 never joins: it would hang
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "profile" / "profile.csv").is_file()
    placed = json.loads((tmp_path / "run" / "profile" / "placement.json").read_text())
    assert json.loads((tmp_path / "run" / "placement.json").read_text())["head_blocks"] == placed["head_blocks"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["world_size"] == 2
