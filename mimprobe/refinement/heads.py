"""The instance-discrimination head that MIM-Refiner puts on a block: a projector and a predictor.

MIM-Refiner (Alkin et al. 2024, arXiv 2402.10093, Sec. 3) attaches one NNCLR-style head to each chosen block.
The layout follows the official implementation (github.com/ml-jku/MIM-Refiner, ``src/models/ssl/nnclr_head.py``
with ``norm_mode="batchnorm"``, ``proj_hidden_layers=1``, ``pred_hidden_layers=0``)::

    projector  Linear(d, H) - BN - GELU - Linear(H, H) - BN - GELU - Linear(H, P) - BN
    predictor  Linear(P, Q) - BN - GELU - Linear(Q, P) - BN

Every Linear is bias-free because a BatchNorm follows it (its shift makes a bias redundant). Every BatchNorm is
affine, the last ones included: the official code builds them all with plain ``nn.BatchNorm1d`` and only
initialises them to the identity (``init_norm_as_noaffine`` sets weight 1, bias 0, and leaves them trainable);
the affine-free output BN of some BYOL/SimSiam variants is not what MIM-Refiner does. The Linears start
Xavier-uniform, the official default (``init_weights="xavier_uniform"``, ``nnclr_head.py`` lines 33 and 150-157,
kappamodules' ``init_xavier_uniform_zero_bias``); ``init="truncnormal"`` is the official alternative (std 0.02).

Plain ``nn.BatchNorm1d`` is used on purpose: under DDP the trainer converts the heads with
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` so the statistics span the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class HeadConfig:
    """Sizes of one NNA head (the official ViT-L/H/2B values; small models can use e.g. 512 / 128 / 1024)."""

    hidden_dim: int = 2048             # H: projector hidden width
    proj_dim: int = 256                # P: projection (and prediction) width, the space of the queue and the loss
    predictor_hidden_dim: int = 4096   # Q: predictor hidden width
    init: str = "xavier_uniform"       # the Linears: xavier_uniform (official default) or truncnormal (std 0.02)


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class NNAHead(nn.Module):
    """Projector + predictor of one Nearest-Neighbour-Alignment head (arXiv 2402.10093).

    The outputs are unnormalised and in the dtype the layers compute in: under a bf16 autocast they are bf16. The
    head does not cast on purpose; the queue and the loss normalise and work in float32 themselves (STYLE item 7).

    Args:
        in_dim: Width d of the block feature the head reads (the block's CLS token).
        config: Hidden and output widths.

    Raises:
        ValueError: ``in_dim`` or a width of ``config`` is not an integer >= 1.
    """

    def __init__(self, in_dim: int, config: HeadConfig = HeadConfig()) -> None:
        super().__init__()
        _check_positive_int(in_dim, "in_dim")
        if not isinstance(config, HeadConfig):
            raise ValueError(f"config must be a HeadConfig, got {type(config).__name__}")
        _check_positive_int(config.hidden_dim, "config.hidden_dim")
        _check_positive_int(config.proj_dim, "config.proj_dim")
        _check_positive_int(config.predictor_hidden_dim, "config.predictor_hidden_dim")
        if config.init not in _INITS:
            raise ValueError(f"config.init must be one of {', '.join(_INITS)}, got {config.init!r}")
        self.in_dim = in_dim
        self.config = config
        hidden, proj, pred_hidden = config.hidden_dim, config.proj_dim, config.predictor_hidden_dim
        self.projector = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.GELU(),
            nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.GELU(),
            nn.Linear(hidden, proj, bias=False), nn.BatchNorm1d(proj),
        )
        self.predictor = nn.Sequential(
            nn.Linear(proj, pred_hidden, bias=False), nn.BatchNorm1d(pred_hidden), nn.GELU(),
            nn.Linear(pred_hidden, proj, bias=False), nn.BatchNorm1d(proj),
        )
        self.apply(_INITS[config.init])

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Projector: (batch, in_dim) block features -> (batch, proj_dim) projections, unnormalised."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"NNAHead expects (batch, {self.in_dim}) features, got shape {tuple(x.shape)}")
        return self.projector(x)

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """Predictor: (batch, proj_dim) unnormalised projections -> (batch, proj_dim) predictions, unnormalised.

        The official head feeds the raw projection to the predictor (``norm_before_pred=False``).
        """
        if z.ndim != 2 or z.shape[1] != self.config.proj_dim:
            raise ValueError(f"the predictor expects (batch, {self.config.proj_dim}) projections, "
                             f"got shape {tuple(z.shape)}")
        return self.predictor(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project and predict one view.

        Args:
            x: (batch, in_dim) block features of one view.

        Returns:
            ``(projection, prediction)``, both (batch, proj_dim) and unnormalised. The projection of a global view is
            the anchor (and queue entry) of the NNA loss; the prediction is the predicted side.
        """
        projection = self.project(x)
        return projection, self.predict(projection)


def _init_xavier_uniform(module: nn.Module) -> None:
    """The official init (kappamodules ``init_xavier_uniform_zero_bias``): Linear weights U(-a, a) with
    a = sqrt(6 / (fan_in + fan_out)), zero bias; BatchNorms keep weight 1, bias 0 (``init_norm_as_noaffine``)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _init_truncnormal(module: nn.Module) -> None:
    """The official alternative (kappamodules ``init_truncnormal_zero_bias``, also timm's ViT init): truncated
    normal with std 0.02, zero bias; BatchNorms keep weight 1, bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


_INITS = {"xavier_uniform": _init_xavier_uniform, "truncnormal": _init_truncnormal}
