"""NNA refinement (MIM-Refiner, arXiv 2402.10093): heads on the chosen blocks, their neighbour queues, the loss,
and the two-stage trainer (`run_refine`). Names are imported on first use (the options load without torch)."""

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "RefineConfig": ".config", "lr_factor": ".schedules", "HeadConfig": ".heads", "NNAHead": ".heads",
    "gather_predictions": ".loss", "multi_view_nna_loss": ".loss", "nna_loss": ".loss", "NNQueue": ".queue",
    "RefineResult": ".trainer", "run_refine": ".trainer",
})
