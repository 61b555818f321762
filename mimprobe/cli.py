"""The ``mimprobe`` command line (Typer). Every command is derived from its entry in `mimprobe.pipeline.api`: its
options are the fields of the command's config classes (`mimprobe.options`), and its body calls the same Python
function as ``mimprobe.<command>(...)`` does. Commands only parse arguments and print results."""

from __future__ import annotations

import inspect
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from ._disk import DISK_FULL_ERRNOS, DiskFullError
from .errors import MimprobeError
from .options import given, typer_parameters
from .cli_help import (COMPARE_EPILOG, DEMO_EPILOG, EXTRACT_EPILOG, INFO_EPILOG, PLACE_EPILOG, PRETRAIN_EPILOG,
                       PROFILE_EPILOG, REFINE_EPILOG, RUN_EPILOG)

app = typer.Typer(
    name="mimprobe",
    help="Profile every block of a vision transformer, place refinement heads from the profile, refine, compare.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _guarded(debug: bool, action: Callable[[], Any]) -> Any:
    """Run a command body: mimprobe errors become one line and their exit code (2 for bad input), anything
    else exit 1 with one line; ``--debug`` shows tracebacks."""
    try:
        return action()
    except typer.Exit:
        raise
    except MimprobeError as error:
        if debug:
            traceback.print_exc()
        _fail(str(error), error.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; rerun the same command to resume", 130)
    except Exception as error:  # unexpected: still one line unless --debug
        if debug:
            traceback.print_exc()
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:  # a write no guard names more exactly
            _fail(str(DiskFullError(error.filename or "a file", None)), 2)
        first = (str(error).strip().splitlines() or [""])[0]
        _fail(f"{type(error).__name__}: {first} (rerun with --debug for the traceback)", 1)


def _echo_err(message: str) -> None:
    typer.echo(message, err=True)


def _say_random_init(manifest: dict[str, Any]) -> None:
    """Say so on stderr when a store's weights are a random init: its numbers then describe an untrained network.
    (After the command ran: bad input still ends with its one-line error only.)"""
    model = manifest.get("model") or {}
    if model.get("weights") == "random":
        typer.echo(f"weights: random init (seeded) of {model.get('name')}: no --checkpoint or --pretrained was "
                   "given, so these numbers describe an untrained network", err=True)




# ---- how commands are derived

def _argument(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)


MODEL_HELP = ("timm model name, e.g. vit_base_patch16_224 (add a tag such as .mae with --pretrained), a "
              "transformers folder or hf:ORG/NAME where supported.")
DATA_HELP = ("Image folder (root/CLASS/*, or root/train plus root/val or root/test), a .npz (x_train, y_train, "
             "x_test, y_test), or a built-in: digits, synthetic.")
JSON_PARAMETER = inspect.Parameter("json_output", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                   default=typer.Option(False, "--json", help="Print machine-readable results on "
                                                                              "stdout."))
DEBUG_PARAMETER = inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                    default=typer.Option(False, "--debug", help="Show the full traceback on errors."))


def _derived(name: str, *, arguments: list[inspect.Parameter], run: Callable[..., Any], doc: str, epilog: str,
             json_flag: bool = True, extra: list[inspect.Parameter] = ()) -> None:
    """Register command ``name`` of `mimprobe.commands.COMMANDS`: its arguments, then its options, then --json
    and --debug. ``run(arguments, options, json_output)`` calls the API function and prints the result."""
    from .commands import COMMANDS

    command = COMMANDS[name]
    parameters = [*arguments, *typer_parameters(command.options, only=command.only, defaults=command.defaults),
                  *([JSON_PARAMETER] if json_flag else []), DEBUG_PARAMETER, *extra]

    def handler(**values: Any) -> None:
        debug = values.pop("debug")
        json_output = values.pop("json_output", False)
        positional = {parameter.name: values.pop(parameter.name) for parameter in arguments}
        for parameter in extra:  # eager options handled by their callback (refine --recipe)
            values.pop(parameter.name, None)
        options = given(values)
        if json_output and "progress" in command.names():
            options.setdefault("progress", False)
        _guarded(debug, lambda: run(positional, options, json_output))

    handler.__signature__ = inspect.Signature(parameters)
    handler.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    handler.__doc__ = doc
    handler.__name__ = name.replace("-", "_")
    app.command(name, epilog=epilog)(handler)


def _text(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


# ---- command: extract

def _run_extract(arguments: dict[str, Any], options: dict[str, Any], json_output: bool) -> None:
    from .pipeline import api

    result = api.extract(arguments["model"], arguments["data"], log=_echo_err, **options)
    if result.rank != 0:  # under torchrun rank 0 reports for every rank
        return
    if not hasattr(result, "store"):  # a checkpoint series (`SeriesResult`)
        _say_series(result, json_output)
        return
    _say_random_init(result.store.manifest)
    summary = result.summary()
    if json_output:
        typer.echo(json.dumps(summary, indent=1))
        return
    rate = f", {summary['images_per_second']} img/s" if summary["images_per_second"] else ""
    splits = ", ".join(f"{name} {n:,}" for name, n in summary["splits"].items())
    typer.echo(f"store: {summary['store']}\n  {len(summary['blocks'])} blocks x "
               f"{', '.join(summary['poolings'])} ({summary['dtype']}); splits: {splits}; "
               f"{summary['images_processed']:,} images extracted in {summary['seconds']:.1f} s{rate}")


_derived("extract", arguments=[_argument("model", str, typer.Argument(..., help=MODEL_HELP)),
                               _argument("data", str, typer.Argument(..., help=DATA_HELP))],
         run=_run_extract, doc="Extract every block's features in one forward pass into a resumable feature store.",
         epilog=EXTRACT_EPILOG)


# ---- command: profile

def _run_profile(arguments: dict[str, Any], options: dict[str, Any], json_output: bool) -> None:
    from .metrics.labelfree.profile_calibration import calibration_lines
    from .metrics.profile import iter_best_lines
    from .metrics.readout import iter_readout_lines
    from .pipeline import api

    result = api.profile(arguments["target"], arguments["data"], log=_echo_err, **options)
    if result.rank != 0:  # under torchrun rank 0 reports for every rank
        return
    _say_random_init(result.store.manifest)
    if json_output:
        typer.echo(json.dumps(result.summary(), indent=1))
        return
    typer.echo("best blocks (0-based):")
    for line in iter_best_lines(result.best):
        typer.echo(f"  {line}")
    readouts = iter_readout_lines(result.table)
    if readouts:
        typer.echo("multi-block readouts (linear probe top-1, --readout):")
        for line in readouts:
            typer.echo(f"  {line}")
    if result.calibration is not None:
        for line in calibration_lines(result.calibration):
            typer.echo(line)
    typer.echo(f"wrote {', '.join(Path(path).name for path in result.files.values())} to {result.out} "
               f"({len(result.table):,} rows, {result.seconds:.1f} s)")


def _say_series(result: Any, json_output: bool) -> None:
    """A checkpoint series: per checkpoint, in training order, the first headline's best block."""
    from .metrics.profile import iter_best_lines

    if json_output:
        typer.echo(json.dumps(result.summary(), indent=1))
        return
    typer.echo("best block per checkpoint (0-based), in training order:")
    for item, profile, reused in zip(result.checkpoints, result.profiles, result.reused):
        first = next(iter_best_lines(profile.best), "no headline curve")
        typer.echo(f"  {item.name}{' (store reused)' if reused else ''}: {' '.join(first.split())}")
    typer.echo(f"wrote {', '.join(Path(path).name for path in result.files.values())} and one profile per "
               f"checkpoint to {result.out} ({len(result.table):,} rows, {result.seconds:.1f} s)")


_derived("profile", arguments=[_argument("target", str, typer.Argument(..., help="timm model name, or a feature "
                                                                                 "store folder.")),
                               _argument("data", Optional[str], typer.Argument(None, help="Data (image folder, "
                                         ".npz, digits, synthetic); with a store, checked against the store's "
                                         "dataset."))],
         run=_run_profile, doc="Measure every block with k-NN, linear probes, low-shot, clustering and effective "
                               "rank; find the best blocks.", epilog=PROFILE_EPILOG)


# ---- command: info

def _run_info(arguments: dict[str, Any], options: dict[str, Any], json_output: bool) -> None:
    from .pipeline import api

    report = api.info(arguments["model"], **options)
    if json_output:
        typer.echo(json.dumps(report, indent=1))
        return
    width = max(len(key) for key in report)
    for key, value in report.items():
        if value is not None and value != []:
            typer.echo(f"{key:<{width}}  {value}")


_derived("info", arguments=[_argument("model", str, typer.Argument(..., help=MODEL_HELP))], run=_run_info,
         doc="Print a model's blocks and their widths, prefix tokens, patch size, final norm and data config (and "
             "why).", epilog=INFO_EPILOG)


# ---- command: place

def _run_place(arguments: dict[str, Any], options: dict[str, Any], json_output: bool) -> None:
    from .pipeline import api
    from .placement import placement_path

    result = api.place(arguments["profile"], **options)
    target = placement_path(arguments["profile"], options.get("out"))
    if json_output:
        typer.echo(target.read_text().rstrip("\n"))
        return
    typer.echo(f"heads on blocks {', '.join(map(str, result.head_blocks))} (0-based, {len(result.head_blocks)} "
               f"of {result.num_blocks})" + (f"; first {result.freeze_blocks} blocks frozen"
                                             if result.freeze_blocks else ""))
    typer.echo(f"  {result.reason}")
    for note in result.notes:
        typer.echo(note if note.startswith("warning: ") else f"  note: {note}", err=note.startswith("warning: "))
    typer.echo(f"wrote {target}")


_derived("place", arguments=[_argument("profile", str, typer.Argument(..., help="Profile folder written by "
                                                                            "`mimprobe profile` (profile.parquet/"
                                                                            ".csv and profile.json)."))],
         run=_run_place, doc="Choose the blocks that get refinement heads from a profile; write placement.json.",
         epilog=PLACE_EPILOG)


# ---- command: refine

def _print_recipe(value: bool) -> None:
    if value:
        from .refinement.recipe import recipe_text

        typer.echo(recipe_text())
        raise typer.Exit()


def _run_refine(arguments: dict[str, Any], options: dict[str, Any], json_output: bool) -> None:
    from .pipeline import api

    result = api.refine(arguments["model"], arguments["data"],
                        log=_echo_err if json_output else None, **options)
    if json_output:
        typer.echo(json.dumps(result.summary(), indent=1))
    elif result.stopped_early:
        typer.echo(f"stopped after step {result.steps}: rerun the same command with --resume to continue")
    else:
        typer.echo(f"refined in {result.seconds:.1f} s ({result.steps} steps); wrote {result.export}")


RECIPE_PARAMETER = inspect.Parameter(
    "recipe", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
    default=typer.Option(False, "--recipe", is_eager=True, expose_value=False, callback=_print_recipe,
                         help="Print each default with its source line in the official MIM-Refiner configurations, "
                              "and exit."))
_derived("refine", arguments=[_argument("model", str, typer.Argument(..., help=MODEL_HELP)),
                              _argument("data", str, typer.Argument(..., help="Training images (image folder, .npz, "
                                                                             "digits, synthetic); the train split.")),
                              ],
         run=_run_refine, doc="Refine with Nearest-Neighbour-Alignment heads (MIM-Refiner) on the placed blocks; "
                              "export a timm checkpoint.", epilog=REFINE_EPILOG, extra=[RECIPE_PARAMETER])


# ---- command: compare

def _run_compare(arguments: dict[str, Any], options: dict[str, Any], json_output: bool) -> None:
    from .pipeline import api

    result = api.compare([str(path) for path in arguments["profiles"]],
                         log=None if json_output else _echo_err, **options)
    if json_output:
        typer.echo(json.dumps(result.summary(), indent=1))
        return
    for line in result.summary_lines():
        typer.echo(line)
    typer.echo(f"wrote {result.files['html']} and {len(result.files) - 1} more files ({result.seconds:.1f} s)")


_derived("compare", arguments=[_argument("profiles", list[Path], typer.Argument(..., help="Profile folders BEFORE "
                                         "AFTER [MORE...] from `mimprobe profile --out`."))],
         run=_run_compare, doc="Before/after report: block curves, per-block deltas with bootstrap intervals, best "
                               "blocks, CKA, per-class gains.", epilog=COMPARE_EPILOG)


# ---- command: pretrain-mae

def _run_pretrain(arguments: dict[str, Any], options: dict[str, Any], json_output: bool) -> None:
    from .pipeline import api

    result = api.pretrain_mae(arguments["model"], arguments["data"], log=_echo_err, **options)
    summary = result.summary()
    if json_output:
        typer.echo(json.dumps(summary, indent=1))
        return
    losses = result.epoch_losses
    trend = f", loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
    timing = f" in {result.seconds:.1f} s" if result.epochs_this_call else ""
    typer.echo(f"mae.pth: {result.export} ({result.epochs} epochs, {result.steps} steps{trend}){timing}\n"
               f"profile it: {result.profile_command()}")


_derived("pretrain-mae", arguments=[_argument("model", str, typer.Argument(..., help="timm ViT name, e.g. "
                                              "vit_tiny_patch16_224 (random init, or --checkpoint).")),
                                    _argument("data", str, typer.Argument(..., help="Image folder (labelled or "
                                              "not), a .npz, or a built-in: digits, synthetic."))],
         run=_run_pretrain, doc="Pre-train a ViT as a masked autoencoder (MAE) and export an official-layout MAE "
                                "checkpoint to profile.", epilog=PRETRAIN_EPILOG)


# ---- commands: run and demo (the pipeline; their options are the spec's)

def _pipeline_parameters() -> list[inspect.Parameter]:
    from .commands import PipelineRun

    return typer_parameters([PipelineRun])


def _register_pipeline(name: str, *, arguments: list[inspect.Parameter], call: Callable[..., Any], doc: str,
                       epilog: str) -> None:
    parameters = [*arguments, *_pipeline_parameters(), JSON_PARAMETER, DEBUG_PARAMETER]

    def handler(**values: Any) -> None:
        debug, json_output = values.pop("debug"), values.pop("json_output")
        positional = {parameter.name: values.pop(parameter.name) for parameter in arguments}
        options = given(values)
        progress = options.pop("progress", True) and not json_output
        log = _echo_err if json_output or not progress else None

        def body() -> None:
            result = call(**positional, **options, progress=progress, log=log)
            if json_output:
                typer.echo(json.dumps(result.summary(), indent=1))

        _guarded(debug, body)

    handler.__signature__ = inspect.Signature(parameters)
    handler.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    handler.__doc__ = doc
    handler.__name__ = name
    app.command(name, epilog=epilog)(handler)


def _run_spec(spec: str, **options: Any):
    from .pipeline import run_pipeline

    return run_pipeline(spec, **options)


def _run_demo(**options: Any):
    from .pipeline import run_demo

    return run_demo(**options)


_register_pipeline("run", arguments=[_argument("spec", str, typer.Argument(..., help="TOML spec of the analysis "
                                                                                     "(see analyses/)."))],
                   call=_run_spec, doc="Run the whole pipeline from a TOML spec: pretrain, profile, place, refine, "
                                       "profile again, compare.", epilog=RUN_EPILOG)
_register_pipeline("demo", arguments=[], call=_run_demo,
                   doc="The whole pipeline on built-in data, offline, on a CPU, in minutes: MAE, profile, place, "
                       "refine, compare.", epilog=DEMO_EPILOG)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"mimprobe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the version and exit.")) -> None:
    """Eager: runs while the arguments are parsed, before Typer asks for a command."""


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
