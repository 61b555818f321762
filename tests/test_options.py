"""One definition per option (`mimprobe.options`): the command line, the TOML spec and the Python entry points are
derived from the stage configs, give the same results, validate before any work, and name only options that exist."""

from __future__ import annotations

import ast
import functools
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

import mimprobe
from mimprobe.cli import app
from mimprobe.errors import BadInputError
from mimprobe.options import build_config, option, option_fields, public_name, typer_parameters
import mimprobe.commands as config_module
from mimprobe.commands import COMMANDS
from mimprobe.pipeline import api

runner = CliRunner()
PACKAGE = Path(mimprobe.__file__).parent
DATA = "synthetic:classes=3,train=10,test=6,size=16"


@functools.lru_cache(maxsize=None)
def _flags(command: str) -> frozenset[str]:
    params = typer.main.get_command(app).commands[command].params
    return frozenset(flag for param in params for flag in (*param.opts, *param.secondary_opts)
                     if flag.startswith("--"))


# ------------------------------------------------------------------------------------------ derived from configs

@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_config_option_is_on_its_command_with_the_config_default_in_help(name):
    command = COMMANDS[name]
    flags = _flags(name)
    for keyword in command.names():
        cls = next(cls for cls in command.options if keyword in {public_name(f) for f, _ in option_fields(cls)})
        field_, info = next((f, info) for f, info in option_fields(cls) if public_name(f) == keyword)
        if info.cli:
            assert f"--{keyword.replace('_', '-')}" in flags, keyword


def test_a_new_config_field_appears_on_the_command_in_the_spec_and_in_the_function(monkeypatch, tmp_path):
    """Adding one field to a stage's config is the whole edit: the option reaches the Typer command, the spec
    section and the Python function's keywords."""
    import dataclasses

    from mimprobe.commands import ProfileConfig
    from mimprobe.pipeline import spec as spec_module

    extended = dataclasses.make_dataclass(
        "ProfileConfig", [("knn_chunk", int, option(7, "A new option, for this test.", minimum=1))],
        bases=(ProfileConfig,), frozen=True)
    command = dataclasses.replace(config_module.PROFILE, options=tuple(
        extended if cls is ProfileConfig else cls for cls in config_module.PROFILE.options))
    monkeypatch.setattr(api, "PROFILE", command)
    monkeypatch.setitem(COMMANDS, "profile", command)
    monkeypatch.setitem(spec_module.SECTIONS, "profile", (extended, spec_module.SECTIONS["profile"][1]))
    parameters = {p.name: p for p in typer_parameters(command.options)}                 # the command line
    assert parameters["knn_chunk"].default.param_decls == ("--knn-chunk",)
    assert "[default: 7]" in parameters["knn_chunk"].default.help
    with pytest.raises(BadInputError, match="--knn-chunk must be at least 1"):           # the function
        mimprobe.profile("test_vit", DATA, out=str(tmp_path / "p"), knn_chunk=0)
    assert not (tmp_path / "p").exists()
    spec = spec_module.spec_from_dict({"name": "n", "out": "o", "model": "m", "data": "d",  # the spec
                                       "profile": {"knn_chunk": 5}})
    assert spec.options("profile")["knn_chunk"] == 5 and spec.resolved()["profile"]["knn_chunk"] == 5


def test_unknown_keywords_are_refused_with_the_closest_name():
    with pytest.raises(BadInputError, match="did you mean metrics"):
        mimprobe.profile("test_vit", DATA, out="unused", metric="knn")
    with pytest.raises(BadInputError, match="place has no option 'threads'"):
        mimprobe.place("unused", threads=1)


def test_an_option_has_one_name_its_flag_not_its_field():
    """``pool`` is the option (CLI --pool, spec key, keyword); the dataclass field behind it (``poolings``) is not a
    second spelling of it."""
    from mimprobe.features.config import ExtractConfig

    assert build_config(ExtractConfig, {"pool": "cls,mean"}).poolings == ("cls", "mean")
    with pytest.raises(BadInputError, match="unknown option 'poolings'.*did you mean pool"):
        build_config(ExtractConfig, {"poolings": "cls,mean"})


def test_text_and_python_forms_build_the_same_config():
    from mimprobe.features import ExtractConfig
    from mimprobe.refinement import RefineConfig

    assert build_config(ExtractConfig, {"pool": "cls,mean", "blocks": "last:4", "mean": "0.5,0.5,0.5"}) == \
        build_config(ExtractConfig, {"pool": ("cls", "mean"), "blocks": 4, "mean": (0.5, 0.5, 0.5)})
    assert build_config(RefineConfig, {"head_dims": "64,32,64", "local_scale": "0.1,0.3"}) == \
        build_config(RefineConfig, {"head_dims": [64, 32, 64], "local_scale": [0.1, 0.3]})


