"""Benchmark of the NNA refinement step: its overhead over a plain forward + backward pass of the encoder.

Run from the repository root::

    python benchmarks/refine.py                       # the figures in reports/benchmarks.md (CPU, a few minutes)
    python benchmarks/refine.py --quick --no-report   # a small smoke run, printed instead of written
    python benchmarks/refine.py --device cuda --model vit_base_patch16_224 --batch-size 256   # on a GPU (bf16)

Measures, in one run, with seeded random weights and random images (the timing does not depend on them):

* ours: one full stage-2 training step of `mimprobe.refinement.engine` (``Trainer._train_step``) with heads on the
  last ``--heads`` blocks: the encoder's ``forward_intermediates`` on both global views, every head's projector
  and predictor, the queue lookups (top-k with a uniform pick) and updates, the NNA loss, backward, the AdamW
  step over the layer-decay groups and the EMA update;
* baseline: a plain forward and backward pass of the same encoder on the same two views
  (``forward_features``, the mean square of its output as the loss), no optimiser. Goal: ours / baseline <= 1.3;
* for context, the baseline plus an AdamW step on the encoder ("plain step").
Repetitions are interleaved (baseline, plain step, ours) after warm-up; ratios use medians and best times.

The results replace the ``refine`` section of reports/benchmarks.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_REPORT, CpuMonitor, log, machine_info, machine_line, publish  # noqa: E402

SECTION = "refine"
OVERHEAD_GOAL = 1.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm model")
    parser.add_argument("--img-size", type=int, default=224, help="input size")
    parser.add_argument("--batch-size", type=int, default=32, help="images per view")
    parser.add_argument("--heads", type=int, default=4, help="heads on the last N blocks")
    parser.add_argument("--head-dims", default="2048,256,4096", help="projector hidden, projection, predictor hidden")
    parser.add_argument("--queue-size", type=int, default=8192, help="queue length per head")
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed repetitions")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on cuda), fp32, bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="small smoke run (img 64, batch 8, 2 repeats)")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    parser.add_argument("--no-report", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args(argv)
    if args.quick:
        args.img_size, args.batch_size, args.repeats, args.warmup, args.queue_size = 64, 8, 2, 1, 256
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args: argparse.Namespace):
    import timm

    from mimprobe._device import resolve_precision
    from mimprobe.refinement.config import RefineConfig
    from mimprobe.refinement.schedules import StagePlan
    from mimprobe.refinement.distributed import DistContext
    from mimprobe.refinement.heads import HeadConfig
    from mimprobe.refinement.network import RefineNetwork
    from mimprobe.refinement.queue import NNQueue
    from mimprobe.refinement.engine import Trainer

    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    hidden, proj, predictor = (int(x) for x in args.head_dims.split(","))
    torch.manual_seed(0)
    encoder = timm.create_model(args.model, img_size=args.img_size, num_classes=0)
    depth = len(encoder.blocks)
    blocks = list(range(depth - args.heads, depth))
    config = RefineConfig(epochs_heads=0, epochs=1, batch_size=args.batch_size, queue_size=args.queue_size,
                          topk=args.topk, head_dims=(hidden, proj, predictor),
                          head_blocks=tuple(blocks), img_size=args.img_size, precision=precision)
    network = RefineNetwork(encoder, blocks, HeadConfig(hidden, proj, predictor)).to(device)
    queues = torch.nn.ModuleDict({str(b): NNQueue(args.queue_size, proj) for b in blocks}).to(device)
    plan = StagePlan(steps_per_epoch=10_000, epochs_heads=0, epochs=1)
    trainer = Trainer(network=network, queues=queues, config=config, plan=plan, ctx=DistContext(device=device),
                       precision=precision, dataset=None, sampler=None, micro=args.batch_size)
    trainer._enter_stage(2)

    baseline = timm.create_model(args.model, img_size=args.img_size, num_classes=0).to(device)
    baseline.load_state_dict(encoder.state_dict())
    baseline.train()
    plain_optimizer = torch.optim.AdamW(baseline.parameters(), lr=1e-6, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=generator).to(device)
             for _ in range(2)]
    indices = torch.arange(args.batch_size, device=device)
    return trainer, baseline, plain_optimizer, views, indices, device, precision, blocks, depth


def main(argv: list[str] | None = None) -> int:
    from mimprobe._device import autocast

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    command = "python " + shlex.join(sys.argv if argv is None else ["benchmarks/refine.py", *argv])
    trainer, baseline, plain_optimizer, views, indices, device, precision, blocks, depth = build(args)
    both = torch.cat(views)

    def forward_backward() -> None:
        baseline.zero_grad(set_to_none=True)
        with autocast(device, precision):
            out = baseline.forward_features(both)
        out.float().pow(2).mean().backward()

    def plain_step() -> None:
        forward_backward()
        plain_optimizer.step()

    def ours() -> None:
        trainer._train_step([(views, indices)], 2)

    cases = {"baseline": forward_backward, "plain_step": plain_step, "ours": ours}
    for _ in range(args.warmup):
        for run in cases.values():
            run()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    monitor = CpuMonitor()
    for repeat in range(args.repeats):
        for name, run in cases.items():
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        log(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()))
    load = monitor.stop()
    info = machine_info()
    total = time.perf_counter() - started
    median = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}
    ratio_median = median["ours"] / median["baseline"]
    ratio_best = best["ours"] / best["baseline"]
    images = 2 * args.batch_size
    head_params = sum(p.numel() for p in trainer.network.heads.parameters())
    encoder_params = sum(p.numel() for p in trainer.network.encoder.parameters())
    met = "met" if ratio_median <= OVERHEAD_GOAL else "NOT met"

    def row(name: str, label: str) -> str:
        values = ", ".join(f"{v:.3f}" for v in times[name])
        return (f"| {label} | {values} | **{median[name]:.3f}** | {best[name]:.3f} | "
                f"{args.batch_size / median[name]:,.1f} | {median[name] / median['baseline']:.2f} |")

    body = "\n".join([
        "## Refinement: cost of an NNA training step (`benchmarks/refine.py`)",
        "",
        f"- Machine: {machine_line(info)}",
        f"- Command (from the repository root): `{command}`",
        f"- Whole run: {total:.0f} s",
        f"- Setting: `{args.model}` at {args.img_size} px ({depth} blocks, {encoder_params / 1e6:.1f} M parameters), "
        f"device {device}, precision {precision}, batch {args.batch_size} images x 2 global views; heads on blocks "
        f"{blocks} (0-based), widths {args.head_dims} ({head_params / 1e6:.1f} M head parameters in all), queues of "
        f"{args.queue_size} x top-{args.topk}; random weights and images, seeded. {args.warmup} warm-up step(s), then "
        f"{args.repeats} interleaved repetitions.",
        "",
        "| step | seconds per step (each repetition) | median (s) | best (s) | images/s (batch / median) | "
        "vs forward+backward |",
        "|---|---|---:|---:|---:|---:|",
        row("baseline", "plain forward + backward of the encoder on both views (baseline)"),
        row("plain_step", "the same + AdamW step (context)"),
        row("ours", f"NNA stage-2 step: {args.heads} heads, queues, loss, backward, AdamW over layer-decay groups, "
                    "EMA"),
        "",
        f"- Goal: our step at most {OVERHEAD_GOAL}x the forward+backward pass: **{met}** "
        f"({ratio_median:.2f}x from medians, {ratio_best:.2f}x from best times).",
        f"- Images per second of refinement on this {device.type.upper()}: **{args.batch_size / median['ours']:,.1f}** "
        f"(each image gives 2 views: {images / median['ours']:,.1f} views/s).",
        f"- Load during the run: other processes used {load['other_share']:.0%} of the machine's CPU capacity"
        if load.get("other_share") is not None else "- Load: not measured",
    ])
    raw = {"times": times, "median": median, "best": best, "ratio_median": ratio_median, "ratio_best": ratio_best,
           "args": vars(args) | {"report": str(args.report)}, "machine": info, "load": load}
    publish(SECTION, body, raw, report=args.report, no_report=args.no_report, total_seconds=total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
