"""The declarative spec of `mimprobe run`: one TOML file per analysis, whose keys mirror the CLI options.

Layout (every section optional except the top-level keys ``name``, ``out``, ``model`` and ``data``)::

    name = "cifar10-cpu"              # free text, shown in the report
    out = "runs/cifar10-cpu"          # run folder (relative paths: to the current directory, as CLI options)
    model = "vit_tiny_patch16_224"    # timm name
    data = "../shared/cifar10"        # image folder, .npz, digits or synthetic[:...]
    checkpoint = "mae.pth"            # or pretrained = true; neither: random init (seeded)
    img_size = 32                     # device, seed, threads: shared by every step

    [pretrain]   # optional: MAE pre-training first (`mimprobe pretrain-mae`); its mae.pth is the checkpoint
    [profile]    # `mimprobe profile` options (before and after refinement alike)
    [place]      # `mimprobe place` options
    [refine]     # `mimprobe refine` options
    [compare]    # `mimprobe compare` options, and notes on what the run shows

`load_spec` reads and validates a file: an unknown key or a value of the wrong type is a `BadInputError` naming
the key and its line (tomllib reports no positions, so the line is found by scanning the text for the section
header and ``key =``). Defaults are those of the stage configurations (`MaeConfig`, `ProfileConfig`,
`RefineConfig`, `mimprobe.placement.place`), taken from them rather than repeated.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .._device import PRECISIONS
from ..errors import BadInputError
from ..features.pooling import POOLINGS
from ..features.store import STORE_DTYPES
from ..metrics.profile import METRICS, PRESETS, ProfileConfig
from ..placement import PLACEMENT_METRICS, RULES
from ..pretrain import MaeConfig
from ..refine import RefineConfig
from ..refine.config import HEAD_INITS, head_dims_fields
from ..report import CompareConfig


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


@dataclass(frozen=True)
class PretrainSpec:
    """``[pretrain]``: MAE pre-training (He et al. 2021, arXiv 2111.06377) on the train split before profiling;
    its ``mae.pth`` becomes the checkpoint of every later step. Options of ``mimprobe pretrain-mae``."""

    epochs: int = MaeConfig.epochs
    batch_size: int = MaeConfig.batch_size
    lr: float | None = MaeConfig.lr                 # None: 1.5e-4 x batch_size / 256 (official linear scaling)
    warmup_epochs: float = MaeConfig.warmup_epochs
    mask_ratio: float = MaeConfig.mask_ratio
    decoder_dim: int = MaeConfig.decoder_dim
    decoder_depth: int = MaeConfig.decoder_depth
    decoder_heads: int = MaeConfig.decoder_heads
    workers: int = MaeConfig.workers

    def config(self, spec: Spec) -> MaeConfig:
        return MaeConfig(img_size=spec.img_size, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                         warmup_epochs=self.warmup_epochs, mask_ratio=self.mask_ratio, decoder_dim=self.decoder_dim,
                         decoder_depth=self.decoder_depth, decoder_heads=self.decoder_heads, seed=spec.seed,
                         device=spec.device, workers=self.workers, threads=spec.threads)


@dataclass(frozen=True)
class ProfileSpec:
    """``[profile]``: how both profiles (before and after refinement) extract and measure every block."""

    metrics: tuple[str, ...] | str = field(default="all", metadata=_choices("all", *METRICS))
    preset: str = field(default=ProfileConfig.preset, metadata=_choices(*PRESETS))
    probe: str = field(default=ProfileConfig.probe, metadata=_choices("batched", "sklearn"))
    pool: tuple[str, ...] | str = field(default=("cls", "mean"), metadata=_choices(*POOLINGS))  # or "all"
    blocks: str | tuple[int, ...] = "all"          # "all", "last:N", or a list of 0-based blocks
    norm: str = field(default="raw", metadata=_choices("raw", "final"))
    batch_size: int = 64
    workers: int = 0
    store_dtype: str = field(default="float16", metadata=_choices(*STORE_DTYPES))
    val_fraction: float = ProfileConfig.val_fraction

    def config(self, spec: Spec) -> ProfileConfig:
        return ProfileConfig(metrics=None if self.metrics == "all" else self.metrics, preset=self.preset,
                             probe=self.probe, val_fraction=self.val_fraction, seed=spec.seed, threads=spec.threads,
                             device=spec.device)

    def extract_options(self, spec: Spec) -> dict[str, Any]:
        from ..blocks import parse_block_spec

        blocks = parse_block_spec(self.blocks) if isinstance(self.blocks, str) else list(self.blocks)
        return {"blocks": blocks, "poolings": self.pool, "norm": self.norm, "batch_size": self.batch_size,
                "workers": self.workers, "device": spec.device, "img_size": spec.img_size,
                "store_dtype": self.store_dtype}


@dataclass(frozen=True)
class PlaceSpec:
    """``[place]``: the head placement read from the profile before refinement (`mimprobe.placement.place`).

    ``rule`` defaults to ``peak``, or ``explicit`` when ``blocks`` is given, ``last-n`` when ``n`` is."""

    rule: str | None = field(default=None, metadata=_choices(*RULES))
    metric: str = field(default="knn", metadata=_choices(*PLACEMENT_METRICS))
    pooling: str = field(default="cls", metadata=_choices(*POOLINGS))
    max_heads: int | None = None
    plateau: float | None = None                   # None: follows the validation curve's standard error
    freeze: int | float | None = None              # first blocks kept frozen: a count (6) or a fraction (0.25)
    blocks: tuple[int, ...] | None = None
    n: int | None = None

    @property
    def resolved_rule(self) -> str:
        return self.rule or ("explicit" if self.blocks is not None else "last-n" if self.n is not None else "peak")

    def options(self) -> dict[str, Any]:
        """Keyword options of `run_place`."""
        return {"rule": self.resolved_rule, "metric": self.metric, "pooling": self.pooling, "max_heads": self.max_heads,
                "plateau": self.plateau, "freeze": self.freeze,
                "blocks": None if self.blocks is None else list(self.blocks), "n": self.n}


@dataclass(frozen=True)
class RefineSpec:
    """``[refine]``: NNA refinement (MIM-Refiner, arXiv 2402.10093) on the placed blocks; `RefineConfig` fields
    under the names of the ``mimprobe refine`` options (``head_dims`` = projector hidden, projection, predictor
    hidden widths; ``monitor`` = labelled images of the per-epoch k-NN monitor)."""

    epochs_heads: int = RefineConfig.epochs_heads
    epochs: int = RefineConfig.epochs
    batch_size: int = RefineConfig.batch_size
    accumulate: int = RefineConfig.accumulate
    lr_heads: float = RefineConfig.lr_heads
    lr: float = RefineConfig.lr
    min_lr: float = RefineConfig.min_lr
    warmup_epochs: float = RefineConfig.warmup_epochs
    warmup_fraction: float | None = RefineConfig.warmup_fraction
    layer_decay: float = RefineConfig.layer_decay
    weight_decay: float = RefineConfig.weight_decay
    temperature: float = RefineConfig.temperature
    queue_size: int | None = RefineConfig.queue_size
    topk: int = RefineConfig.topk
    head_dims: tuple[int, int, int] | str = RefineConfig.head_widths   # three widths, or auto/official/proportional
    head_init: str = field(default=RefineConfig.head_init, metadata=_choices(*HEAD_INITS))
    local_crops: int = RefineConfig.local_crops
    local_size: int | None = RefineConfig.local_size
    local_scale: tuple[float, float] = RefineConfig.local_scale
    global_scale_min: float = RefineConfig.global_scale_min  # smallest crop area of the two global views
    ema_decay: float | None = RefineConfig.ema_decay
    ema_warmup: bool = RefineConfig.ema_warmup
    clip_grad: float | None = RefineConfig.clip_grad
    monitor: int = RefineConfig.monitor_images
    workers: int = RefineConfig.num_workers
    precision: str = field(default=RefineConfig.precision, metadata=_choices(*PRECISIONS))

    def config(self, spec: Spec) -> RefineConfig:
        return RefineConfig(epochs_heads=self.epochs_heads, epochs=self.epochs, batch_size=self.batch_size,
                            accumulate=self.accumulate, lr_heads=self.lr_heads, lr=self.lr, min_lr=self.min_lr,
                            warmup_epochs=self.warmup_epochs, warmup_fraction=self.warmup_fraction,
                            layer_decay=self.layer_decay, weight_decay=self.weight_decay,
                            temperature=self.temperature, queue_size=self.queue_size, topk=self.topk,
                            **head_dims_fields(self.head_dims),
                            head_init=self.head_init, local_crops=self.local_crops, local_size=self.local_size,
                            local_scale=tuple(self.local_scale), global_scale_min=self.global_scale_min,
                            ema_decay=self.ema_decay, ema_warmup=self.ema_warmup, clip_grad=self.clip_grad,
                            img_size=spec.img_size,
                            precision=self.precision, seed=spec.seed, num_workers=self.workers,
                            monitor_images=self.monitor)


@dataclass(frozen=True)
class CompareSpec:
    """``[compare]``: the before/after report (`CompareConfig` options). ``notes`` says in plain words what the
    run does and does not show; it heads the run folder's README.md."""

    notes: str = ""
    resamples: int = CompareConfig.resamples        # paired bootstrap resamples per interval
    level: float = CompareConfig.level              # coverage of the intervals
    cka: bool = CompareConfig.cka                   # block-by-block CKA heatmap of before vs after
    cka_rows: int = CompareConfig.cka_rows          # evaluation rows used for CKA (seeded subset)
    cka_pooling: str = field(default=CompareConfig.cka_pooling, metadata=_choices(*POOLINGS))

    def config(self, spec: Spec) -> CompareConfig:
        return CompareConfig(resamples=self.resamples, level=self.level, seed=spec.seed, cka_rows=self.cka_rows,
                             cka_pooling=self.cka_pooling, cka=self.cka)