# ------------------------------------------------------------------------------------------- API = CLI = spec

@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """The same profile through the CLI and through the Python function."""
    root = tmp_path_factory.mktemp("same")
    common = ["--img-size", "32", "--metrics", "knn,rank", "--pool", "cls", "--threads", "1", "--no-progress"]
    result = runner.invoke(app, ["profile", "test_vit", DATA, "--out", str(root / "cli"), *common])
    assert result.exit_code == 0, result.output
    mimprobe.profile("test_vit", DATA, out=str(root / "api"), img_size=32, metrics="knn,rank", pool="cls",
                     threads=1, progress=False)
    return root


def _table(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "profile.csv", dtype={"params": str})


def test_profile_api_equals_cli(profiled):
    pd.testing.assert_frame_equal(_table(profiled / "cli"), _table(profiled / "api"))
    config = json.loads((profiled / "api" / "profile.json").read_text())["config"]
    assert config == json.loads((profiled / "cli" / "profile.json").read_text())["config"]


def test_place_api_equals_cli(profiled, tmp_path):
    result = runner.invoke(app, ["place", str(profiled / "cli"), "--out", str(tmp_path / "cli.json"), "--json"])
    assert result.exit_code == 0, result.output
    placement = mimprobe.place(str(profiled / "cli"), out=str(tmp_path / "api.json"))
    cli = json.loads((tmp_path / "cli.json").read_text())
    assert cli["head_blocks"] == list(placement.head_blocks) and cli["reason"] == placement.reason
    assert json.loads((tmp_path / "api.json").read_text())["inputs"] == cli["inputs"]


def test_spec_sections_call_the_same_functions(monkeypatch, tmp_path):
    """The pipeline's steps hand the spec's section to the command's function under the CLI's names."""
    from mimprobe.pipeline import run as run_module
    from mimprobe.pipeline.spec import spec_from_dict

    calls = {}

    def recorder(name):
        def record(*args, **options):
            calls[name] = options
            raise BadInputError(f"stop after {name}")
        return record

    monkeypatch.setattr(run_module.api, "profile", recorder("profile"))
    spec = spec_from_dict({"name": "n", "out": str(tmp_path / "run"), "model": "test_vit", "data": DATA,
                           "img_size": 32, "profile": {"metrics": "knn", "pool": ["cls"], "blocks": "last:2"}})
    with pytest.raises(BadInputError, match="stop after profile"):
        run_module.run_pipeline(spec, progress=False, log=lambda message: None)
    options = calls["profile"]
    assert options["img_size"] == 32 and options["pool"] == ("cls",) and options["blocks"] == 2
    assert options["metrics"] == ("knn",)
    config_module.PROFILE.configs({key: value for key, value in options.items() if key not in ("log",)})  # all valid names


def test_refine_config_is_the_same_from_cli_and_api(monkeypatch, tmp_path):
    seen = []

    def fake_run_refine(model, data, **kwargs):
        seen.append(kwargs["config"])
        raise BadInputError("stopped before training")

    import mimprobe.refinement as refine_package

    monkeypatch.setattr(refine_package, "run_refine", fake_run_refine)
    args = ["--epochs", "3", "--head-dims", "64,32,64", "--local-scale", "0.1,0.3", "--workers", "1"]
    result = runner.invoke(app, ["refine", "test_vit", DATA, "--out", str(tmp_path), "--placement", "p.json", *args])
    assert result.exit_code == 2 and "stopped before training" in result.output
    with pytest.raises(BadInputError, match="stopped before training"):
        mimprobe.refine("test_vit", DATA, out=str(tmp_path), placement="p.json", epochs=3, head_dims=(64, 32, 64),
                        local_scale="0.1,0.3", workers=1)
    assert seen[0] == seen[1] and seen[0].head_dims == (64, 32, 64) and seen[0].num_workers == 1


# ------------------------------------------------------------------------------------- validated before work

