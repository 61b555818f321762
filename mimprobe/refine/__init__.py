"""NNA refinement (MIM-Refiner, arXiv 2402.10093): heads on the chosen blocks, their neighbour queues, the loss,
and the two-stage trainer (`run_refine`)."""

from .config import RefineConfig, lr_factor
from .heads import HeadConfig, NNAHead
from .loss import gather_predictions, multi_view_nna_loss, nna_loss
from .queue import NNQueue
from .trainer import RefineResult, run_refine

__all__ = ["HeadConfig", "NNAHead", "NNQueue", "RefineConfig", "RefineResult", "gather_predictions", "lr_factor",
           "multi_view_nna_loss", "nna_loss", "run_refine"]
