"""Multi-block readouts of the linear probe (``--readout``): DINOv2's linear-evaluation inputs and an all-block one.

A per-block probe reads one block. Two readouts that people quote read several at once:

* **DINOv2's** (Oquab et al. 2023, arXiv:2304.07193; ``create_linear_input`` in facebookresearch/dinov2
  ``dinov2/eval/linear.py``, fed by ``ModelWithIntermediateLayers`` in ``dinov2/eval/utils.py``, which calls
  ``get_intermediate_layers(images, n, return_class_token=True)`` with the model's final norm applied): the class
  tokens of the last n blocks (n = 1 or 4), each after the final norm, concatenated in block order, and with
  ``use_avgpool`` the mean of the last block's patch tokens (its ``x_norm_patchtokens``: after the final norm, class
  and register tokens excluded) appended. ``last1``, ``last4``, ``last1+avg``, ``last4+avg`` here. The store's
  ``cls`` and ``mean`` poolings of a ``--norm final`` store are exactly those two inputs (`mimprobe.features.pooling`:
  ``mean`` averages ``tokens[:, num_prefix_tokens:]``, i.e. the patch tokens without class and register tokens, of
  the tokens `BlockOutputs` normalised with the model's final token norm, timm's ``forward_intermediates(norm=True)``
  for ViTs). For a model that normalises after pooling instead (timm's ``fc_norm`` of average-pooled ViTs, BEiT,
  EVA), the final-norm store holds that norm applied to each pooled vector, the model's own head input, which is
  not DINOv2's token norm: DINOv2's readouts are defined for models with a final token norm (ViT, DINOv2).
* **all** (an all-layer readout, as ALF: arXiv:2601.09322, which reads every layer at once): every block's pooled
  vector of the store, concatenated in block order, for each pooling the profile measures (one readout per
  pooling, ``blocks x dim`` wide).

A readout is one more feature set for the batched probe (`mimprobe.metrics.linear.evaluate_linear_with_hits`): it
is trained in the same call as the per-block probes, on the same validation split and C grid, and its rows are
read from the store's memory maps chunk by chunk (`ConcatenatedRows`), never concatenated in memory whole. Its
rows carry their own metric names (``linear_readout_top1``, ``linear_readout_val_top1``), so that no per-block
curve, headline or placement takes them for a block; ``block`` is the last block read and the params name the
readout, its blocks, poolings and inputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import BadInputError
from ._rows import MetricRow

# name -> (number of last blocks whose class token is read, whether the last block's mean patch token is appended)
DINOV2_READOUTS: dict[str, tuple[int, bool]] = {"last1": (1, False), "last4": (4, False), "last1+avg": (1, True),
                                                "last4+avg": (4, True)}
ALL_BLOCKS = "all"
READOUTS = (*DINOV2_READOUTS, ALL_BLOCKS)
TEST_METRIC, VAL_METRIC = "linear_readout_top1", "linear_readout_val_top1"
PER_BLOCK_METRICS = {"linear_top1": TEST_METRIC, "linear_val_top1": VAL_METRIC}
DINOV2_POOLING = "cls"   # the pooling whose per-block curve DINOv2's readouts are drawn beside (table column)
# Bytes per squared feature width the probe's solver holds for one readout: the float64 covariance, its
# standardised copy, eigh's float64 eigenvectors and workspace, and the float32 eigenbasis twice
# (`mimprobe.metrics.linear_solver._standardised_eigh`); the rows themselves are read in chunks under the budget.
SOLVER_BYTES_PER_WIDTH_SQUARED = 5 * 8


def parse_readouts(text: str | None) -> tuple[str, ...]:
    """``--readout last4+avg,all`` -> ("last4+avg", "all"); ``none`` or empty -> () (no readout)."""
    if text is None or text.strip().lower() in ("", "none"):
        return ()
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


@dataclass(frozen=True)
class Readout:
    """One multi-block readout: the (block, pooling) vectors it concatenates, in order.

    Attributes:
        name: ``last1``, ``last4``, ``last1+avg``, ``last4+avg`` or ``all``.
        pooling: The table's ``pooling`` column: the pooling whose per-block curve it is drawn beside (``cls`` for
            DINOv2's; the pooling read for ``all``).
        inputs: ((block, pooling), ...) in concatenation order, e.g. ((8, "cls"), ..., (11, "cls"), (11, "mean")).
    """

    name: str
    pooling: str
    inputs: tuple[tuple[int, str], ...]

    @property
    def key(self) -> str:
        """The feature-set name the probe trains it under (distinct from every block number)."""
        return f"readout {self.name} ({self.pooling})"

    @property
    def blocks(self) -> list[int]:
        return list(dict.fromkeys(block for block, _ in self.inputs))

    @property
    def poolings(self) -> list[str]:
        return list(dict.fromkeys(pooling for _, pooling in self.inputs))

    @property
    def last_block(self) -> int:
        """The table's ``block`` column: the last block read."""
        return max(self.blocks)

    @property
    def label(self) -> str:
        """Words for plots and the console, e.g. ``DINOv2 last4+avg`` or ``all blocks (cls)``."""
        return f"DINOv2 {self.name}" if self.name in DINOV2_READOUTS else f"all blocks ({self.pooling})"

    def params(self) -> dict:
        """What the rows' params add: the readout, its blocks, poolings and inputs."""
        return {"readout": self.name, "blocks": self.blocks, "poolings": self.poolings,
                "inputs": [[block, pooling] for block, pooling in self.inputs]}

    def features(self, rows: Callable[[int, str], object]):
        """(n, width) `ConcatenatedRows` of ``rows(block, pooling)`` (each (n, d): a memory map or row subset)."""
        from ._block_rows import ConcatenatedRows

        return ConcatenatedRows([rows(block, pooling) for block, pooling in self.inputs])


