"""The declarative spec of `mimprobe run`: one TOML file per analysis, whose keys are the options of the commands
it runs, derived from the same config classes (`mimprobe.options`, `mimprobe.pipeline.api`).

Layout (every section optional except the top-level keys ``name``, ``out``, ``model`` and ``data``)::

    name = "cifar10-cpu"              # free text, shown in the report
    out = "runs/cifar10-cpu"          # run folder (relative paths: to the current directory, as CLI options)
    model = "vit_tiny_patch16_224"    # timm name
    data = "../shared/cifar10"        # image folder, .npz, digits or synthetic[:...]
    checkpoint = "mae.pth"            # or pretrained = true; neither: random init (seeded)
    img_size = 32                     # img_size, device, seed, threads: shared by every step

    [pretrain]   # optional: MAE pre-training first (`mimprobe pretrain-mae` options); its mae.pth is the checkpoint
    [profile]    # `mimprobe profile` options (before and after refinement alike)
    [place]      # `mimprobe place` options
    [refine]     # `mimprobe refine` options
    [compare]    # `mimprobe compare` options, and notes on what the run shows

Keys take the TOML types of their options, or the command line's text forms (``pool = "cls,mean"``,
``blocks = "last:4"``). `load_spec` reads and validates a file: an unknown key or a value of the wrong type is a
`BadInputError` naming the key and its line (tomllib reports no positions, so the line is found by scanning the
text for the section header and ``key =``).
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import BadInputError
from ..commands import (PROFILE, CompareConfig, ExtractConfig, MaeConfig, PlaceConfig, ProfileConfig,
                      RefineConfig)
from ..options import build_config, coerce, config_values, convert_value, describe_type, option_fields, public_name

# Each section's keys: the spec options of these classes, less the top-level keys every step shares.
SECTIONS: dict[str, tuple[type, ...]] = {"pretrain": (MaeConfig,), "profile": (ProfileConfig, ExtractConfig),
                                         "place": (PlaceConfig,), "refine": (RefineConfig,),
                                         "compare": (CompareConfig,)}
SHARED = ("img_size", "device", "seed", "threads")
SECTION_DEFAULTS = {"profile": PROFILE.defaults}  # a section's command defaults over its classes'

REQUIRED = ("name", "out", "model", "data")


def section_keys(section: str) -> dict[str, tuple[type, Any]]:
    """{key: (class, field)} of a section's keys."""
    keys: dict[str, tuple[type, Any]] = {}
    for cls in SECTIONS[section]:
        for f, info in option_fields(cls):
            name = public_name(f)
            if not info.spec or name in SHARED or name in keys:
                continue
            keys[name] = (cls, f)
    return keys