def test_unknown_metric_exits_2_before_any_store_is_written(tmp_path):
    result = runner.invoke(app, ["profile", "test_vit", DATA, "--img-size", "32", "--metrics", "knn,foo", "--out",
                                 str(tmp_path / "out")])
    assert result.exit_code == 2 and "foo" in result.output and "knn, linear, lowshot" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, args, message", [
    ("extract", ["--pool", "cls,max"], "unknown pooling"),
    ("extract", ["--blocks", "last:x"], "--blocks"),
    ("profile", ["--preset", "knn20"], "--preset"),
    ("profile", ["--memory-budget", "lots"], "--memory-budget"),
    ("refine", ["--head-init", "zeros", "--placement", "p.json"], "--head-init"),
    ("refine", ["--max-heads", "2", "--placement", "p.json"], "--auto"),
    ("pretrain-mae", ["--batch-size", "1"], "--batch-size"),
])
def test_bad_options_exit_2_before_the_model_or_data_is_touched(command, args, message, tmp_path, monkeypatch):
    import mimprobe.data.sources as sources
    import mimprobe.models.loading as loading

    def untouched(*args, **kwargs):
        raise AssertionError("loaded before the options were checked")

    monkeypatch.setattr(loading, "load_model", untouched)
    monkeypatch.setattr(sources, "load_data", untouched)
    result = runner.invoke(app, [command, "test_vit", DATA, "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- messages name existing options

# Which commands run each package's code (a message there may be printed by any of them).
REACHED_BY = {
    "features": ("extract", "profile"),
    "metrics": ("profile",),
    "placement": ("place",),
    "refinement": ("refine",),
    "pretrain": ("pretrain-mae",),
    "report": ("compare",),
    "models": ("extract", "profile", "info", "refine", "pretrain-mae"),
    "data": ("extract", "profile", "refine", "pretrain-mae"),
    "pipeline": ("run", "demo"),
    "choices.py": ("extract", "profile", "info", "refine", "pretrain-mae"),
    "commands.py": tuple(COMMANDS),
}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _strings(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, text, enclosing function) of a module's messages: string literals and f-strings (their literal
    parts joined), less docstrings and the help texts of `option` fields (those describe the option itself)."""
    tree = ast.parse(path.read_text())
    skipped = {id(node.body[0].value) for node in ast.walk(tree)
               if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
               and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "option":
            skipped |= {id(sub) for sub in ast.walk(node)}
    found = []

    def visit(node: ast.AST, function: str | None) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if id(node) in skipped:
            return
        if isinstance(node, ast.JoinedStr):
            text = "".join(part.value if isinstance(part, ast.Constant) else "{}" for part in node.values)
            found.append((node.lineno, text, function))
            return
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value, function))
            return
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


def _message_flags(path: Path) -> list[tuple[int, str]]:
    return [(line, flag) for line, text, _ in _strings(path) for flag in FLAG.findall(text)]


def _named_elsewhere(text: str, flag: str) -> bool:
    """A message may name another command's option when it names that command before it
    ("re-run `mimprobe profile` with --metrics knn", "smaller refine --head-dims")."""
    before = text[:text.index(flag)]
    return any(re.search(rf"\b{re.escape(command)}\b", before) and flag in _flags(command)
               for command in COMMANDS if command in before)


# Flags of other tools that messages may name.
FOREIGN = {"--nproc-per-node", "--nproc_per_node", "--standalone"}
# Options whose messages only check the option's own value: printed only by a command that has the option.
OWN_VALUE = {"--mean", "--std", "--interpolation", "--crop-pct"}


def _commands_of(path: Path, function: str | None, package: str) -> tuple[str, ...]:
    """The commands that can print a message: the package's, or for `pipeline.api` the function's own command."""
    if path.name == "api.py" and function is not None:
        name = function.lstrip("_").replace("_", "-").replace("auto-placement", "refine")
        if name in COMMANDS:
            return (name,)
    return REACHED_BY[package]


@pytest.mark.parametrize("package", sorted(REACHED_BY))
def test_messages_name_only_options_of_the_commands_that_print_them(package):
    missing = []
    paths = [PACKAGE / package] if package.endswith(".py") else sorted((PACKAGE / package).rglob("*.py"))
    for path in paths:
        for line, text, function in _strings(path):
            commands = _commands_of(path, function, package)
            for flag in FLAG.findall(text):
                if flag in FOREIGN or _named_elsewhere(text, flag):
                    continue
                lacking = [command for command in commands if flag not in _flags(command)]
                if flag in OWN_VALUE and len(lacking) < len(commands):
                    continue
                if lacking:
                    missing.append(f"{path.relative_to(PACKAGE)}:{line} {flag} (not on {', '.join(lacking)})")
    assert missing == []


def test_the_message_scan_finds_flags():
    found = {flag for _, flag in _message_flags(PACKAGE / "metrics" / "_finite.py")} | {
        flag for _, flag in _message_flags(PACKAGE / "metrics" / "config.py")}
    assert "--metrics" in found and "--store-dtype" in found