def dinov2_inputs(name: str, model_blocks: int) -> tuple[tuple[int, str], ...]:
    """The (block, pooling) inputs of a DINOv2 readout of a model with ``model_blocks`` blocks: the class tokens of
    its last n blocks, then the last block's mean patch token for ``+avg``."""
    n, avgpool = DINOV2_READOUTS[name]
    last = list(range(model_blocks - n, model_blocks))
    return tuple((block, "cls") for block in last) + (((last[-1], "mean"),) if avgpool else ())


def check_readout_store(names: Sequence[str], *, norm: str, poolings: Sequence[str], where: str) -> None:
    """Refuse DINOv2 readouts on features they are not defined on: a store (or an extraction's options, before it
    runs) without the final norm or without the ``cls`` (and, for ``+avg``, ``mean``) pooling.

    Args:
        names: The readouts asked for.
        norm: The store's (or the extraction's) ``norm``.
        poolings: Its poolings.
        where: What the features are, for the message (e.g. "store /x" or "the extraction").

    Raises:
        BadInputError: One line naming the missing setting and the extraction options that provide it.
    """
    dinov2 = [name for name in names if name in DINOV2_READOUTS]
    if not dinov2:
        return
    needed = ["cls"] + (["mean"] if any(DINOV2_READOUTS[name][1] for name in dinov2) else [])
    missing = [pooling for pooling in needed if pooling not in poolings]
    if norm == "final" and not missing:
        return
    problems = ([f"norm {norm}"] if norm != "final" else []) + ([f"no {' or '.join(missing)} pooling"] if missing
                                                                 else [])
    pool = ",".join(dict.fromkeys([*needed, *poolings]))
    raise BadInputError(f"--readout {','.join(dinov2)} reads DINOv2's input (class tokens after the final norm"
                        f"{', mean patch tokens' if 'mean' in needed else ''}) but {where} has "
                        f"{' and '.join(problems)}: extract with `mimprobe extract MODEL DATA --norm final --pool "
                        f"{pool}` (or `mimprobe profile MODEL DATA` with the same options)")


def plan_readouts(names: Sequence[str], *, store, poolings: Sequence[str],
                  memory_budget: int | None) -> dict[str, list[Readout]]:
    """The readouts of a profile, by the pooling whose probe call trains them, checked against the store before any
    work starts.

    Args:
        names: ``--readout`` values.
        store: The FeatureStore (its manifest's norm, poolings, blocks and the model's number of blocks).
        poolings: The poolings the profile measures (``all`` is one readout per pooling).
        memory_budget: ``--memory-budget`` bytes (None: no limit): a readout whose solver matrices
            (`SOLVER_BYTES_PER_WIDTH_SQUARED` x width^2) exceed it is refused.

    Raises:
        BadInputError: DINOv2 readouts on a raw store or one without cls/mean (`check_readout_store`), a store
            without the model's last blocks they read, or a readout too wide for the budget.
    """
    unknown = [name for name in names if name not in READOUTS]
    if unknown:
        raise BadInputError(f"unknown --readout value {unknown[0]!r}: use {', '.join(READOUTS)} (comma list) or none")
    manifest = store.manifest
    check_readout_store(names, norm=manifest["norm"], poolings=store.poolings, where=f"store {store.path}")
    model_blocks = int(manifest["model"].get("structure", {}).get("num_blocks", max(store.blocks) + 1))
    plan: dict[str, list[Readout]] = {}
    for name in names:
        if name in DINOV2_READOUTS:
            readouts = [Readout(name, DINOV2_POOLING, dinov2_inputs(name, model_blocks))]
            absent = [block for block in readouts[0].blocks if block not in store.blocks]
            if absent:
                n = DINOV2_READOUTS[name][0]
                raise BadInputError(f"--readout {name} reads the model's last {n} block(s) "
                                    f"{', '.join(map(str, readouts[0].blocks))} but store {store.path} lacks block "
                                    f"{absent[0]}: extract with --blocks all (or last:{n})")
        else:
            readouts = [Readout(name, pooling, tuple((block, pooling) for block in store.blocks))
                        for pooling in poolings]
        for readout in readouts:
            _check_width(readout, store, memory_budget)
            plan.setdefault(readout.pooling, []).append(readout)
    return plan


