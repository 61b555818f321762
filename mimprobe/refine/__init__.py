"""NNA refinement (MIM-Refiner, arXiv 2402.10093): heads on the chosen blocks, their neighbour queues, the loss."""

from .heads import HeadConfig, NNAHead
from .loss import gather_predictions, multi_view_nna_loss, nna_loss, nna_loss_all_swap
from .queue import NNQueue

__all__ = ["HeadConfig", "NNAHead", "NNQueue", "gather_predictions", "multi_view_nna_loss", "nna_loss",
           "nna_loss_all_swap"]