SECTIONS: dict[str, type] = {"pretrain": PretrainSpec, "profile": ProfileSpec, "place": PlaceSpec,
                             "refine": RefineSpec, "compare": CompareSpec}
REQUIRED = ("name", "out", "model", "data")


@dataclass(frozen=True)
class Spec:
    """One analysis: the model and data, shared options, and one section per pipeline step."""

    name: str
    out: str                                        # the run folder
    model: str                                      # timm name (a tag such as .mae with pretrained = true)
    data: str                                       # image folder, .npz, digits, synthetic[:...]
    checkpoint: str | None = None                   # starting weights (any format mimprobe reads)
    pretrained: bool = False                        # timm's pretrained weights (needs the network once)
    img_size: int | None = None                     # square input size for small images, in every step
    device: str = "auto"
    seed: int = 0                                   # every step's seed
    threads: int | None = None                      # torch, BLAS and FAISS CPU threads (None: library defaults)
    pretrain: PretrainSpec | None = None            # None: no pre-training step
    profile: ProfileSpec = field(default_factory=ProfileSpec)
    place: PlaceSpec = field(default_factory=PlaceSpec)
    refine: RefineSpec = field(default_factory=RefineSpec)
    compare: CompareSpec = field(default_factory=CompareSpec)

    def resolved(self) -> dict[str, Any]:
        """Every key with its value, defaults filled in, as JSON types (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    def with_overrides(self, overrides: dict[str, Any]) -> Spec:
        """A copy with top-level keys or ``{"section": {key: value}}`` replaced (validated like a file's)."""
        values = self.resolved()
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


def spec_from_dict(values: dict[str, Any], *, source: _Source | None = None) -> Spec:
    """Validate parsed TOML (or an equivalent dict) into a `Spec`; see `load_spec`."""

    def fail(section: str | None, key: str | None, message: str) -> None:
        where = source.name if source else "spec"
        line = _find_line(source.text, section, key) if source else None
        raise BadInputError(f"{where} line {line}: {message}" if line else f"{where}: {message}")

    top_names = [f.name for f in fields(Spec) if f.name not in SECTIONS]
    for key, value in values.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                fail(None, key, f"{key} must be a section [{key}], got {_show(value)}")
        elif isinstance(value, dict):
            close = difflib.get_close_matches(key, list(SECTIONS), n=1, cutoff=0.6)
            fail(None, key, f"unknown section [{key}]" + (f" (did you mean [{close[0]}]?)" if close else
                                                           f" (known: {', '.join(f'[{s}]' for s in SECTIONS)})"))
        elif key not in top_names:
            fail(None, key, f'unknown key "{key}" at the top level{_suggest(key, [*top_names, *SECTIONS])}')
    missing = [key for key in REQUIRED if key not in values]
    if missing:
        fail(None, None, f'missing key "{missing[0]}" at the top level: add {missing[0]} = "..." (the required keys '
                         f"are {', '.join(REQUIRED)})")
    top = _convert(Spec, {k: v for k, v in values.items() if k not in SECTIONS}, None, fail)
    sections = {name: _convert(cls, values[name], name, fail) for name, cls in SECTIONS.items() if name in values}
    spec = Spec(**top, **sections)
    _check(spec, fail)
    return spec


def _convert(cls: type, values: dict[str, Any], section: str | None, fail) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if section is not None or f.name not in SECTIONS}
    label = f"[{section}] " if section else ""
    converted: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            where = f"in [{section}]" if section else "at the top level"
            fail(section, key, f'unknown key "{key}" {where}{_suggest(key, list(known))}')
        ok, result = _coerce(value, hints[key])
        if not ok:
            fail(section, key, f"{label}{key} must be {_describe(hints[key])}, got {_show(value)}")
        result = _normalise(key, result)
        choices = known[key].metadata.get("choices")
        if choices:
            for item in (result if isinstance(result, tuple) else (result,)):
                if item not in choices:
                    fail(section, key, f"{label}{key} must be one of {', '.join(choices)}, got {_show(item)}"
                                       f"{_suggest(str(item), list(choices))}")
        converted[key] = result
    if section is None:
        return converted
    return cls(**converted)


