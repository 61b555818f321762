"""Automatic head placement: which blocks get MIM-Refiner refinement heads, chosen from a profile, and why.

MIM-Refiner (Alkin et al. 2024, arXiv 2402.10093) attaches instance-discrimination heads to the later blocks of a
masked-image-modelling encoder, "from where representation quality peaks to the end": its ViT-L runs put 8 heads on
blocks 17-24 of 24 and its ViT-H runs 12 heads on blocks 21-32 of 32 (1-based), every head weighing 1, and the 2B
model froze its first 25 % of blocks. Rules:

* ``peak`` (default): take the chosen metric's curve on the profile's *validation* split (k-NN fit→val, or
  leave-one-out on train when the data has no other split; linear probes: ``linear_val_top1``), never on test. Find
  the peak block (the first one on ties) and walk backwards from it while blocks stay within ``plateau`` of the
  peak: the first block of that contiguous run is the plateau start. Heads go on every block from the plateau
  start to the last block, or, with ``max_heads``, on ``max_heads`` of them spaced evenly
  (``numpy.linspace(start, last, max_heads)`` rounded half up; the first and the last block are always included).
* ``last-n``: the last ``n`` blocks.
* ``explicit``: a list of blocks (0-based, negative from the end), through `mimprobe.blocks.resolve_blocks`.

``freeze`` keeps the first blocks frozen during refinement: an int count, or a fraction of the depth in (0, 1)
(rounded half up); frozen blocks must all come before the first head.

Modules: `record` (the `Placement` and its JSON form), `curve` (the validation curve a rule reads), `rules`
(`place`, pure, on the profile's long table), `run` (`run_place` reads a profile folder and writes
``placement.json``; `load_placement` reads it back). The CLI command is ``mimprobe place`` in `mimprobe.cli`.
"""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "PlaceConfig": ".config", "PLACEMENT_METRICS": ".curve", "ValidationCurve": ".curve",
    "validation_curve": ".curve", "FORMAT_VERSION": ".record", "RULES": ".record", "Placement": ".record",
    "PlacementInputs": ".record", "note_line": ".record", "DEFAULT_PLATEAU": ".rules", "place": ".rules", "PLACEMENT_FILE": ".run",
    "load_placement": ".run", "placement_path": ".run", "read_profile": ".run", "run_place": ".run",
})
