"""The CLI through Typer's CliRunner: success output, --json, and exit code 2 with one line for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mimprobe.cli import app
from mimprobe.models import load_model
from tests.conftest import make_image_folder

runner = CliRunner()
SMALL = "synthetic:classes=3,train=6,test=3,size=16"


def _run(*args: str):
    return runner.invoke(app, list(args))


def test_extract_json_and_reuse(tmp_path):
    args = ("extract", "test_vit", SMALL, "--out", str(tmp_path), "--img-size", "32", "--pool", "cls,mean",
            "--blocks", "last:2", "--json")
    first = _run(*args)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["blocks"] == [4, 5] and summary["poolings"] == ["cls", "mean"] and not summary["reused"]
    assert summary["splits"] == {"train": 18, "test": 9} and summary["images_processed"] == 27
    second = _run(*args)
    assert json.loads(second.stdout)["reused"] and "reusing feature store" in second.stderr


def test_extract_plain_output_names_the_store(tmp_path):
    result = _run("extract", "test_vit", SMALL, "--out", str(tmp_path), "--img-size", "32", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "store:" in result.stdout and "6 blocks x cls (float16)" in result.stdout


def test_info(tmp_path):
    result = _run("info", "test_vit", "--img-size", "32", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["num_blocks"], info["embed_dim"], info["num_prefix_tokens"], info["patch_size"]) == (6, 64, 1, [16, 16])
    assert info["data_config"]["input_size"] == [3, 32, 32]


def test_help_has_examples():
    result = _run("extract", "--help")
    assert result.exit_code == 0 and "Examples" in result.output and "--skip-bad-images" in result.output


def _other_arch_checkpoint(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(load_model("vit_tiny_patch16_224", img_size=32).model.state_dict(), path)
    return path


BAD_INPUTS = {
    "missing path": (lambda tmp: ["test_vit", str(tmp / "nope")], r"data '.*nope' not found"),
    "empty folder": (lambda tmp: ["test_vit", str((tmp / "empty").mkdir() or tmp / "empty")], r"no images found"),
    "single class": (lambda tmp: ["test_vit", str(make_image_folder(tmp / "one", {"only": 2}))],
                     r"only one class \(only\)"),
    "unknown model": (lambda tmp: ["vit_tinny_patch16_224", SMALL], r"unknown model name 'vit_tinny_patch16_224'.*"
                                                                    r"did you mean vit_tiny_patch16_224"),
    "other architecture": (lambda tmp: ["test_vit", SMALL, "--checkpoint", str(_other_arch_checkpoint(tmp))],
                           r"does not fit test_vit: .*unexpected keys \(blocks\.6\..*shape mismatches"),
    "unknown block": (lambda tmp: ["test_vit", SMALL, "--blocks", "0,9"], r"unknown block index 9: the model has 6"),
    "unwritable output": (lambda tmp: ["test_vit", SMALL, "--out", str((tmp / "f").write_text("") or tmp / "f" / "x")],
                          r"cannot write to --out .*f/x"),
    "bad pooling": (lambda tmp: ["test_vit", SMALL, "--pool", "max"], r"unknown pooling 'max'"),
    "missing checkpoint": (lambda tmp: ["test_vit", SMALL, "--checkpoint", str(tmp / "no.pth")],
                           r"checkpoint .*no\.pth not found"),
    "bad mean": (lambda tmp: ["test_vit", SMALL, "--mean", "0.4,0.5"], r"invalid --mean \[0\.4, 0\.5\]"),
    "bad std": (lambda tmp: ["test_vit", SMALL, "--std", "0.2,x,0.2"], r"invalid --std '0\.2,x,0\.2'"),
    "bad crop": (lambda tmp: ["test_vit", SMALL, "--crop-pct", "1.2"], r"invalid --crop-pct 1\.2"),
    "bad interpolation": (lambda tmp: ["test_vit", SMALL, "--interpolation", "cubic"], r"invalid --interpolation"),
    "bad model kwargs": (lambda tmp: ["test_vit", SMALL, "--model-kwargs", "depth"], r"invalid --model-kwargs"),
    "unknown model kwarg": (lambda tmp: ["test_vit", SMALL, "--model-kwargs", "no_such=1"],
                            r"model test_vit does not accept"),
    "cnn": (lambda tmp: ["efficientnet_b0", SMALL, "--pool", "mean"], r"efficientnet_b0 \(EfficientNet\) is not "
                                                                      r"supported: it is a CNN"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(tmp_path, case):
    make_args, pattern = BAD_INPUTS[case]
    args = make_args(tmp_path)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "stores")]
    result = _run("extract", *args, "--img-size", "32", "--no-progress")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    import re

    assert re.search(pattern, lines[0]), lines[0]


def test_debug_shows_the_traceback(tmp_path):
    result = _run("extract", "test_vit", str(tmp_path / "nope"), "--out", str(tmp_path), "--debug")
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_pretrained_without_network_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never download in tests
    result = _run("info", "vit_tiny_patch16_224.augreg_in21k", "--pretrained")
    assert result.exit_code == 2, result.output  # bad input (issue 17): give the file or network access
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "could not fetch pretrained weights" in lines[0] and "--checkpoint" in lines[0]


def test_info_says_where_the_data_config_comes_from(tmp_path):
    state = load_model("test_vit", img_size=32).model.state_dict()
    state["pos_embed"][:, 0] = 0  # an MAE encoder file: fixed sin-cos table with a zero CLS row
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": state}, path)

    plain = json.loads(_run("info", "test_vit", "--img-size", "32", "--json").stdout)
    mae = json.loads(_run("info", "test_vit", "--img-size", "32", "--checkpoint", str(path), "--json").stdout)
    overridden = json.loads(_run("info", "test_vit", "--img-size", "32", "--checkpoint", str(path), "--mean", "0.5",
                                 "--std", "0.5,0.5,0.5", "--json").stdout)

    assert plain["data_config"]["mean"] == [0.5, 0.5, 0.5] and "timm's data config" in plain["data_config_source"]
    assert mae["checkpoint_format"] == "mae" and mae["data_config"]["mean"] == [0.485, 0.456, 0.406]
    assert mae["data_config_source"].startswith("MAE evaluation (facebookresearch/mae main_linprobe.py")
    assert overridden["data_config"]["mean"] == [0.5] * 3 and "overridden: --mean, --std" in \
        overridden["data_config_source"]


def test_model_kwargs_on_the_command_line(tmp_path):
    args = ("--img-size", "32", "--model-kwargs", "class_token=false,global_pool=avg,depth=3")
    info = json.loads(_run("info", "test_vit", *args, "--json").stdout)
    assert (info["has_class_token"], info["num_blocks"], info["num_prefix_tokens"]) == (False, 3, 0)

    result = _run("extract", "test_vit", SMALL, "--out", str(tmp_path), *args, "--pool", "mean", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["blocks"] == [0, 1, 2] and summary["poolings"] == ["mean"]
    refused = _run("extract", "test_vit", SMALL, "--out", str(tmp_path), *args, "--pool", "cls")
    assert refused.exit_code == 2 and "no CLS token: use --pool mean" in refused.stderr
