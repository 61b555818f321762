"""The ``mimprobe`` command line (Typer). Commands only parse options and call the Python API."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from .errors import MimprobeError

app = typer.Typer(
    name="mimprobe",
    help="Profile every block of a vision transformer, place refinement heads from the profile, refine, compare.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

DEBUG_HELP = "Show the full traceback on errors."
THREADS_HELP = ("CPU threads of torch, BLAS/OpenMP (threadpoolctl) and FAISS for the whole command [default: the "
                "libraries' own]; on a busy machine 1 is often the fastest.")


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _guarded(debug: bool, action: Callable[[], Any], *, threads: int | None = None) -> Any:
    """Run a command body: mimprobe errors become one line and their exit code (2 for bad input), anything
    else exit 1 with one line; ``--debug`` shows tracebacks. ``threads``: `mimprobe._threads.cpu_threads`."""
    try:
        if threads is None:
            return action()
        from ._threads import cpu_threads

        with cpu_threads(threads):
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
        first = (str(error).strip().splitlines() or [""])[0]
        _fail(f"{type(error).__name__}: {first} (rerun with --debug for the traceback)", 1)


def _preprocessing_options(mean: str | None, std: str | None, interpolation: str | None, crop_pct: float | None,
                           model_kwargs: str | None) -> dict[str, Any]:
    """--mean/--std/--interpolation/--crop-pct/--model-kwargs as `ExtractConfig` fields (None: not given)."""
    from .data.transforms import parse_channel_values
    from .models.loading import parse_model_kwargs

    parsed = {"mean": parse_channel_values(mean, "--mean"), "std": parse_channel_values(std, "--std"),
              "interpolation": interpolation, "crop_pct": crop_pct}
    options = {key: (tuple(value) if isinstance(value, list) else value) for key, value in parsed.items()}
    options["model_kwargs"] = parse_model_kwargs(model_kwargs) or None
    return options


def _say_random_init(manifest: dict[str, Any]) -> None:
    """Say so on stderr when a store's weights are a random init: its numbers then describe an untrained network.
    (After the command ran: bad input still ends with its one-line error only.)"""
    model = manifest.get("model") or {}
    if model.get("weights") == "random":
        typer.echo(f"weights: random init (seeded) of {model.get('name')}: no --checkpoint or --pretrained was "
                   "given, so these numbers describe an untrained network", err=True)


def _parse_poolings(text: str) -> tuple[str, ...]:
    from .errors import BadInputError
    from .features import POOLINGS

    if text.strip() == "all":
        return POOLINGS
    poolings = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [p for p in poolings if p not in POOLINGS]
    if unknown or not poolings:
        raise BadInputError(f"unknown pooling {unknown[0] if unknown else text!r}: use {', '.join(POOLINGS)}, "
                            "a comma list of them, or all")
    return poolings


# The preprocessing and model options shared by extract, profile and info (one definition, one help text).
MEAN_OPTION = typer.Option(None, "--mean", help="Normalisation mean R,G,B [default: the checkpoint family's "
                           "evaluation preprocessing, else timm's data config of the model].")
STD_OPTION = typer.Option(None, "--std", help="Normalisation std R,G,B [default: as --mean].")
INTERPOLATION_OPTION = typer.Option(None, "--interpolation", help="Resize interpolation: bicubic, bilinear, ... "
                                    "[default: as --mean].")
CROP_PCT_OPTION = typer.Option(None, "--crop-pct", help="Centre-crop fraction: resize to size/crop_pct then crop "
                               "(0.875 = resize 256, crop 224) [default: as --mean; 1.0 with --img-size].")
MODEL_KWARGS_OPTION = typer.Option(None, "--model-kwargs", help="timm.create_model arguments: key=value,... or "
                                   "JSON, e.g. class_token=false,global_pool=avg.")


@app.command(epilog="""
**Examples**

* `mimprobe extract vit_tiny_patch16_224 digits --img-size 32 --out features`
* `mimprobe extract vit_base_patch16_224 ./imagenet-subset --checkpoint mae_pretrain_vit_base.pth --pool cls,mean --out features`
* `mimprobe extract vit_small_patch16_224 data.npz --blocks last:4 --store-dtype float32 --json --out features`

