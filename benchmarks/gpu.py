"""GPU check (issue 9 point 5): extraction, profile and refinement on one CUDA GPU, in under 8 minutes.

Run from the repository root on a machine with one CUDA GPU::

    python benchmarks/gpu.py                      # prints one table; --report also writes it to reports/benchmarks.md
    python benchmarks/gpu.py --cpu-smoke          # every part at tiny sizes on the CPU (gloo), to check the script

Parts (sizes of the GPU run; ``--cpu-smoke`` uses test_vit at 32 px, a 2,000 x 400 x 64 store, 2 steps):

1. Extraction: every block of vit_base_patch16_224 (random init, 224 px, bf16 autocast, cls pooling) over 2,000
   CIFAR-10 train images with `mimprobe.extract`, against plain bf16 ``model.forward_features`` over the same
   images through the same DataLoader (same transform, batch and workers): the throughput ratio, and the same
   ratio for the model alone on batches already on the GPU (all blocks read out, pooled and copied to the host,
   vs ``forward_features``).
2. Profile: a 50,000 x 10,000 x 768 random class-structured float16 store (4 blocks, 100 classes, written with
   `mimprobe.features.store.create_store`); ``mimprobe profile STORE --device cuda`` (every metric) and
   ``--device cpu --metrics knn`` (FAISS), timed; the per-sample k-NN top-1 correctness of every block, split, k
   and T must be equal, and the top-1 predicted classes of the last block (k=20, T=0.07) from
   `mimprobe.metrics.knn.knn_predict` on CUDA (torch) and on the CPU (FAISS) too.
3. Refinement: ``torchrun --nproc_per_node N -m mimprobe.cli refine`` (``--refine-processes``, default 1) on CUDA
   with bf16, heads on the last two blocks, exactly 20 optimiser steps (stage 2 only, one epoch of 20 x batch
   images). Note: `mimprobe.refinement.distributed` joins a process group (NCCL on CUDA) only when torchrun starts more
   than one process; with one, torchrun runs refine's single-process path (no collective to exercise anyway).
   On a machine with several GPUs, ``--refine-processes 2`` runs DDP over NCCL.

Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DEFAULT_CIFAR_TAR, DEFAULT_REPORT, REPO, cifar_subsets, log, machine_info,  # noqa: E402
                     machine_line, write_section)
from scale import write_synthetic_store  # noqa: E402

SECTION = "gpu"
SIZES = {
    "gpu": dict(model="vit_base_patch16_224", img_size=None, images=2000, batch=128, workers=8, device="cuda",
                n_train=50_000, n_test=10_000, dim=768, store_blocks=4, classes=100, refine_batch=64,
                refine_steps=20, refine_extra=[]),
    "smoke": dict(model="test_vit", img_size=32, images=64, batch=16, workers=0, device="cpu",
                  n_train=2000, n_test=400, dim=64, store_blocks=2, classes=10, refine_batch=8, refine_steps=2,
                  refine_extra=["--topk", "4", "--local-crops", "2", "--img-size", "32"]),
}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_extract(size: dict, folder: Path, work: Path) -> dict:
    """Throughput of `extract` (all blocks) vs plain ``forward_features``, through the loader and model-only."""
    import torch
    from torch.utils.data import DataLoader

    from mimprobe import extract, load_data, load_model
    from mimprobe._device import autocast, resolve_device
    from mimprobe.data import SplitDataset, build_eval_transform
    from mimprobe.features import BlockOutputs, pool_tokens

    device = resolve_device(size["device"])
    loaded = load_model(size["model"], img_size=size["img_size"])  # random init (seeded)
    model = loaded.model.to(device).eval()
    source = load_data(str(folder))
    data_config, _ = loaded.eval_data_config(img_size=size["img_size"])  # extract's own transform
    dataset = SplitDataset(source.splits["train"], build_eval_transform(data_config),
                           tuple(data_config["input_size"]))
    n = len(dataset)

    def loader():
        return DataLoader(dataset, batch_size=size["batch"], num_workers=size["workers"],
                          pin_memory=device.type == "cuda")

    def baseline() -> float:
        started = time.perf_counter()
        with torch.inference_mode(), autocast(device, "bf16"):
            for images, _, _ in loader():
                model.forward_features(images.to(device, non_blocking=True))
        _sync(device)
        return time.perf_counter() - started

    def ours() -> float:
        with tempfile.TemporaryDirectory(dir=work, prefix="extract-") as out:
            result = extract(loaded, source, out=out, pool=("cls",), batch_size=size["batch"],
                             workers=size["workers"], device=str(device), precision="bf16", progress=False)
            assert result.images == n and len(result.store.blocks) == len(model.blocks), result.summary()
            return result.seconds  # the extraction loop: decode, forward, pooling, host copy, writes

    baseline()  # warm-up: kernels, allocator, page cache of the images
    runs = {"forward_features": [], "extract": []}
    for _ in range(2):  # interleaved
        runs["forward_features"].append(baseline())
        runs["extract"].append(ours())
    loop = {name: min(times) for name, times in runs.items()}

    # model alone, on batches already on the device
    batches = [images.to(device) for images, _, _ in list(loader())[:4]]
    outputs = BlockOutputs(model, list(range(len(model.blocks))), norm="raw")

    def model_only(read_blocks: bool) -> float:
        started = time.perf_counter()
        with torch.inference_mode(), autocast(device, "bf16"):
            for images in batches:
                if read_blocks:
                    for tokens in outputs(images).values():
                        pool_tokens(tokens.float(), "cls", num_prefix_tokens=model.num_prefix_tokens,
                                    has_class_token=True).cpu()
                else:
                    model.forward_features(images)
        _sync(device)
        return time.perf_counter() - started

    model_only(False), model_only(True)  # warm-up
    plain = min(model_only(False) for _ in range(3))
    blocks = min(model_only(True) for _ in range(3))
    images_model = sum(len(b) for b in batches)
    return {"images": n, "blocks": len(model.blocks), "forward_features_s": loop["forward_features"],
            "extract_s": loop["extract"], "ratio": loop["forward_features"] / loop["extract"],
            "forward_features_img_s": n / loop["forward_features"], "extract_img_s": n / loop["extract"],
            "model_only_ratio": plain / blocks, "model_only_images": images_model,
            "model_only_forward_img_s": images_model / plain, "model_only_blocks_img_s": images_model / blocks}


def _cli(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mimprobe.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"mimprobe {shlex.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def part_profile(size: dict, work: Path, env: dict[str, str]) -> dict:
    """profile on the device vs the CPU (FAISS) k-NN: equal per-sample top-1 correctness, equal predictions."""
    from mimprobe.features import FeatureStore
    from mimprobe.metrics.knn import PRESETS, knn_predict
    from mimprobe.metrics.predictions import SamplePredictions

    store_dir = work / "store"
    shutil.rmtree(store_dir, ignore_errors=True)
    started = time.perf_counter()
    write_synthetic_store(store_dir, n_train=size["n_train"], n_test=size["n_test"], blocks=size["store_blocks"],
                          dim=size["dim"], classes=size["classes"])
    write_s = time.perf_counter() - started
    device_s, _ = _cli(["profile", str(store_dir), "--device", size["device"], "--out", str(work / "p-device"),
                        "--json", "--no-progress"], env)
    cpu_s, _ = _cli(["profile", str(store_dir), "--device", "cpu", "--metrics", "knn", "--out", str(work / "p-cpu"),
                     "--json", "--no-progress"], env)
    on_device = SamplePredictions.load(work / "p-device" / "predictions.npz")
    on_cpu = SamplePredictions.load(work / "p-cpu" / "predictions.npz")
    compared = differing = 0
    for split, entries in on_cpu.hits.items():
        for key, hits in entries.items():
            if key[0] != "knn_top1":
                continue
            other = on_device.hits.get(split, {}).get(key)
            assert other is not None, f"{key} missing from the device profile"
            compared += 1
            differing += int((other != hits).sum())
    store = FeatureStore.open(store_dir)
    block = store.blocks[-1]
    train, query = store.features("train", block), store.features("test", block)
    labels = store.labels("train")
    preset = PRESETS["dino"]
    k, temperature = preset.ks[0], preset.temperatures[0]
    common = dict(ks=(k,), temperatures=(temperature,), num_classes=size["classes"])
    # on the CPU smoke run the torch backend runs on the CPU: the same code path as on CUDA
    torch_side = knn_predict(train, labels, query, backend="torch", device=size["device"], **common)
    faiss_side = knn_predict(train, labels, query, backend="faiss", device="cpu", **common)
    differ_predictions = int((torch_side.predictions(k, temperature) != faiss_side.predictions(k, temperature)).sum())
    shutil.rmtree(store_dir, ignore_errors=True)
    return {"rows": f"{size['n_train']:,} x {size['n_test']:,} x {size['dim']}, {size['store_blocks']} blocks",
            "write_s": write_s, "profile_device_s": device_s, "profile_cpu_knn_s": cpu_s,
            "knn_rows_compared": compared, "knn_hits_differing": differing,
            "top1_predictions": len(query), "top1_differing": differ_predictions, "k": k, "temperature": temperature}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def part_refine(size: dict, folder: Path, work: Path, env: dict[str, str], processes: int = 1) -> dict:
    """``refine`` under torchrun (NCCL on CUDA, gloo on the CPU when several processes), exactly the asked steps."""
    import timm

    from mimprobe.placement import place

    depth = len(timm.create_model(size["model"], pretrained=False).blocks)
    placement = place(None, num_blocks=depth, rule="explicit", blocks=[depth - 2, depth - 1])
    placement_file = work / "placement.json"
    placement_file.write_text(json.dumps(placement.to_dict()))
    out = work / "refine"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
               "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "mimprobe.cli", "refine", size["model"], str(folder),
               "--out", str(out), "--placement", str(placement_file), "--epochs-heads", "0", "--epochs", "1",
               "--batch-size", str(size["refine_batch"]), "--device", size["device"], "--precision", "bf16",
               "--workers", str(size["workers"]), "--json", "--no-progress", *size["refine_extra"]]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary, _ = json.JSONDecoder().raw_decode(done.stdout)  # every rank of refine prints its summary: the first
    return {"steps": summary["steps"], "expected_steps": size["refine_steps"], "seconds": summary["seconds"],
            "wall_s": wall, "last_loss": summary["last_loss"],
            "processes": processes,
            "backend": ("nccl" if size["device"] == "cuda" else "gloo") if processes > 1 else "no process group"}


def render(size: dict, results: dict, info: dict, total: float, failures: list[str]) -> str:
    ext, prof, ref = results.get("extract"), results.get("profile"), results.get("refine")
    rows = ["| part | measurement | value | check |", "|---|---|---|---|"]
    if ext:
        rows += [f"| extract | {size['model']}, all {ext['blocks']} blocks, bf16, {ext['images']:,} CIFAR-10 "
                 f"images, batch {size['batch']}, {size['workers']} workers | {ext['extract_img_s']:,.0f} img/s "
                 f"(forward_features {ext['forward_features_img_s']:,.0f} img/s) | ratio "
                 f"{ext['ratio']:.2f} |",
                 f"| extract | model alone on device batches ({ext['model_only_images']} images) | "
                 f"{ext['model_only_blocks_img_s']:,.0f} img/s (forward_features "
                 f"{ext['model_only_forward_img_s']:,.0f} img/s) | ratio {ext['model_only_ratio']:.2f} |"]
    if prof:
        rows += [f"| profile | `--device {size['device']}`, every metric, {prof['rows']} | "
                 f"{prof['profile_device_s']:.1f} s (store written in {prof['write_s']:.1f} s) | |",
                 f"| profile | `--device cpu --metrics knn` (FAISS) | {prof['profile_cpu_knn_s']:.1f} s | "
                 f"{prof['knn_rows_compared']} k-NN rows, {prof['knn_hits_differing']} per-sample differences "
                 f"{'(ok)' if prof['knn_hits_differing'] == 0 else '(FAIL)'} |",
                 f"| profile | top-1 classes, last block, k={prof['k']}, T={prof['temperature']}: torch on "
                 f"{size['device']} vs FAISS | {prof['top1_predictions']:,} queries | {prof['top1_differing']} "
                 f"differ {'(ok)' if prof['top1_differing'] == 0 else '(FAIL)'} |"]
    if ref:
        rows += [f"| refine | torchrun, {ref['processes']} process(es) ({ref['backend']}), {size['device']}, bf16, "
                 f"batch "
                 f"{size['refine_batch']} | {ref['steps']} steps in {ref['seconds']:.1f} s (wall {ref['wall_s']:.1f}"
                 f" s), last loss {ref['last_loss']:.4g} | "
                 f"{'ok' if ref['steps'] == ref['expected_steps'] else 'FAIL'} |"]
    lines = ["## GPU check (`benchmarks/gpu.py`)", "", f"Machine: {machine_line(info)}.", "", *rows, "",
             f"Total {total:.0f} s; {'all checks passed' if not failures else 'FAILED: ' + '; '.join(failures)}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (no GPU needed)")
    parser.add_argument("--parts", nargs="+", default=["extract", "profile", "refine"],
                        choices=["extract", "profile", "refine"])
    parser.add_argument("--refine-processes", type=int, default=1, help="torchrun processes of the refine part")
    parser.add_argument("--cifar-tar", default=str(DEFAULT_CIFAR_TAR))
    parser.add_argument("--work", default=None, help="scratch folder [default: a temporary one, deleted]")
    parser.add_argument("--report", action="store_true", help="also write the table into reports/benchmarks.md")
    args = parser.parse_args(argv)
    size = SIZES["smoke" if args.cpu_smoke else "gpu"]
    if not args.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device is visible: run with --cpu-smoke to check the script on the CPU", file=sys.stderr)
            return 2
    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mimprobe-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    refine_images = size["refine_steps"] * size["refine_batch"]
    folders = cifar_subsets([size["images"], refine_images], tar_path=Path(args.cifar_tar), cache_dir=work)
    results, failures = {}, []
    try:
        if "extract" in args.parts:
            log("extraction")
            results["extract"] = part_extract(size, folders[size["images"]], work)
        if "profile" in args.parts:
            log("profile")
            results["profile"] = part_profile(size, work, env)
            if results["profile"]["knn_hits_differing"] or results["profile"]["top1_differing"]:
                failures.append("k-NN on the device differs from FAISS")
        if "refine" in args.parts:
            log("refine")
            results["refine"] = part_refine(size, folders[refine_images], work, env, args.refine_processes)
            if results["refine"]["steps"] != size["refine_steps"]:
                failures.append(f"refine took {results['refine']['steps']} steps, not {size['refine_steps']}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - started
    body = render(size, results, machine_info(), total, failures)
    print(json.dumps(results, indent=1, default=str), file=sys.stderr)
    print(body)
    if args.report:
        write_section(SECTION, body, DEFAULT_REPORT)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
