"""One definition per option: every stage's options are declared once, as fields of its frozen config dataclass
(nanoGPT's ``GPTConfig``), with their default, help text, choices, bounds and text form; the Typer command, the TOML
spec section and the Python function's keywords are derived from those fields.

A field declared with `option` carries an `OptionInfo` in its metadata::

    @dataclass(frozen=True)
    class ExtractConfig:
        batch_size: int = option(64, "Images per forward pass.", minimum=1)
        poolings: tuple[str, ...] = option(("cls",), "cls, mean, cls+mean, a comma list, or all.", flag="pool",
                                           parse=parse_poolings, choices=POOLINGS)

        def __post_init__(self) -> None:
            check_options(self)       # choices and bounds, the same for CLI, spec and API

* `build_config` turns keywords (Python values, or the CLI's and the spec's text forms such as ``"cls,mean"``) into
  a config, refusing unknown names with a suggestion;
* `typer_parameters` gives the Typer options of a command (``--batch-size``; ``--wait/--no-wait`` for a boolean
  whose default is true), each defaulting to None so that only what the user typed reaches the config: the
  dataclass is the one place a default lives;
* `pipeline.spec` reads a spec section with `build_config` on the same classes.

This module imports nothing of mimprobe but its errors, so every layer may use it.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import BadInputError


@dataclass(frozen=True)
class OptionInfo:
    """How one config field appears to users.

    Attributes:
        help: Help text (the CLI's, the spec's documentation); the default is appended where it helps.
        flag: CLI and keyword name when it differs from the field name (``pool`` for ``poolings``).
        short: Short CLI flags such as ``-o``.
        parse: Turns the text form (CLI, spec strings) into the field's value; raises `BadInputError`.
        choices: Allowed values (each item for tuples).
        minimum: Smallest allowed value of a number.
        cli: Whether the command line offers it.
        spec: Whether a TOML spec section offers it.
        show_default: Text of the default in help (None: derived from the default).
    """

    help: str
    flag: str | None = None
    short: tuple[str, ...] = ()
    parse: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    cli: bool = True
    spec: bool = True
    show_default: str | None = None


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, flag: str | None = None,
           short: str | tuple[str, ...] = (), parse: Callable[[str], Any] | None = None,
           choices: Iterable[Any] | None = None, minimum: float | None = None, cli: bool = True, spec: bool = True,
           show_default: str | None = None) -> Any:
    """A dataclass field that is a user-facing option (see the module docstring)."""
    info = OptionInfo(help=help, flag=flag, short=(short,) if isinstance(short, str) else tuple(short), parse=parse,
                      choices=None if choices is None else tuple(choices), minimum=minimum, cli=cli, spec=spec,
                      show_default=show_default)
    return field(default=default, default_factory=default_factory, metadata={"option": info})


def option_fields(cls: type) -> list[tuple[dataclasses.Field, OptionInfo]]:
    """The option fields of a config class, in declaration order."""
    return [(f, f.metadata["option"]) for f in fields(cls) if "option" in f.metadata]


def public_name(f: dataclasses.Field) -> str:
    """The keyword / spec key of a field (its ``flag`` when set, else its name)."""
    info = f.metadata.get("option")
    return info.flag if info is not None and info.flag else f.name


def cli_flag(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def default_text(f: dataclasses.Field) -> str | None:
    """The default as a user would type it (None when there is nothing useful to show)."""
    info: OptionInfo = f.metadata["option"]
    if info.show_default is not None:
        return info.show_default
    value = _default_of(f)
    if value is MISSING or value is None or value is False:
        return None
    if isinstance(value, (tuple, list)):
        return ",".join(str(item) for item in value)
    return str(value)


# ---------------------------------------------------------------------------------- options shared by stages

def device_option() -> Any:
    """``--device``: one definition for every stage that runs a model or a metric."""
    return option("auto", "auto (cuda when available), cpu, cuda or cuda:N.")


def img_size_option() -> Any:
    """``--img-size``: one definition for every stage that builds the model."""
    return option(None, "Square input size for small images (model built for it, position embeddings resampled; "
                        "images resized whole, no crop), e.g. 32 for CIFAR.", minimum=1)


def seed_option(what: str) -> Any:
    return option(0, f"Seed of {what}.")


def threads_option() -> Any:
    """``--threads``: applied by `mimprobe._threads.cpu_threads` around the whole command."""
    return option(None, "CPU threads of torch, BLAS/OpenMP (threadpoolctl) and FAISS for the whole command "
                        "[default: the libraries' own]; on a busy machine 1 is often the fastest.", minimum=1)


# ------------------------------------------------------------------------------------------------- validation

def check_options(config: Any) -> None:
    """Check every option field of a config instance against its choices and bounds (call in ``__post_init__``).

    Raises:
        BadInputError: A value outside its choices or below its minimum, naming the option as typed.
    """
    for f, info in option_fields(type(config)):
        value = getattr(config, f.name)
        name = cli_flag(public_name(f))
        if info.choices is not None and value is not None:
            items = value if isinstance(value, (tuple, list)) else (value,)
            for item in items:
                if item not in info.choices:
                    raise BadInputError(f"unknown {name} value {item!r}: use {', '.join(map(str, info.choices))}"
                                        f"{_suggest_text(str(item), [str(c) for c in info.choices])}")
        if info.minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and value < info.minimum:
            bound = int(info.minimum) if float(info.minimum).is_integer() else info.minimum
            raise BadInputError(f"{name} must be at least {bound}, got {value}")


def _suggest_text(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


# ---------------------------------------------------------------------------------------- values to a config

def convert_value(f: dataclasses.Field, value: Any, hint: Any) -> Any:
    """A user's value for field ``f``: its text form parsed, lists as tuples, ints accepted for floats.

    Raises:
        BadInputError: A value of the wrong type, naming the option and what it takes.
    """
    info: OptionInfo = f.metadata["option"]
    if isinstance(value, str) and info.parse is not None:
        return info.parse(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, str) for item in value) \
            and info.parse is not None:  # ["cls", "mean"] or ["all"]: the list form of "cls,mean"
        return info.parse(",".join(value))
    if isinstance(value, Path) and _accepts(hint, str):
        value = str(value)
    ok, converted = coerce(value, hint)
    if not ok:
        raise BadInputError(f"{cli_flag(public_name(f))} must be {describe_type(hint)}, got {value!r}")
    return converted


def build_config(cls: type, values: Mapping[str, Any], *, base: Any = None) -> Any:
    """A ``cls`` instance from keywords named as the options are (`public_name`), over ``base`` or the defaults.

    Raises:
        BadInputError: An unknown keyword (with the closest known one), a wrong type or an invalid value.
    """
    by_name = {public_name(f): f for f, _ in option_fields(cls)}
    hints = typing.get_type_hints(cls)
    converted: dict[str, Any] = {}
    for name, value in values.items():
        f = by_name.get(name)
        if f is None:
            raise BadInputError(f"unknown option {name!r}{_suggest_text(name, list(by_name))}: the options are "
                                f"{', '.join(by_name)}")
        converted[f.name] = convert_value(f, value, hints[f.name])
    if base is not None:
        return dataclasses.replace(base, **converted)
    return cls(**converted)


def split_options(classes: Iterable[type], values: Mapping[str, Any]) -> dict[type, dict[str, Any]]:
    """Route keywords to the config classes that declare them (a name shared by several goes to each).

    Raises:
        BadInputError: A keyword no class declares, with the closest known one.
    """
    classes = list(classes)
    known = {cls: {public_name(f) for f, _ in option_fields(cls)} for cls in classes}
    routed: dict[type, dict[str, Any]] = {cls: {} for cls in classes}
    every = sorted(set().union(*known.values()))
    for name, value in values.items():
        owners = [cls for cls in classes if name in known[cls]]
        if not owners:
            raise BadInputError(f"unknown option {name!r}{_suggest_text(name, every)}: the options are "
                                f"{', '.join(every)}")
        for cls in owners:
            routed[cls][name] = value
    return routed


def config_values(config: Any) -> dict[str, Any]:
    """{public name: value} of every option field of a config instance."""
    return {public_name(f): getattr(config, f.name) for f, _ in option_fields(type(config))}


# ------------------------------------------------------------------------------------------------ type checks

def _accepts(hint: Any, kind: type) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(option, kind) for option in args)
    return hint is kind


def coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether a value fits a type hint, and the value converted (int -> float, list -> tuple)."""
    if hint is Any:
        return True, value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args, None
        for option_type in args:
            if option_type is type(None):
                continue
            ok, result = coerce(value, option_type)
            if ok:
                return True, result
        return False, None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, None
        if len(args) == 2 and args[1] is Ellipsis:
            items = [coerce(item, args[0]) for item in value]
        elif len(value) == len(args):
            items = [coerce(item, arg) for item, arg in zip(value, args)]
        else:
            return False, None
        if not all(ok for ok, _ in items):
            return False, None
        return True, tuple(result for _, result in items)
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    if origin in (list, collections.abc.Sequence):  # a list of blocks: kept as a list
        if not isinstance(value, (list, tuple)):
            return False, None
        items = [coerce(item, args[0]) for item in value] if args else [(True, item) for item in value]
        return all(ok for ok, _ in items), [result for _, result in items]
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
    if hint is type(None):
        return value is None, None
    raise TypeError(f"option type {hint!r} is not supported")


