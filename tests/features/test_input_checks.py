"""Data and option checks of issue 11 point 6, through the CLI: each is one line, exit code 2, and nothing is
written: input sizes that the patch size does not divide, NaN/Inf weights, --topk above the queue, a k-NN
preset larger than the data (naming options `profile` really has), and a symlink loop in the data folder."""

from __future__ import annotations

import re

import timm
import torch
from typer.main import get_command
from typer.testing import CliRunner

from mimprobe.cli import app
from mimprobe.refinement import RefineConfig
from tests.conftest import make_image_folder

SMALL = "synthetic:classes=3,train=6,test=3,size=16"  # 18 train and 9 test images


def _run(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def _one_line_exit_2(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"error: {expected}"]


def test_input_size_below_or_not_a_multiple_of_the_patch_size_is_refused_before_any_file(tmp_path):
    for size, expected in [
        (7, "input size 7 px is smaller than the patch size 16 of test_vit: use --img-size 16"),
        (40, "input size 40 px is not a multiple of the patch size 16 of test_vit: use --img-size 32 or 48"),
        (17, "input size 17 px is not a multiple of the patch size 16 of test_vit: use --img-size 16 or 32"),
    ]:
        out = tmp_path / f"out{size}"
        _one_line_exit_2(_run("extract", "test_vit", SMALL, "--img-size", size, "--out", out), expected)
        _one_line_exit_2(_run("profile", "test_vit", SMALL, "--img-size", size, "--out", out), expected)
        assert not out.exists()
    assert _run("extract", "test_vit", SMALL, "--img-size", 48, "--out", tmp_path / "ok", "--no-progress").exit_code == 0


def test_nan_or_inf_weights_are_refused_naming_the_tensors(tmp_path):
    model = timm.create_model("test_vit", num_classes=0, img_size=32)
    state = model.state_dict()
    state["blocks.2.attn.qkv.weight"][0, 0] = float("nan")
    state["blocks.3.mlp.fc1.bias"][1] = float("inf")
    torch.save(state, tmp_path / "diverged.pth")
    out = tmp_path / "out"
    result = _run("extract", "test_vit", SMALL, "--img-size", 32, "--checkpoint", tmp_path / "diverged.pth",
                  "--out", out)
    assert result.exit_code == 2, result.output
    assert re.fullmatch(r"error: checkpoint .*diverged.pth \(\w+ format\) has NaN or Inf values in 2 tensors "
                        r"\(blocks.2.attn.qkv.weight, blocks.3.mlp.fc1.bias\): the file is damaged or its training "
                        r"diverged; use another checkpoint\n", result.output)
    assert not out.exists()
    state["blocks.2.attn.qkv.weight"][0, 0] = 0.0
    state["blocks.3.mlp.fc1.bias"][1] = 0.0
    torch.save(state, tmp_path / "finite.pth")
    assert _run("extract", "test_vit", SMALL, "--img-size", 32, "--checkpoint", tmp_path / "finite.pth", "--out", out,
                "--no-progress").exit_code == 0


def test_topk_above_the_queue_is_refused_before_any_file(tmp_path):
    out = tmp_path / "run"
    result = _run("refine", "test_vit", SMALL, "--img-size", 32, "--auto", "--queue-size", 8, "--topk", 20,
                  "--out", out)
    _one_line_exit_2(result, "--topk 20 is larger than --queue-size 8: the neighbour is picked from the top k of "
                             "the queue, use --topk 8 or less (or a longer queue)")
    assert not out.exists()
    assert RefineConfig(queue_size=8, topk=8).topk == 8


def _profile_options() -> set[str]:
    command = get_command(app).commands["profile"]
    return {name for param in command.params if param.param_type_name == "option" for name in param.opts}


def test_a_preset_larger_than_the_data_names_presets_and_options_profile_has(tmp_path):
    out = tmp_path / "profile"
    result = _run("profile", "test_vit", SMALL, "--img-size", 32, "--preset", "dinov2", "--out", out)
    expected = ("k-NN preset dinov2 needs k=200 neighbours but the smallest bank is the fit part of train for k-NN "
                "on val (15 images): use --preset mim-refiner (k=10), more train images, or --metrics without knn")
    _one_line_exit_2(result, expected)
    assert not out.exists()  # refused before the extraction
    named = set(re.findall(r"--[a-z-]+", expected))
    assert named and named <= _profile_options()
    # the same check on a store that already exists (profile of a store folder)
    stores = tmp_path / "features"
    extracted = _run("extract", "test_vit", SMALL, "--img-size", 32, "--pool", "cls,mean", "--out", stores, "--json")
    store = next(path for path in stores.iterdir() if path.is_dir())
    assert extracted.exit_code == 0
    _one_line_exit_2(_run("profile", store, "--preset", "dinov2", "--out", out), expected)
    assert not (out / "profile.csv").exists()
    assert _run("profile", store, "--preset", "mim-refiner", "--out", out, "--no-progress").exit_code == 0


def test_a_symlink_loop_in_the_data_folder_gives_each_image_once(tmp_path):
    root = make_image_folder(tmp_path / "data", {"airplane": 6, "cat": 6, "ship": 6}, size=16)
    (root / "cat" / "up").symlink_to(root)
    (root / "ship" / "planes").symlink_to(root / "airplane")
    result = _run("extract", "test_vit", root, "--img-size", 32, "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    assert '"train": 18' in result.stdout
    assert "skipped 2 linked folder(s) already read (a symlink loop or a second link): cat/up, ship/planes" \
        in result.stderr