def readout_width(readout: Readout, store) -> int:
    """Features of the concatenation: the sum of its inputs' widths."""
    return sum(int(store.features("train", block, pooling).shape[1]) for block, pooling in readout.inputs)


def _check_width(readout: Readout, store, memory_budget: int | None) -> None:
    if memory_budget is None:
        return
    width = readout_width(readout, store)
    needed = SOLVER_BYTES_PER_WIDTH_SQUARED * width * width
    if needed > memory_budget:
        raise BadInputError(f"--readout {readout.name} ({readout.pooling}) is {len(readout.inputs)} x "
                            f"{width // len(readout.inputs)} = {width} features wide: its probe's {width} x {width} "
                            f"covariance and eigenbasis need about {needed / 2 ** 30:.1f} GiB, over --memory-budget "
                            f"{memory_budget / 2 ** 30:.1f} GiB: raise --memory-budget, or use --readout last4+avg")


def readout_rows(readout: Readout, found: Sequence[MetricRow]) -> list[MetricRow]:
    """The probe's rows of a readout's feature set under the readout's metric names, with its params added."""
    return [MetricRow(row.split, PER_BLOCK_METRICS[row.metric], row.value, {**row.params, **readout.params()},
                      row.seed) for row in found]


def readout_records(table, *, metric: str = TEST_METRIC, split: str | None = None) -> list[dict]:
    """The readout rows of a profile table (``metric``: the evaluation split's, or the validation split's
    ``linear_readout_val_top1``; ``split``: only that split's), one record per readout and pooling, in table order:
    ``label`` (e.g. "DINOv2 last4+avg"), ``readout``, ``pooling``, ``blocks``, ``poolings``, ``value`` (a
    fraction), ``split``; [] when there are none."""
    rows = table[table["metric"] == metric]
    if split is not None:
        rows = rows[rows["split"] == split]
    records = []
    for record in rows.to_dict(orient="records"):
        params = json.loads(record["params"])
        records.append({"label": Readout(params["readout"], record["pooling"], ()).label,
                        "readout": params["readout"], "pooling": record["pooling"], "blocks": params["blocks"],
                        "poolings": params["poolings"], "value": float(record["value"]), "split": record["split"]})
    return records


def reference_lines(table, metric: str, split: str) -> dict[str, list[tuple[str, float]]]:
    """The readouts to draw beside a per-block curve of ``metric`` on ``split`` (``linear_top1`` or
    ``linear_val_top1``; none for other metrics): {pooling: [(label, value), ...]}."""
    readout_metric = PER_BLOCK_METRICS.get(metric)
    if readout_metric is None:
        return {}
    lines: dict[str, list[tuple[str, float]]] = {}
    for record in readout_records(table, metric=readout_metric, split=split):
        lines.setdefault(record["pooling"], []).append((record["label"], record["value"]))
    return lines


def iter_readout_lines(table) -> list[str]:
    """Console lines: each readout's top-1 on the evaluation split beside the best single block's linear probe of
    the same pooling, so that a reader sees whether any block alone beats it."""
    lines = []
    for record in readout_records(table):
        blocks = table[(table["metric"] == "linear_top1") & (table["split"] == record["split"])
                       & (table["pooling"] == record["pooling"])]
        span = f"blocks {block_span(record['blocks'])} ({'+'.join(record['poolings'])})"
        text = f"{record['label']:<24} {span:<28} {100 * record['value']:.1f} %"
        if not blocks.empty:
            best = blocks.loc[blocks["value"].idxmax()]
            text += (f"  (best single block: {int(best['block'])} ({record['pooling']}) "
                     f"{100 * float(best['value']):.1f} %)")
        lines.append(text)
    return lines


def block_span(blocks: Sequence[int]) -> str:
    """``[8, 9, 10, 11]`` -> ``8-11``; other sets as a comma list."""
    blocks = list(blocks)
    if len(blocks) > 1 and blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]}-{blocks[-1]}"
    return ",".join(map(str, blocks))


def is_readout_metric(metric: str) -> bool:
    """Whether a table's metric is a readout's (not a per-block curve)."""
    return metric in (TEST_METRIC, VAL_METRIC)