Run the same command again to resume an interrupted extraction or to reuse a finished one. Two runs that write
the same store take turns: the second waits for the first (or stops with `--no-wait`) and then reuses its store;
a run that was killed leaves nothing locked. A store is checked whenever it is opened (its manifest, and every
file's shape, dtype and size); `--verify` also reads every value, and `--overwrite` extracts a damaged store anew.

Across processes or machines: `torchrun --nproc_per_node N -m mimprobe.cli extract ...` (gloo on CPU, NCCL on GPU)
gives every process every N-th batch, written in place into the same store (a shared filesystem across machines):
the files are byte-identical to one process's, and a killed run resumes with any number of processes.
""")
def extract(
    model: str = typer.Argument(..., help="timm model name, e.g. vit_base_patch16_224 (add a tag such as .mae "
                                          "with --pretrained)."),
    data: str = typer.Argument(..., help="Image folder (root/CLASS/*, or root/train plus root/val or root/test), a .npz "
                                         "(x_train, y_train, x_test, y_test), or a built-in: digits, synthetic."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder that holds feature stores (one sub-folder per key)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Checkpoint file: timm, MAE, "
                                              "data2vec 2.0, MIM-Refiner, plain state dict (.pth/.pt/.bin/.safetensors)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Download timm's pretrained weights."),
    blocks: str = typer.Option("all", "--blocks", "-b", help="all, last:N, or a 0-based list such as 0,5,11 or 4-11 "
                                                            "(negative indices count from the end)."),
    pool: str = typer.Option("cls", "--pool", "-p", help="cls, mean (patch tokens only), cls+mean, a comma list, or all."),
    norm: str = typer.Option("raw", "--norm", help="raw block outputs, or final: the model's last norm applied."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    workers: int = typer.Option(0, "--workers", help="DataLoader worker processes for decoding images."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Square input size for small images "
                                           "(resized whole, no crop), e.g. 32 for CIFAR."),
    store_dtype: str = typer.Option("float16", "--store-dtype", help="float16 or float32."),
    mean: Optional[str] = MEAN_OPTION,
    std: Optional[str] = STD_OPTION,
    interpolation: Optional[str] = INTERPOLATION_OPTION,
    crop_pct: Optional[float] = CROP_PCT_OPTION,
    model_kwargs: Optional[str] = MODEL_KWARGS_OPTION,
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Skip undecodable images (recorded in "
                                         "the manifest) instead of stopping."),
    no_wait: bool = typer.Option(False, "--no-wait", help="When another run is writing the same store, stop "
                                 "(exit 2, naming its pid) instead of waiting for it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the store of these settings (damaged, or to "
                                   "start again) and extract it anew."),
    verify: bool = typer.Option(False, "--verify", help="Before reusing or resuming the store, read every value "
                                "(finite, no lost writes), compare its labels with the data's and extract the first "
                                "batch of every split again to compare."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Extract every block's features in one forward pass into a resumable feature store."""
    from .blocks import parse_block_spec
    from .features import extract as run_extract

    def body() -> None:
        result = run_extract(
            model, data, out=out, checkpoint=str(checkpoint) if checkpoint else None, pretrained=pretrained,
            blocks=parse_block_spec(blocks), poolings=_parse_poolings(pool), norm=norm, batch_size=batch_size,
            workers=workers, device=device, precision=precision, img_size=img_size, store_dtype=store_dtype,
            skip_bad_images=skip_bad_images, progress=not no_progress and not json_output, wait=not no_wait,
            overwrite=overwrite, verify=verify,
            **_preprocessing_options(mean, std, interpolation, crop_pct, model_kwargs),
            log=lambda message: typer.echo(message, err=True))
        if result.rank != 0:  # under torchrun rank 0 reports for every rank
            return
        _say_random_init(result.store.manifest)
        summary = result.summary()
        if json_output:
            typer.echo(json.dumps(summary, indent=1))
        else:
            rate = f", {summary['images_per_second']} img/s" if summary["images_per_second"] else ""
            splits = ", ".join(f"{name} {n:,}" for name, n in summary["splits"].items())
            typer.echo(f"store: {summary['store']}\n  {len(summary['blocks'])} blocks x "
                       f"{', '.join(summary['poolings'])} ({summary['dtype']}); splits: {splits}; "
                       f"{summary['images_processed']:,} images extracted in {summary['seconds']:.1f} s{rate}")

    _guarded(debug, body, threads=threads)


@app.command(epilog="""
**Examples**

* `mimprobe profile vit_tiny_patch16_224 digits --img-size 32 --out profiles/digits`
* `mimprobe profile vit_base_patch16_224 ./cifar10 --checkpoint mae.pth --pool cls,mean --metrics knn,linear --out p`
* `mimprobe profile features/vit_tiny_patch16_224__digits__eed481c4aa1f --out p --preset dino --json`

TARGET is a timm model name (then DATA is required and the features are extracted, or reused, under
--features) or a feature store folder from `mimprobe extract`.

Under `torchrun --nproc_per_node N -m mimprobe.cli profile ...` every process extracts its share of the batches
and searches its shard of the k-NN bank (merged top-k lists); the probes, low-shot, clustering and rank run on
rank 0, which alone writes the files.
""")
def profile(
    target: str = typer.Argument(..., help="timm model name, or a feature store folder."),
    data: Optional[str] = typer.Argument(None, help="Data (image folder, .npz, digits, synthetic); with a store, "
                                                   "checked against the store's dataset."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for profile.csv/.parquet/.json/.png."),
    metrics: str = typer.Option("all", "--metrics", "-m", help="Comma list of knn, linear, lowshot, cluster, rank, "
                                                               "or all (those the data allows)."),
    preset: str = typer.Option("mim-refiner", "--preset", help="k-NN protocol: mim-refiner, dino or dinov2."),
    probe: str = typer.Option("batched", "--probe", help="Linear probes: batched (all blocks at once) or sklearn."),
    features: Optional[Path] = typer.Option(None, "--features", help="Folder of feature stores [default: OUT/features]."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Checkpoint file for the model."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Download timm's pretrained weights."),
    blocks: str = typer.Option("all", "--blocks", "-b", help="all, last:N, or a 0-based list."),
    pool: str = typer.Option("cls,mean", "--pool", "-p", help="Poolings to extract and measure."),
    norm: str = typer.Option("raw", "--norm", help="raw or final."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    workers: int = typer.Option(0, "--workers", help="DataLoader worker processes."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (extraction and linear probes)."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Square input size for small images."),
    store_dtype: str = typer.Option("float16", "--store-dtype", help="float16 or float32."),
    mean: Optional[str] = MEAN_OPTION,
    std: Optional[str] = STD_OPTION,
    interpolation: Optional[str] = INTERPOLATION_OPTION,
    crop_pct: Optional[float] = CROP_PCT_OPTION,
    model_kwargs: Optional[str] = MODEL_KWARGS_OPTION,
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    memory_budget: str = typer.Option("2G", "--memory-budget", help="Feature rows any metric holds at once, e.g. "
                                      "512M, 2G, or none (read every split into memory). The store's memory maps "
                                      "are read in chunks, so memory does not grow with the number of images."),
    eval_samples: int = typer.Option(50000, "--eval-samples", help="Evaluation rows for low-shot and clustering "
                                     "(a seeded subset when the split is larger; recorded in the rows' params)."),
    rank_samples: int = typer.Option(20000, "--rank-samples", help="Train rows for the effective rank (seeded "
                                     "subset)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the validation split, k-means and probes."),
    json_output: bool = typer.Option(False, "--json", help="Print machine-readable results on stdout."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Measure every block with k-NN, linear probes, low-shot, clustering and effective rank; find the best blocks."""
    from .blocks import parse_block_spec
    from .metrics.profile import ProfileConfig, iter_best_lines, parse_bytes, parse_metrics, run_profile

    def body() -> None:
        config = ProfileConfig(metrics=parse_metrics(metrics), preset=preset, probe=probe, seed=seed,
                               threads=threads, device=device, memory_budget=parse_bytes(memory_budget),
                               eval_samples=eval_samples, rank_samples=rank_samples)
        extract_options = dict(blocks=parse_block_spec(blocks), poolings=_parse_poolings(pool), norm=norm,
                               batch_size=batch_size, workers=workers, device=device, img_size=img_size,
                               store_dtype=store_dtype,
                               **_preprocessing_options(mean, std, interpolation, crop_pct, model_kwargs))
        result = run_profile(target, data, out=out, config=config, features_dir=features, extract_options=extract_options,
                             checkpoint=str(checkpoint) if checkpoint else None, pretrained=pretrained,
                             progress=not no_progress and not json_output,
                             log=lambda message: typer.echo(message, err=True))
        if result.rank != 0:  # under torchrun rank 0 reports for every rank
            return
        _say_random_init(result.store.manifest)
        if json_output:
            typer.echo(json.dumps(result.summary(), indent=1))
            return
        typer.echo("best blocks (0-based):")
        for line in iter_best_lines(result.best):
            typer.echo(f"  {line}")
        typer.echo(f"wrote {', '.join(Path(path).name for path in result.files.values())} to {out} "
                   f"({len(result.table):,} rows, {result.seconds:.1f} s)")

    _guarded(debug, body, threads=threads)


@app.command(epilog="""
**Examples**

* `mimprobe info vit_base_patch16_224`
* `mimprobe info vit_large_patch16_224 --checkpoint mae_pretrain_vit_large.pth --json`
* `mimprobe info vit_huge_patch14_gap_224 --checkpoint IN1K-vit.h.14-300e.pth.tar`  (I-JEPA: no CLS token)
* `mimprobe info test_vit --model-kwargs class_token=false,global_pool=avg,fc_norm=false`

data_config_source says where the normalisation and crop come from: the checkpoint family's evaluation
preprocessing (MAE, data2vec 2.0, MIM-Refiner, DINO/DINOv2, I-JEPA), timm's data config of the model name, or
--mean/--std/--interpolation/--crop-pct.
""")
def info(
    model: str = typer.Argument(..., help="timm model name."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Checkpoint file to load strictly."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Download timm's pretrained weights."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Square input size override."),
    mean: Optional[str] = MEAN_OPTION,
    std: Optional[str] = STD_OPTION,
    interpolation: Optional[str] = INTERPOLATION_OPTION,
    crop_pct: Optional[float] = CROP_PCT_OPTION,
    model_kwargs: Optional[str] = MODEL_KWARGS_OPTION,
    json_output: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Print a model's blocks and their widths, prefix tokens, patch size, final norm and data config (and why)."""
    from .models import describe_model, load_model

    def body() -> None:
        options = _preprocessing_options(mean, std, interpolation, crop_pct, model_kwargs)
        loaded = load_model(model, checkpoint=checkpoint, pretrained=pretrained, img_size=img_size,
                            model_kwargs=options.pop("model_kwargs"))
        data_config, source = loaded.eval_data_config(img_size=img_size, **options)
        report = {"model": loaded.name, "weights": loaded.weights, "checkpoint": loaded.checkpoint,
                  "checkpoint_format": loaded.checkpoint_format, "checkpoint_sha256": loaded.checkpoint_sha256,
                  "model_kwargs": loaded.model_kwargs, **describe_model(loaded.model, loaded.name),
                  "data_config": data_config, "data_config_source": source, "notes": list(loaded.notes)}
        if json_output:
            typer.echo(json.dumps(report, indent=1))
            return
        width = max(len(key) for key in report)
        for key, value in report.items():
            if value is not None and value != []:
                typer.echo(f"{key:<{width}}  {value}")

    _guarded(debug, body, threads=threads)


# ---- command: place ----


def _parse_freeze(text: str | None) -> int | float | None:
    """``6`` → 6 blocks (an int); ``0.25`` → a fraction of the depth (a float, checked by `place`)."""
    from .errors import BadInputError

    if text is None:
        return None
    try:
        return int(text) if text.strip().lstrip("+-").isdigit() else float(text)
    except ValueError:
        raise BadInputError(f"invalid --freeze {text!r}: give a number of blocks (6) or a fraction (0.25)") from None


@app.command(epilog="""
**Examples**

* `mimprobe place profiles/digits`  (peak rule on k-NN top-1 of the val split; writes profiles/digits/placement.json)
* `mimprobe place profiles/mae-large --max-heads 8 --freeze 0.25 --out placement.json`
* `mimprobe place profiles/digits --metric linear --plateau 0.01 --json`
* `mimprobe place profiles/digits --blocks 8,9,10,11`  (explicit blocks; --blocks last:4 is rule last-n)

The peak rule (MIM-Refiner, arXiv 2402.10093) puts heads from the first block of the peak plateau to the last
block; it reads only the validation split of the profile, never test. Blocks are 0-based.
""")
def place(
    profile: Path = typer.Argument(..., help="Profile folder written by `mimprobe profile` (profile.parquet/.csv "
                                             "and profile.json)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Placement file, or a folder for placement.json "
                                                                 "[default: PROFILE/placement.json]."),
    rule: Optional[str] = typer.Option(None, "--rule", help="peak, last-n or explicit [default: peak; explicit "
                                                           "with --blocks, last-n with --n]."),
    metric: str = typer.Option("knn", "--metric", "-m", help="Curve of the peak rule: knn (k-NN top-1 on val) or "
                                                             "linear (linear-probe top-1 on val)."),
    pooling: str = typer.Option("cls", "--pooling", "-p", help="Pooling of the curve: cls, mean or cls+mean."),
    max_heads: Optional[int] = typer.Option(None, "--max-heads", help="Peak rule: at most N heads, spaced evenly "
                                                                      "to the last block (which always gets one)."),
    plateau: Optional[float] = typer.Option(None, "--plateau", help="Peak rule: blocks within this accuracy "
                                            "fraction of the peak belong to its plateau (0.005 = half a point) "
                                            "[default: 1.96 sqrt(2) standard errors of the validation curve]."),
    n: Optional[int] = typer.Option(None, "--n", help="Rule last-n: heads on the last N blocks."),
    blocks: Optional[str] = typer.Option(None, "--blocks", "-b", help="Explicit 0-based blocks such as 8,9,10,11 "
                                                                      "or 8-11 (negative from the end), or last:N."),
    freeze: Optional[str] = typer.Option(None, "--freeze", help="Freeze the first N blocks (6) or a fraction of "
                                                                "them (0.25); all before the first head."),
    json_output: bool = typer.Option(False, "--json", help="Print placement.json's content on stdout."),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Choose the blocks that get refinement heads from a profile; write placement.json."""
    from .blocks import parse_block_spec
    from .errors import BadInputError
    from .placement import placement_path, run_place

    def body() -> None:
        chosen_rule, count, indices = rule, n, None
        if blocks is not None:
            spec = parse_block_spec(blocks)
            if spec is None:
                raise BadInputError("--blocks all is not a placement: list the blocks (8,9,10,11 or 8-11), or use "
                                    "last:N")
            if isinstance(spec, int):  # last:N is rule last-n
                if n is not None:
                    raise BadInputError("give either --blocks last:N or --n, not both")
                chosen_rule, count = chosen_rule or "last-n", spec
            else:
                chosen_rule, indices = chosen_rule or "explicit", spec
        elif n is not None:
            chosen_rule = chosen_rule or "last-n"
        result = run_place(profile, out=out, rule=chosen_rule or "peak", metric=metric, pooling=pooling,
                           max_heads=max_heads, plateau=plateau, n=count, blocks=indices, freeze=_parse_freeze(freeze))
        target = placement_path(profile, out)
        if json_output:
            typer.echo(target.read_text().rstrip("\n"))
            return
        typer.echo(f"heads on blocks {', '.join(map(str, result.head_blocks))} (0-based, {len(result.head_blocks)} "
                   f"of {result.num_blocks})" + (f"; first {result.freeze_blocks} blocks frozen"
                                                 if result.freeze_blocks else ""))
        typer.echo(f"  {result.reason}")
        for note in result.notes:
            if note.startswith("warning: "):
                typer.echo(note, err=True)
            else:
                typer.echo(f"  note: {note}")
        typer.echo(f"wrote {target}")

    _guarded(debug, body)

# ---- command: refine ----
def _print_recipe(value: bool) -> None:
    if value:
        from .refine.recipe import recipe_text

        typer.echo(recipe_text())
        raise typer.Exit()


@app.command(epilog="""
**Examples**

* `mimprobe refine vit_tiny_patch16_224 digits --img-size 32 --auto --epochs-heads 1 --epochs 2 --batch-size 64 --queue-size 1024 --head-dims 256,64,256 --out runs/refine-digits`
* `mimprobe refine vit_large_patch16_224 ./imagenet --checkpoint mae_pretrain_vit_large.pth --placement placement.json --epochs 20 --batch-size 1024 --out runs/mae-l`
* `torchrun --nproc_per_node 8 -m mimprobe.cli refine vit_large_patch16_224 ./imagenet --checkpoint mae.pth --placement placement.json --out runs/mae-l`

Every epoch (and on SIGTERM) a checkpoint is written; rerun with `--resume` to continue exactly. The result,
OUT/refined.safetensors, is a plain timm state dict of the EMA encoder: `mimprobe profile MODEL DATA --checkpoint
OUT/refined.safetensors` measures it.

The defaults are MIM-Refiner's main recipe, read from the official configurations (`--recipe` prints each one with
its source line): 2 global crops (0.25-1) + 10 local 96/224-size crops (0.05-0.25), lr 2e-4 (heads stage) and
4e-4 (full stage) per 256 images, 4 warmup epochs, cosine to an absolute 1e-6, encoder EMA 0.9999 from the first
step, Xavier-uniform heads. Scaled to small data only where it must be: the warmup takes at most 40 % of a stage
(binds below 10 epochs) and the default queue is cut to the training set. The earlier defaults remain options:
`--local-crops 0 --global-scale-min 0.08 --ema-warmup --lr-heads 1e-4 --lr 1e-4 --warmup-fraction 0.1
--head-init truncnormal`.
""")
def refine(
    model: str = typer.Argument(..., help="timm model name."),
    data: str = typer.Argument(..., help="Training images (image folder, .npz, digits, synthetic); the train split."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (checkpoints, logs, refined.safetensors)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Starting weights (MAE, data2vec "
                                                                              "2.0, timm, ...)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Start from timm's pretrained weights."),
    placement: Optional[Path] = typer.Option(None, "--placement", help="placement.json from `mimprobe place`."),
    auto: bool = typer.Option(False, "--auto", help="Profile the blocks with k-NN, then place the heads."),
    max_heads: Optional[int] = typer.Option(None, "--max-heads", help="--auto: at most N heads."),
    freeze: Optional[str] = typer.Option(None, "--freeze", help="Freeze the first N blocks (6) or a fraction (0.25)."),
    epochs_heads: int = typer.Option(1, "--epochs-heads", help="Stage 1 epochs: heads only, encoder frozen."),
    epochs: int = typer.Option(5, "--epochs", help="Stage 2 epochs: encoder and heads."),
    batch_size: int = typer.Option(256, "--batch-size", help="Global batch (all processes)."),
    accumulate: int = typer.Option(1, "--accumulate", help="Micro-batches per step when a batch does not fit."),
    lr_heads: float = typer.Option(2e-4, "--lr-heads", help="Stage 1 (heads only) peak lr per 256 images "
                                                            "(official 2e-4)."),
    lr: float = typer.Option(4e-4, "--lr", help="Stage 2 (encoder and heads) peak lr per 256 images (official "
                                                "4e-4); both scaled by batch / 256."),
    min_lr: float = typer.Option(1e-6, "--min-lr", help="End of each stage's cosine: an absolute lr, not scaled "
                                                        "with the batch."),
    warmup_epochs: float = typer.Option(4.0, "--warmup-epochs", help="Linear warmup of each stage in epochs "
                                                                     "(official 4); cut to 40 % of a stage "
                                                                     "shorter than 10 epochs."),
    warmup_fraction: Optional[float] = typer.Option(None, "--warmup-fraction", help="Instead: warm up over this "
                                                                                    "share of each stage (0.1 "
                                                                                    "before the official recipe)."),
    temperature: float = typer.Option(0.2, "--temperature", help="NNA temperature (0.2 ViT-L, 0.3 H, 0.35 2B)."),
    queue_size: Optional[int] = typer.Option(None, "--queue-size", help="Neighbour queue length per head "
                                                                        "[default: 65536, cut to the training "
                                                                        "set when smaller]."),
    topk: int = typer.Option(20, "--topk", help="Stage 2: pick the neighbour uniformly from the top k."),
    local_crops: int = typer.Option(10, "--local-crops", help="Local crops as extra predicted views (official "
                                                              "10; 0: global views only)."),
    local_size: Optional[int] = typer.Option(None, "--local-size", help="Side of the local crops [default: 96/224 "
                                                                        "of the input, rounded to the patch]."),
    local_scale: str = typer.Option("0.05,0.25", "--local-scale", help="Area range of the local crops."),
    global_scale_min: float = typer.Option(0.25, "--global-scale-min", help="Smallest area of the 2 global crops "
                                                                            "(official 0.25; BYOL 0.08)."),
    head_dims: str = typer.Option("auto", "--head-dims", help="Projector hidden, projection and predictor hidden "
                                                              "widths (2048,256,4096), or official, proportional "
                                                              "(x model width / 1024) or auto (proportional on a "
                                                              "CPU below 224 px, else official)."),
    head_init: str = typer.Option("xavier_uniform", "--head-init", help="Heads' Linear init: xavier_uniform "
                                                                        "(official) or truncnormal (std 0.02)."),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", help="EMA of the encoder, constant from stage 2's first step [default: 0.9999, or its 10,000-step time constant as a share of a stage shorter than the official 37,530 steps]."),
    ema_warmup: bool = typer.Option(False, "--ema-warmup", help="timm's EMA warmup instead (decay 1-(1+n)^-2/3 up "
                                                                "to --ema-decay): short runs still move."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Square input size for small images."),
    monitor: int = typer.Option(0, "--monitor", help="k-NN monitor on N labelled images every epoch (0: off)."),
    workers: int = typer.Option(0, "--workers", help="DataLoader worker processes."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on GPU), fp32, bf16 or fp16."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of data order, augmentations, heads and neighbour picks."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start again in an OUT that holds another run."),
    json_output: bool = typer.Option(False, "--json", help="Print machine-readable results on stdout."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
    recipe: bool = typer.Option(False, "--recipe", is_eager=True, expose_value=False, callback=_print_recipe,
                                help="Print each default with its source line in the official MIM-Refiner "
                                     "configurations, and exit."),
) -> None:
    """Refine with Nearest-Neighbour-Alignment heads (MIM-Refiner) on the placed blocks; export a timm checkpoint."""
    from .errors import BadInputError
    from .refine import RefineConfig, run_refine
    from .refine.config import head_dims_fields

    def body() -> None:
        try:
            low, high = (float(part) for part in local_scale.split(","))
        except ValueError:
            raise BadInputError(f"invalid --local-scale {local_scale!r}: give two areas, e.g. 0.05,0.25") from None
        config = RefineConfig(epochs_heads=epochs_heads, epochs=epochs, batch_size=batch_size, accumulate=accumulate,
                              lr_heads=lr_heads, lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs,
                              warmup_fraction=warmup_fraction, temperature=temperature, queue_size=queue_size,
                              topk=topk, local_crops=local_crops, local_size=local_size, local_scale=(low, high),
                              global_scale_min=global_scale_min, **head_dims_fields(head_dims),
                              head_init=head_init, ema_decay=ema_decay,
                              ema_warmup=ema_warmup, img_size=img_size, precision=precision, seed=seed,
                              num_workers=workers, monitor_images=monitor)
        freeze_value = _parse_freeze(freeze)
        place_options = {key: value for key, value in (("max_heads", max_heads), ("freeze", freeze_value))
                         if value is not None}
        result = run_refine(model, data, out=out, config=config, checkpoint=str(checkpoint) if checkpoint else None,
                            pretrained=pretrained, placement=placement, auto=auto, place_options=place_options,
                            freeze=freeze_value, device=device, threads=threads, resume=resume,
                            overwrite=overwrite, progress=not no_progress and not json_output,
                            log=None if not json_output else (lambda message: typer.echo(message, err=True)))
        if json_output:
            typer.echo(json.dumps(result.summary(), indent=1))
        elif result.stopped_early:
            typer.echo(f"stopped after step {result.steps}: rerun the same command with --resume to continue")
        else:
            typer.echo(f"refined in {result.seconds:.1f} s ({result.steps} steps); wrote {result.export}")

    _guarded(debug, body, threads=threads)


# ---- command: run ----

@app.command("run", epilog="""
**Examples**

* `mimprobe run analyses/demo.toml`
* `mimprobe run analyses/cifar10-cpu.toml --json`
* `mimprobe run analyses/mae-large-gpu.toml --out runs/mae-large-again --overwrite`

The steps, each in its own folder under the spec's `out`: pretrain (only with a `[pretrain]` section),
profile-before, placement, refine, profile-after, compare. The spec's keys mirror the options of those
commands (see the files in analyses/); the resolved spec, every default filled in, is written to
OUT/spec.resolved.toml. Run the same command again after an interruption: finished steps are skipped and the
interrupted one resumes. An OUT that holds another spec's run is refused unless `--overwrite`.
""")
def run_command(
    spec: Path = typer.Argument(..., help="TOML spec of the analysis (see analyses/)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder [default: the spec's out]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start again from nothing in a run folder that holds "
                                                              "a run (the pipeline's own files there are deleted)."),
    json_output: bool = typer.Option(False, "--json", help="Print the steps, the report's path and the headline "
                                                           "numbers as JSON on stdout."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Run the whole pipeline from a TOML spec: pretrain, profile, place, refine, profile again, compare."""
    from .pipeline import run_pipeline

    def body() -> None:
        result = run_pipeline(spec, out=out, overwrite=overwrite, progress=not no_progress and not json_output,
                              log=(lambda message: typer.echo(message, err=True)) if json_output or no_progress
                              else None)
        if json_output:
            typer.echo(json.dumps(result.summary(), indent=1))

    _guarded(debug, body, threads=threads)

# ---- command: demo ----

@app.command("demo", epilog="""
**Examples**

* `mimprobe demo`  (writes mimprobe-demo/ in the current folder: about 2 minutes on a 2-core CPU, longer when it is busy)
* `mimprobe demo --out /tmp/demo --json`
* `mimprobe demo --fast --out /tmp/smoke`  (a seconds-long run on synthetic images that checks the installation)

A ViT-Tiny is pre-trained as a masked autoencoder on scikit-learn's 8x8 handwritten digits (shipped with
scikit-learn: no download), profiled block by block, given NNA refinement heads from its k-NN peak to the last
block, refined, profiled again, and the two profiles are compared in OUT/compare/report.html. It is
`mimprobe run` on analyses/demo.toml; rerun it to resume, or after it finished to see every step skipped.
""")
def demo(
    out: Path = typer.Option(Path("mimprobe-demo"), "--out", "-o", help="Run folder."),
    fast: bool = typer.Option(False, "--fast", help="A seconds-long smoke run on synthetic images (its numbers "
                                                    "mean nothing)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start again from nothing in OUT."),
    json_output: bool = typer.Option(False, "--json", help="Print the steps, the report's path and the headline "
                                                           "numbers as JSON on stdout."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """The whole pipeline on built-in data, offline, on a CPU, in minutes: MAE, profile, place, refine, compare."""
    from .pipeline import run_demo

    def body() -> None:
        result = run_demo(out=out, fast=fast, overwrite=overwrite, progress=not no_progress and not json_output,
                          log=(lambda message: typer.echo(message, err=True)) if json_output or no_progress else None)
        if json_output:
            typer.echo(json.dumps(result.summary(), indent=1))

    _guarded(debug, body, threads=threads)

# ---- command: compare ----
@app.command(epilog="""
**Examples**

* `mimprobe compare profiles/before profiles/after --out reports/digits`
* `mimprobe compare base nna-4heads nna-8heads --labels mae,4-heads,8-heads --out reports/heads --overwrite`
* `mimprobe compare before after --placement runs/mae-l/placement.json --cka-rows 5000 --json --out report`

Each input is a `mimprobe profile` folder; with more than two, every one is compared with the first. OUT gets
report.html (self-contained: it opens offline), report.md, the figures as PNG and SVG, compare.csv/.parquet,
best.csv, class_gains.csv, cka_*.csv and compare.json. The placement is read from the refine run folder of the
after profile's checkpoint (RUN/placement.json) unless --placement is given. Blocks are 0-based.
""")
def compare(
    profiles: list[Path] = typer.Argument(..., help="Profile folders BEFORE AFTER [MORE...] from `mimprobe profile "
                                                    "--out`."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma list of names, one per profile [default: the "
                                                                "folder names]."),
    placement: Optional[Path] = typer.Option(None, "--placement", help="placement.json of the refinement [default: "
                                             "beside the after profile's checkpoint]."),
    resamples: int = typer.Option(1000, "--resamples", help="Paired bootstrap resamples per interval."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and of the CKA subset."),
    cka_rows: int = typer.Option(2000, "--cka-rows", help="Evaluation images used for CKA (seeded subset)."),
    cka_pooling: str = typer.Option("cls", "--cka-pooling", help="Pooling compared by CKA (cls, mean, cls+mean)."),
    no_cka: bool = typer.Option(False, "--no-cka", help="Skip the CKA heatmap (it reads the feature stores)."),
    allow_different_data: bool = typer.Option(False, "--allow-different-data", help="Compare profiles of different "
                                              "datasets (no intervals, no CKA)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a folder that holds other files."),
    json_output: bool = typer.Option(False, "--json", help="Print machine-readable results on stdout."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Before/after report: block curves, per-block deltas with bootstrap intervals, best blocks, CKA, per-class gains."""
    from .report import CompareConfig, run_compare

    def body() -> None:
        config = CompareConfig(resamples=resamples, seed=seed, cka_rows=cka_rows, cka_pooling=cka_pooling,
                               cka=not no_cka, allow_different_data=allow_different_data)
        names = [part.strip() for part in labels.split(",")] if labels is not None else None
        result = run_compare(profiles, out=out, labels=names, placement=placement, config=config,
                             overwrite=overwrite, log=None if json_output else (lambda m: typer.echo(m, err=True)))
        if json_output:
            typer.echo(json.dumps(result.summary(), indent=1))
            return
        for line in result.summary_lines():
            typer.echo(line)
        typer.echo(f"wrote {result.files['html']} and {len(result.files) - 1} more files ({result.seconds:.1f} s)")

    _guarded(debug, body, threads=threads)


# ---- command: pretrain-mae ----

@app.command("pretrain-mae", epilog="""
**Examples**

* `mimprobe pretrain-mae vit_tiny_patch16_224 digits --img-size 64 --epochs 10 --out runs/mae-digits`
* `mimprobe pretrain-mae vit_small_patch16_224 ./my-images --img-size 96 --epochs 100 --batch-size 128 --out runs/mae`
* `mimprobe pretrain-mae vit_small_patch16_224 ./my-images --img-size 96 --epochs 100 --batch-size 128 --out runs/mae --resume`
* `mimprobe profile vit_tiny_patch16_224 digits --img-size 64 --checkpoint runs/mae-digits/mae.pth --out runs/profile`

Trains on the train split only (labels are not used; a folder of unlabelled images works). OUT gets
config.json, log.csv (step, epoch, loss, lr, images_per_second), checkpoint-last.pth (every epoch; --resume
continues from it exactly) and mae.pth, an official-layout MAE checkpoint for --checkpoint.
""")
def pretrain_mae(
    model: str = typer.Argument(..., help="timm ViT name, e.g. vit_tiny_patch16_224 (random init, or --checkpoint)."),
    data: str = typer.Argument(..., help="Image folder (labelled or not), a .npz, or a built-in: digits, synthetic."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the run's files (mae.pth, log.csv, ...)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Continue from this file's encoder "
                                              "(any format mimprobe reads), and its decoder if it is a full MAE file."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Square input size (a multiple of the patch "
                                           "size) [default: the model's]."),
    epochs: int = typer.Option(10, "--epochs", help="Passes over the train split."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per step (at least 2)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate [default: 1.5e-4 x batch / 256]."),
    warmup_epochs: float = typer.Option(1.0, "--warmup-epochs", help="Linear warmup before the cosine decay."),
    mask_ratio: float = typer.Option(0.75, "--mask-ratio", help="Fraction of patches hidden from the encoder."),
    decoder_dim: int = typer.Option(128, "--decoder-dim", help="Decoder width (official MAE: 512)."),
    decoder_depth: int = typer.Option(2, "--decoder-depth", help="Decoder blocks (official MAE: 8)."),
    decoder_heads: int = typer.Option(4, "--decoder-heads", help="Decoder attention heads (official MAE: 16)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation, data order, augmentation and masks."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    workers: int = typer.Option(0, "--workers", help="DataLoader worker processes."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its last epoch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace another run's files in OUT."),
    json_output: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Pre-train a ViT as a masked autoencoder (MAE) and export an official-layout MAE checkpoint to profile."""
    from .pretrain import MaeConfig, run_pretrain_mae

    def body() -> None:
        config = MaeConfig(img_size=img_size, epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=warmup_epochs,
                           mask_ratio=mask_ratio, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                           decoder_heads=decoder_heads, seed=seed, device=device, workers=workers, threads=threads)
        result = run_pretrain_mae(model, data, out=out, config=config,
                                  checkpoint=str(checkpoint) if checkpoint else None, resume=resume,
                                  overwrite=overwrite, progress=not no_progress and not json_output,
                                  log=lambda message: typer.echo(message, err=True))
        summary = result.summary()
        if json_output:
            typer.echo(json.dumps(summary, indent=1))
            return
        losses = result.epoch_losses
        trend = f", loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
        timing = f" in {result.seconds:.1f} s" if result.epochs_this_call else ""
        typer.echo(f"mae.pth: {result.export} ({result.epochs} epochs, {result.steps} steps{trend}){timing}\n"
                   f"profile it: {result.profile_command()}")

    _guarded(debug, body, threads=threads)



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
