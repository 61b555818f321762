"""The TOML spec of `mimprobe run`: errors name the key and its line, defaults are the stage configurations', the
resolved spec reads back to the same spec, and every shipped analysis loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mimprobe.cli import app
from mimprobe.errors import BadInputError
from mimprobe.metrics.profile import ProfileConfig
from mimprobe.pipeline import DEMO_SPEC, dump_spec, load_spec, spec_from_dict, spec_from_text
from mimprobe.pipeline.spec import _find_line
from mimprobe.pretrain import MaeConfig
from mimprobe.refinement import RefineConfig
from mimprobe.report import CompareConfig

ANALYSES = Path(__file__).resolve().parents[2] / "analyses"
runner = CliRunner()

GOOD = '''\
name = "tiny"
out = "runs/tiny"
model = "test_vit"
data = "synthetic"

[compare]
notes = """
Text that looks like TOML, inside a multi-line string:
[refine]
epoch = 3
batch_size = "256"
"""

[refine]
epochs = 2
batch_size = 16
'''


def _write(tmp_path: Path, text: str, name: str = "x.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(path: Path) -> str:
    with pytest.raises(BadInputError) as caught:
        load_spec(path)
    return str(caught.value)


def test_unknown_key_names_its_line_and_the_close_key(tmp_path):
    text = GOOD.replace("epochs = 2", "epoch = 2")  # line 15; the notes' "epoch = 3" (line 10) is not a key
    path = _write(tmp_path, text)
    assert _error(path) == f'{path} line 15: unknown key "epoch" in [refine] (did you mean "epochs"?)'


def test_wrong_type_names_its_line(tmp_path):
    path = _write(tmp_path, GOOD.replace("batch_size = 16", 'batch_size = "256"'))
    assert _error(path) == f'{path} line 16: [refine] batch_size must be an integer, got "256"'


@pytest.mark.parametrize("text, expected", [
    ('name = "a"\nout = "o"\nmodle = "test_vit"\ndata = "synthetic"\n',
     'line 3: unknown key "modle" at the top level (did you mean "model"?)'),
    ('name = "a"\nout = "o"\nmodel = "m"\ndata = "d"\nrefine.epoch = 1\n',
     'line 5: unknown key "epoch" in [refine] (did you mean "epochs"?)'),
    ('name = "a"\nout = "o"\nmodel = "m"\ndata = "d"\n\n[refien]\nepochs = 1\n',
     "line 6: unknown section [refien] (did you mean [refine]?)"),
    ('name = "a"\nout = "o"\nmodel = "m"\ndata = "d"\n[profile]\npreset = "dnio"\n',
     "line 6: [profile] unknown preset value 'dnio': use mim-refiner, dino, dinov2 (did you mean dino?)"),
    ('name = "a"\nout = "o"\nmodel = "m"\ndata = "d"\n[profile]\npool = ["cls", "maen"]\n',
     "line 6: [profile] unknown pooling 'maen': use cls, mean, cls+mean, a comma list of them, or all"),
    ('name = "a"\nout = "o"\nmodel = "m"\ndata = "d"\n[refine]\nhead_dims = [512, 128]\n',
     "line 6: [refine] head_dims must be a list of 3 integers or a string, got [512, 128]"),
    ('name = "a"\nout = "o"\nmodel = "m"\ndata = "d"\nimg_size = 3.5\n',
     "line 5: img_size must be an integer, got 3.5"),
    ('name = "a"\nout = "o"\nmodel = "m"\ndata = "d"\npretrained = "yes"\n',
     'line 5: pretrained must be true or false, got "yes"'),
    ('name = "a"\nout = "o"\nmodel = "m"\ndata = "d"\n\n[place]\nmax_heads = 4\nn = 2\n',
     "line 7: [place] max_heads belongs to rule peak, not last-n: drop it, or use --rule peak"),
    ('name = "a"\nout = "o"\nmodel = "m"\ndata = "d"\n\n[refine]\nbatch_size = 1\n',
     "line 7: [refine] batch_size 1 is too small"),
])
def test_errors_name_the_key_and_line(tmp_path, text, expected):
    message = _error(_write(tmp_path, text))
    assert message.startswith(f"{tmp_path / 'x.toml'} {expected}"), message


def test_missing_required_key_and_bad_toml(tmp_path):
    message = _error(_write(tmp_path, 'name = "a"\nout = "o"\ndata = "d"\n'))
    assert 'missing key "model" at the top level' in message
    message = _error(_write(tmp_path, 'name = "a\n'))
    assert "is not valid TOML" in message and "line 1" in message


def test_cli_bad_spec_exits_2_with_one_line(tmp_path):
    path = _write(tmp_path, GOOD.replace("epochs = 2", "epoch = 2"))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert result.output.strip() == f'error: {path} line 15: unknown key "epoch" in [refine] (did you mean "epochs"?)'
    missing = tmp_path / "nope.toml"
    result = runner.invoke(app, ["run", str(missing)])
    assert result.exit_code == 2
    assert result.output.strip().startswith(f"error: spec file {missing} not found")


def test_line_finder_reads_headers_dotted_and_quoted_keys():
    text = 'a = 1\n"b" = 2\n[s]\n# c = 0\nc = 3\n[t]\nx.y = 4\n'
    assert _find_line(text, None, "a") == 1
    assert _find_line(text, None, "b") == 2
    assert _find_line(text, "s", None) == 3
    assert _find_line(text, "s", "c") == 5          # not the commented line
    assert _find_line(text, "t", "x.y") == 7
    assert _find_line(text, "s", "zz") is None


def test_defaults_are_the_stage_configurations():
    from mimprobe.commands import ExtractConfig, PlaceConfig

    spec = spec_from_dict({"name": "n", "out": "o", "model": "m", "data": "d", "pretrain": {}})
    assert spec.config("refine", RefineConfig) == RefineConfig()
    assert spec.config("pretrain", MaeConfig) == MaeConfig()
    assert spec.config("profile", ProfileConfig) == ProfileConfig()
    assert spec.config("profile", ExtractConfig) == ExtractConfig(poolings=("cls", "mean"))  # profile's default
    assert spec.config("compare", CompareConfig) == CompareConfig()
    assert spec.config("place", PlaceConfig).resolved_rule == "peak"


def test_cli_forms_of_lists_and_rule_inference(tmp_path):
    spec = spec_from_text('name = "a"\nout = "o"\nmodel = "m"\ndata = "d"\n[profile]\npool = "all"\n'
                          'metrics = "knn,linear"\nblocks = [0, -1]\n[place]\nblocks = [3, 5]\n')
    from mimprobe.commands import ExtractConfig, PlaceConfig

    assert spec.options("profile")["pool"] == ("cls", "mean", "cls+mean")
    assert spec.options("profile")["metrics"] == ("knn", "linear")
    assert spec.config("profile", ExtractConfig).blocks == [0, -1]
    assert spec.config("place", PlaceConfig).resolved_rule == "explicit"


@pytest.mark.parametrize("path", sorted(ANALYSES.glob("*.toml")) + [DEMO_SPEC], ids=lambda p: p.name)
def test_shipped_specs_load_and_their_resolved_form_reads_back(path):
    spec = load_spec(path)
    text = dump_spec(spec, header="resolved\nspec")
    assert text.startswith("# resolved\n# spec\n")
    assert spec_from_text(text) == spec
    assert "threads" not in text or spec.threads is not None  # None is written as an absent key


def test_overrides_are_validated_like_a_file():
    spec = load_spec(DEMO_SPEC)
    changed = spec.with_overrides({"img_size": 32, "refine": {"epochs": 3}})
    refine, before = changed.config("refine", RefineConfig), spec.config("refine", RefineConfig)
    assert (changed.img_size, refine.epochs, refine.batch_size) == (32, 3, before.batch_size)
    with pytest.raises(BadInputError, match='unknown key "epoch" in \\[refine\\]'):
        spec.with_overrides({"refine": {"epoch": 3}})


def test_refine_head_dims_take_three_widths_or_a_rule_and_ema_decay_defaults_to_the_scaled_official():
    from mimprobe.pipeline.spec import spec_from_text

    base = 'name = "a"\nout = "o"\nmodel = "m"\ndata = "d"\n[refine]\n'
    spec = spec_from_text(base + 'head_dims = "proportional"\n')
    config = spec.config("refine", RefineConfig)
    assert config.head_widths == "proportional" and config.head_hidden_dim is None and config.ema_decay is None
    config = spec_from_text(base + "head_dims = [64, 16, 64]\nema_decay = 0.99\n").config("refine", RefineConfig)
    assert (config.head_hidden_dim, config.head_proj_dim, config.head_predictor_dim, config.ema_decay) == \
        (64, 16, 64, 0.99)
    with pytest.raises(BadInputError, match=r"line 6: \[refine\] invalid head_dims 'wide'"):
        spec_from_text(base + 'head_dims = "wide"\n')


BASE = {"name": "n", "out": "o", "model": "test_vit", "data": "digits"}


def test_a_checkpoint_series_is_refused_in_a_spec(tmp_path):
    (tmp_path / "checkpoint-1.pth").write_bytes(b"")
    for series in (str(tmp_path / "checkpoint-*.pth"), str(tmp_path)):
        with pytest.raises(BadInputError, match="names a series of checkpoints"):
            spec_from_dict({**BASE, "checkpoint": series})
    spec_from_dict({**BASE, "checkpoint": str(tmp_path / "checkpoint-1.pth")})


def test_model_kwargs_is_a_top_level_inline_table_that_round_trips(tmp_path):
    """``model_kwargs = {patch_size = 4}`` is a key, not a section: it reaches the spec and its resolved dump."""
    path = _write(tmp_path, GOOD.replace('data = "synthetic"\n', 'data = "synthetic"\nmodel_kwargs = {patch_size = 4}\n'))
    spec = load_spec(path)
    assert spec.model_kwargs == {"patch_size": 4}
    assert load_spec(_write(tmp_path, dump_spec(spec), "resolved.toml")) == spec
    assert "unknown section [refien]" in _error(_write(tmp_path, GOOD + "\n[refien]\nepochs = 1\n", "bad.toml"))