def _normalise(key: str, value: Any) -> Any:
    """The CLI's forms of ``[profile]`` lists: ``pool = "cls,mean"`` or ``"all"``, ``metrics = "knn,linear"``
    become tuples; ``metrics = "all"`` (or ``["all"]``) stays ``"all"``."""
    if key not in ("pool", "metrics"):
        return value
    items = tuple(part.strip() for part in value.split(",") if part.strip()) if isinstance(value, str) else value
    if items == ("all",):
        return "all" if key == "metrics" else POOLINGS
    return items


def _check(spec: Spec, fail) -> None:
    """Checks across keys, and the stage configurations' own validation, with the key's line where possible."""
    if spec.pretrained and spec.checkpoint:
        fail(None, "pretrained", "use either pretrained = true or checkpoint = \"...\", not both")
    for key in ("img_size", "threads"):
        value = getattr(spec, key)
        if value is not None and value < 1:
            fail(None, key, f"{key} must be at least 1, got {value}")
    profile = spec.profile
    if profile.metrics != "all" and "all" in profile.metrics:
        fail("profile", "metrics", 'metrics = "all" cannot be combined with other metrics: give "all" or a list')
    if isinstance(profile.blocks, str):
        try:
            from ..blocks import parse_block_spec

            parse_block_spec(profile.blocks)
        except BadInputError as error:
            fail("profile", "blocks", f"[profile] {error}")
    place = spec.place
    for key, owner in (("max_heads", "peak"), ("n", "last-n"), ("blocks", "explicit")):
        rule = place.resolved_rule
        if getattr(place, key) is not None and rule != owner:
            fail("place", key, f"[place] {key} belongs to rule {owner}, not {rule}: drop it or set rule = \"{owner}\"")
    if place.blocks is not None and place.n is not None:
        fail("place", "n", "[place] give either blocks (rule explicit) or n (rule last-n), not both")
    try:
        spec.refine.config(spec)  # RefineConfig validates itself: fail now, not after pre-training and profiling
    except BadInputError as error:
        fail("refine", None, f"[refine] {error}")


# ------------------------------------------------------------------------------------------------- type checks

def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether a TOML value fits a type hint, and the value converted (int → float, list → tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if option is type(None):
                continue
            ok, result = _coerce(value, option)
            if ok:
                return True, result
        return False, None
    if origin is tuple:
        if not isinstance(value, list):
            return False, None
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(item, args[0]) for item in value]
        elif len(value) == len(args):
            items = [_coerce(item, arg) for item, arg in zip(value, args)]
        else:
            return False, None
        if not all(ok for ok, _ in items):
            return False, None
        return True, tuple(result for _, result in items)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, None
    if hint is str:
        return isinstance(value, str), value
    raise TypeError(f"spec field type {hint!r} is not supported")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in args if option is not type(None))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _plural(hint: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}[hint]


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
