"""The NNA heads' widths and what they weigh, without torch: shared by `mimprobe refine` and `mimprobe place`.

MIM-Refiner's official widths (github.com/ml-jku/MIM-Refiner, ``src/zztemplates/models/nnclr.yaml`` lines 19-23:
projector hidden 2048, projection 256, predictor hidden 4096) were set for ViT-L/H/2B; `proportional_head_dims`
scales them to the encoder's width (refine's default on a CPU below 224 px, `mimprobe.refinement.sizing`).
"""

from __future__ import annotations

OFFICIAL_HEAD_DIMS = (2048, 256, 4096)    # nnclr.yaml:19-23: proj_hidden_dim, output_dim, pred_hidden_dim
OFFICIAL_HEAD_SOURCE = "src/zztemplates/models/nnclr.yaml:19-23"
OFFICIAL_HEAD_WIDTH_OF = 1024             # ViT-L's embed_dim: the smallest model the official widths were used for
OFFICIAL_IMG_SIZE = 224                   # train_byolaug_localviews.yaml:4 global_resolution
HEAD_WIDTH_MULTIPLE = 16                  # proportional widths are rounded to a multiple of this (and at least it)


def proportional_head_dims(embed_dim: int) -> tuple[int, int, int]:
    """The official head widths (2048, 256, 4096) times ``embed_dim / 1024`` (ViT-L's width), each rounded to a
    multiple of 16 and at least 16: (384, 48, 768) for ViT-Tiny's 192, (768, 96, 1536) for ViT-S, the official
    widths for ViT-L."""
    return tuple(max(HEAD_WIDTH_MULTIPLE, round(width * embed_dim / OFFICIAL_HEAD_WIDTH_OF / HEAD_WIDTH_MULTIPLE)
                     * HEAD_WIDTH_MULTIPLE) for width in OFFICIAL_HEAD_DIMS)


def head_parameters(embed_dim: int, dims: tuple[int, int, int] = OFFICIAL_HEAD_DIMS) -> int:
    """Trainable parameters of one NNA head of widths ``dims`` (projector hidden H, projection P, predictor hidden Q)
    on a block of width ``embed_dim`` (`mimprobe.refinement.heads`: bias-free Linears d-H-H-P and P-Q-P, each
    followed by an affine BatchNorm)."""
    hidden, proj, predictor = dims
    linears = embed_dim * hidden + hidden * hidden + hidden * proj + proj * predictor + predictor * proj
    norms = 2 * (hidden + hidden + proj + predictor + proj)
    return linears + norms
