"""Before/after reports: compare a refined model's profile with the original's, block by block.

DESIGN.md, "Reports": ``compare`` writes one self-contained HTML file (plots embedded), a Markdown twin, PNG/SVG
plots and the merged table: block curves before/after for every metric and pooling with the placement and the
peak marked, per-block deltas with paired bootstrap intervals, the best block before and after, a block-by-block
linear CKA heatmap (Kornblith et al. 2019, arXiv 1905.00414) and per-class gains.

Modules: `inputs` (profile folders, their stores, predictions and placement), `curves` (which series to compare,
titles, number formats), `samples` (per-sample correctness from predictions.npz), `bootstrap`
(paired percentile bootstrap), `cka` (linear CKA, exact in minibatches), `comparison` (`compare`: the numbers of one
pair), `plots`, `document` / `content` / `html_report` / `markdown_report` (the report), `run` (`run_compare`:
files in, folder out). The CLI command is ``mimprobe compare`` in `mimprobe.cli`.
"""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "PairedInterval": ".bootstrap", "paired_bootstrap": ".bootstrap", "StoreCka": ".cka", "cka_matrix": ".cka",
    "linear_cka": ".cka", "store_cka": ".cka", "CompareConfig": ".config", "PairComparison": ".comparison",
    "compare": ".comparison", "ProfileInput": ".inputs", "find_placement": ".inputs", "load_profile": ".inputs",
    "CompareResult": ".run", "run_compare": ".run",
})