@dataclass(frozen=True, eq=False)
class Spec:
    """One analysis: the model and data, shared options, and per section the options given (validated). Two specs
    are equal when they resolve to the same values (a default written out or left out is the same spec)."""

    name: str
    out: str                                        # the run folder
    model: str                                      # timm name (a tag such as .mae with pretrained = true)
    data: str                                       # image folder, .npz, digits, synthetic[:...]
    checkpoint: str | None = None                   # starting weights (any format mimprobe reads)
    pretrained: bool = False                        # timm's pretrained weights (needs the network once)
    model_kwargs: dict[str, Any] | None = None      # timm.create_model arguments (an inline table)
    img_size: int | None = None                     # square input size for small images, in every step
    device: str = "auto"
    seed: int = 0                                   # every step's seed
    threads: int | None = None                      # torch, BLAS and FAISS CPU threads (None: library defaults)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)  # options given per section ([pretrain]: run)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Spec) and self.resolved() == other.resolved()

    __hash__ = None

    @property
    def pretrain(self) -> dict[str, Any] | None:
        return self.sections.get("pretrain")

    @property
    def notes(self) -> str:
        return self.sections.get("compare", {}).get("notes", "")

    def options(self, section: str) -> dict[str, Any]:
        """The keywords of the section's command (`mimprobe.pipeline.api`): the shared keys its classes take, then
        the section's own."""
        names = {public_name(f) for cls in SECTIONS[section] for f, _ in option_fields(cls)}
        shared = {key: getattr(self, key) for key in SHARED if key in names and getattr(self, key) is not None}
        return {**shared, **self.sections.get(section, {})}

    def config(self, section: str, cls: type) -> Any:
        """A section's config of class ``cls`` (the command's defaults where the spec says nothing)."""
        keys = section_keys(section)
        names = {public_name(f) for f, _ in option_fields(cls)}
        given = {key: value for key, value in {**SECTION_DEFAULTS.get(section, {}), **self.options(section)}.items()
                 if key in names and (key in keys or key in SHARED)}
        return build_config(cls, given)

    def resolved(self) -> dict[str, Any]:
        """Every key with its value, defaults filled in, as JSON types (tuples become lists)."""
        values: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sections"}
        for section in SECTIONS:
            if section == "pretrain" and self.pretrain is None:
                continue
            keys = section_keys(section)
            resolved: dict[str, Any] = {}
            for cls in SECTIONS[section]:
                built = config_values(self.config(section, cls))
                resolved.update({key: value for key, value in built.items() if key in keys and key not in resolved})
            values[section] = resolved
        return json.loads(json.dumps(values))

    def with_overrides(self, overrides: dict[str, Any]) -> Spec:
        """A copy with top-level keys or ``{"section": {key: value}}`` replaced (validated like a file's)."""
        values: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sections"}
        values.update({name: dict(options) for name, options in self.sections.items()})
        for key, value in overrides.items():
            if key in SECTIONS and isinstance(value, dict):
                values[key] = {**(values.get(key) or {}), **value}
            else:
                values[key] = value
        return spec_from_dict(_drop_none(values), source=None)


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: an absent key is how a spec says None."""
    return {key: _drop_none(value) if isinstance(value, dict) else value for key, value in values.items()
            if value is not None}


def dump_spec(spec: Spec, *, header: str = "") -> str:
    """TOML text of a spec with every default written out, which `load_spec` reads back to the same `Spec`.

    TOML has no null, so a key whose value is None is left out (absent means None); ``header`` becomes comment
    lines at the top."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    values = spec.resolved()
    lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()
              if key not in SECTIONS and value is not None]
    for section in SECTIONS:
        if values.get(section) is None:
            continue
        lines += ["", f"[{section}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in values[section].items() if value is not None]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, str) and "\n" in value and "'''" not in value \
            and all(char >= " " or char in "\n\t" for char in value):
        return "'''\n" + value + "'''"  # a multi-line literal string: notes stay readable
    if isinstance(value, dict):  # model_kwargs: an inline table
        return "{" + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + "}"
    # JSON's strings (with \n, \" and \uXXXX escapes), numbers, booleans and arrays are valid TOML
    return json.dumps(value, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------------ loading

def load_spec(path: str | Path) -> Spec:
    """Read and validate a TOML spec.

    Raises:
        BadInputError: A missing or unreadable file, invalid TOML, an unknown section or key, a wrong type or
            value; the message names the file, the line, the key and the fix.
    """
    path = Path(path)
    if not path.exists() or path.is_dir():
        hint = "it is a folder" if path.is_dir() else "no such file"
        raise BadInputError(f"spec file {path} not found ({hint}): give a TOML spec such as analyses/demo.toml")
    try:
        text = path.read_text(encoding="utf-8")
        values = tomllib.loads(text)
    except UnicodeDecodeError:
        raise BadInputError(f"{path} is not UTF-8 text: save the spec as UTF-8 TOML") from None
    except OSError as error:
        raise BadInputError(f"cannot read spec file {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise BadInputError(f"{path} is not valid TOML ({error}): fix the syntax at that line") from None
    return spec_from_dict(values, source=_Source(str(path), text))


def spec_from_text(text: str, *, name: str = "<spec>") -> Spec:
    """`load_spec` for TOML text (``name`` stands for the file in messages)."""
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise BadInputError(f"{name} is not valid TOML ({error}): fix the syntax at that line") from None
    return spec_from_dict(values, source=_Source(name, text))


@dataclass(frozen=True)
class _Source:
    name: str
    text: str


_TOP_TYPES = {f.name: f for f in fields(Spec) if f.name != "sections"}


def spec_from_dict(values: dict[str, Any], *, source: _Source | None = None) -> Spec:
    """Validate parsed TOML (or an equivalent dict) into a `Spec`; see `load_spec`."""

    def fail(section: str | None, key: str | None, message: str) -> None:
        where = source.name if source else "spec"
        line = _find_line(source.text, section, key) if source else None
        raise BadInputError(f"{where} line {line}: {message}" if line else f"{where}: {message}")

    top_names = list(_TOP_TYPES)
    for key, value in values.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                fail(None, key, f"{key} must be a section [{key}], got {_show(value)}")
        elif isinstance(value, dict) and key not in top_names:  # model_kwargs is a top-level inline table
            close = difflib.get_close_matches(key, list(SECTIONS), n=1, cutoff=0.6)
            fail(None, key, f"unknown section [{key}]" + (f" (did you mean [{close[0]}]?)" if close else
                                                           f" (known: {', '.join(f'[{s}]' for s in SECTIONS)})"))
        elif key not in top_names:
            fail(None, key, f'unknown key "{key}" at the top level{_suggest(key, [*top_names, *SECTIONS])}')
    missing = [key for key in REQUIRED if key not in values]
    if missing:
        fail(None, None, f'missing key "{missing[0]}" at the top level: add {missing[0]} = "..." (the required keys '
                         f"are {', '.join(REQUIRED)})")
    hints = typing.get_type_hints(Spec)
    top: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS:
            continue
        ok, converted = coerce(value, hints[key])
        if not ok:
            fail(None, key, f"{key} must be {describe_type(hints[key])}, got {_show(value)}")
        top[key] = converted
    sections: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        if section in values:
            sections[section] = _convert_section(section, values[section], fail)
        elif section != "pretrain":
            sections[section] = {}
    spec = Spec(**top, sections=sections)
    _check(spec, fail)
    return spec


def _convert_section(section: str, values: dict[str, Any], fail) -> dict[str, Any]:
    keys = section_keys(section)
    converted: dict[str, Any] = {}
    for key, value in values.items():
        if key not in keys:
            shared = " (it is a top-level key: move it above the first section)" if key in SHARED else ""
            fail(section, key, f'unknown key "{key}" in [{section}]{shared or _suggest(key, list(keys))}')
        cls, f = keys[key]
        hint = typing.get_type_hints(cls)[f.name]
        text_form = f.metadata["option"].parse is not None and (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, str) for item in value)))
        if not text_form and not coerce(value, hint)[0]:
            fail(section, key, f"[{section}] {key} must be {describe_type(hint)}, got {_show(value)}")
        try:
            converted[key] = convert_value(f, value, hint)
        except BadInputError as error:
            fail(section, key, f"[{section}] {_as_key(str(error), key)}")
    return converted


def _as_key(message: str, key: str) -> str:
    """A config's message in a spec's words: its ``--option`` named as the spec key."""
    return message.replace(f"--{key.replace('_', '-')}", key)


def _check(spec: Spec, fail) -> None:
    """Each section's configs built as its command builds them (every value checked before any step runs)."""
    if spec.pretrained and spec.checkpoint:
        fail(None, "pretrained", "use either pretrained = true or checkpoint = \"...\", not both")
    from ..models.checkpoint_series import is_checkpoint_series

    if is_checkpoint_series(spec.checkpoint):  # the pipeline refines one set of weights
        fail(None, "checkpoint", f"checkpoint = \"{spec.checkpoint}\" names a series of checkpoints (a glob or a run "
                                 "folder): a spec starts from one file; profile a series with `mimprobe profile`")
    for key in ("img_size", "threads"):
        value = getattr(spec, key)
        if value is not None and value < 1:
            fail(None, key, f"{key} must be at least 1, got {value}")
    for section, classes in SECTIONS.items():
        if section not in spec.sections:
            continue
        for cls in classes:
            try:
                spec.config(section, cls)
            except BadInputError as error:
                message = str(error)
                key = next((name for name in spec.sections[section]
                            if f"--{name.replace('_', '-')}" in message), None)
                fail(section, key, f"[{section}] {_as_key(message, key) if key else message}")


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else f" (known: {', '.join(candidates)})"


# --------------------------------------------------------------------------------------------- line numbers

_HEADER = re.compile(r"""^\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$""")
_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_\-]+(?:\s*\.\s*[A-Za-z0-9_\-]+)*)\s*=""")


def _find_line(text: str, section: str | None, key: str | None) -> int | None:
    """1-based line of ``key`` in ``[section]`` (``section`` None: the top level; ``key`` None: the header).

    Reads TOML's common forms: ``[section]`` then ``key = ...``, a dotted ``section.key = ...`` at the top level,
    and quoted keys; lines inside multi-line strings are skipped. None when not found (an inline table)."""
    current: str | None = None
    in_string: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if in_string:
            if line.count(in_string) % 2 == 1:
                in_string = None
            continue
        header = _HEADER.match(line)
        if header and not line.startswith("[["):
            current = ".".join(part.strip().strip("\"'") for part in header.group(1).split("."))
            if current == (section if key is None else key if section is None else None):
                return number  # a section's header (or an unknown table named like a top-level key)
            continue
        match = _KEY.match(line)
        if match:
            name = ".".join(part.strip().strip("\"'") for part in match.group(1).split("."))
            full = f"{current}.{name}" if current else name
            target = f"{section}.{key}" if section and key else (section if key is None else key)
            if full == target or (key is None and section and current is None and full.startswith(f"{section}.")):
                return number
            rest = line[match.end():]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    in_string = quote
    return None