def describe_type(hint: Any) -> str:
    """Words for a type hint (``int | None`` -> ``an integer``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(option) for option in args if option is not type(None))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}"
    if origin is dict or hint is dict:
        return "a table of key = value"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _plural(hint: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(hint, str(hint))


# ---------------------------------------------------------------------------------------------------- Typer

def _cli_type(hint: Any, info: OptionInfo) -> Any:
    """The type Typer parses: text for options with a text form, else the plain type, always optional."""
    if info.parse is not None:
        return typing.Optional[str]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        plain = [option for option in args if option is not type(None)]
        if len(plain) == 1:
            return typing.Optional[plain[0]]
        return typing.Optional[str]
    if hint in (bool, int, float, str):
        return typing.Optional[hint]
    return typing.Optional[str]


def typer_parameters(classes: Iterable[type], *, only: Mapping[type, Iterable[str]] | None = None,
                     defaults: Mapping[str, Any] | None = None) -> list[inspect.Parameter]:
    """Keyword-only `inspect.Parameter`s with ``typer.Option`` defaults for every CLI option of ``classes`` (a name
    declared by several classes appears once, from the first; ``only`` limits a class to some names), all
    defaulting to None (not typed: not passed), except required options. ``defaults``: a command's own defaults of
    some options (shown in help instead of the class's)."""
    import typer

    parameters: dict[str, inspect.Parameter] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        allowed = None if only is None or cls not in only else set(only[cls])
        for f, info in option_fields(cls):
            name = public_name(f)
            if not info.cli or name in parameters or (allowed is not None and name not in allowed):
                continue
            hint = hints[f.name]
            shown = default_text(f) if name not in (defaults or {}) else _text(defaults[name])
            help_text = info.help + (f" [default: {shown}]" if shown and info.show_default != "" else "")
            flag = cli_flag(name)
            if hint is bool:
                declared = [f"{flag}/--no-{name.replace('_', '-')}" if _default_of(f) is True else flag]
                cli_type: Any = typing.Optional[bool]
            else:
                declared = [flag]
                cli_type = _cli_type(hint, info)
            required = _default_of(f) is MISSING
            if required:
                cli_type = typing.get_args(cli_type)[0] if typing.get_origin(cli_type) is typing.Union else cli_type
            default = typer.Option(... if required else None, *declared, *info.short, help=help_text,
                                   show_default=False)
            parameters[name] = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                 annotation=cli_type)
    return list(parameters.values())


def _text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def given(values: Mapping[str, Any]) -> dict[str, Any]:
    """The options a user typed: Typer gives None for the others."""
    return {name: value for name, value in values.items() if value is not None}
