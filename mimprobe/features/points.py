"""Probe points inside a transformer block, read by forward hooks and pooled inside the hook.

A pre-norm transformer block computes (timm ``vision_transformer.Block``, ``beit.Block``, ``eva.EvaBlock``)::

    x = x + drop_path1(ls1(attn(norm1(x))))          # ls1: LayerScale, or BEiT/EVA's gamma_1 * (...)
    x = x + drop_path2(ls2(mlp(norm2(x))))           # mlp: fc1 -> act -> drop -> norm -> fc2

and the points are (Odonnat et al., "Layer by layer, module by module", arXiv 2603.05280, probe the same ones):

* ``block``: the block's output (read by `BlockOutputs`, not here; ``--norm final`` applies to it alone);
* ``norm1`` / ``norm2``: the block's input to the attention / the MLP as normalised by the block (the norm
  modules' outputs);
* ``attn``: the attention branch as added to the residual stream: after layer scale and drop path (identity at
  evaluation), before the residual add (``drop_path1``'s output);
* ``mlp``: the MLP branch likewise (``drop_path2``'s output);
* ``mlp_hidden``: the MLP's hidden activation as its output projection reads it (``mlp.fc2``'s input: the
  activation, times the gate for GLU/SwiGLU MLPs, after the MLP's inner norm where it has one, as EVA-02's
  ``scale_mlp``), ``mlp.fc2.in_features`` wide (4x the block's width for a ViT).

Points are read raw: ``--norm final`` does not apply to them (the model's final norm belongs to the residual stream
after the last block; the hidden activation is not even of its width). Every point's tokens are pooled inside the
hook as `pool_tokens` pools a block's output (``cls``: token 0; ``mean``: the patch tokens, prefix tokens such as
registers excluded), so no (batch, tokens, 4 * width) tensor outlives its hook. All points come from the one forward
pass that reads the block outputs.

Blocks of other types (post-norm data2vec 2.0 / ``ResPostBlock`` / ``EvaBlockPostNorm``, parallel blocks, ConvNeXt,
Swin, Hiera, SAM) have no such points, or other ones: they are refused before any store is made.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..choices import POINTS
from ..errors import BadInputError
from .pooling import pool_tokens


@dataclass(frozen=True)
class PointSite:
    """Where a point is read in a block: the output of sub-module ``module`` (``reads="output"``, a forward hook)
    or its first positional input (``reads="input"``, a forward pre-hook)."""

    module: str
    reads: str


# The pre-norm block forwards above; the sites are their sub-modules, each called once per forward.
PRE_NORM_SITES = {
    "norm1": PointSite("norm1", "output"),
    "attn": PointSite("drop_path1", "output"),
    "norm2": PointSite("norm2", "output"),
    "mlp_hidden": PointSite("mlp.fc2", "input"),
    "mlp": PointSite("drop_path2", "output"),
}


def _pre_norm_block_types() -> tuple[type, ...]:
    from timm.models.beit import Block as BeitBlock
    from timm.models.eva import EvaBlock
    from timm.models.vision_transformer import Block as VitBlock

    return VitBlock, BeitBlock, EvaBlock


def block_modules(model: nn.Module, blocks: list[int], block_paths: tuple[str, ...] = ()) -> dict[int, nn.Module]:
    """{block: the block's module}: ``model.blocks[i]``, or the `BlockLayout.block_modules` path of a staged model."""
    if block_paths:
        return {i: model.get_submodule(block_paths[i]) for i in blocks}
    return {i: model.blocks[i] for i in blocks}


def check_points(model_name: str, modules: dict[int, nn.Module], points: tuple[str, ...]) -> None:
    """Refuse points a model's blocks do not have, with one line naming the model and the points it supports.

    Raises:
        BadInputError: A point other than ``block`` on a block that is not a known pre-norm block (exact type:
            a subclass may change the forward).
    """
    inner = [point for point in points if point != "block"]
    if not inner:
        return
    known = _pre_norm_block_types()
    for index, module in modules.items():
        if type(module) not in known:
            raise BadInputError(f"--points {','.join(inner)}: model {model_name} has blocks of type "
                                f"{type(module).__name__} (block {index}), whose inner points are not defined (only "
                                "pre-norm ViT, BEiT and EVA blocks have them); it supports --points block")


def point_width(module: nn.Module, point: str, block_width: int) -> int:
    """Width of one point of a block: ``mlp.fc2.in_features`` for ``mlp_hidden``, else the block's width."""
    if point == "mlp_hidden":
        return int(module.get_submodule("mlp.fc2").in_features)
    return int(block_width)


class PointReader:
    """Forward hooks that pool the chosen points of the chosen blocks as the forward pass goes through them.

    Use as a context manager around the forward passes; after each pass `take` returns
    ``{(block, point, pooling): (batch, dim) float32}`` (``2 * dim`` for ``cls+mean``) and forgets them.

    Args:
        modules: {block: block module} (`block_modules`), checked with `check_points`.
        points: Points to read (``block`` is ignored: `BlockOutputs` reads it).
        poolings: Poolings of `pool_tokens`.
        num_prefix_tokens: Leading non-patch tokens (CLS + registers), excluded from ``mean``.
        has_class_token: Whether token 0 is a CLS token.
    """

    def __init__(self, modules: dict[int, nn.Module], points: tuple[str, ...], poolings: tuple[str, ...], *,
                 num_prefix_tokens: int, has_class_token: bool):
        self.modules = modules
        self.points = tuple(point for point in points if point != "block")
        self.poolings = tuple(poolings)
        self.num_prefix_tokens = num_prefix_tokens
        self.has_class_token = has_class_token
        self._pooled: dict[tuple[int, str, str], torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "PointReader":
        for block, module in self.modules.items():
            for point in self.points:
                site = PRE_NORM_SITES[point]
                target = module.get_submodule(site.module)
                if site.reads == "output":
                    handle = target.register_forward_hook(self._output_hook(block, point))
                else:
                    handle = target.register_forward_pre_hook(self._input_hook(block, point))
                self._handles.append(handle)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pooled = {}

    def _output_hook(self, block: int, point: str):
        def hook(_module, _inputs, output):
            self._pool(block, point, output)
        return hook

    def _input_hook(self, block: int, point: str):
        def hook(_module, inputs):
            self._pool(block, point, inputs[0])
        return hook

    def _pool(self, block: int, point: str, tokens: torch.Tensor) -> None:
        """Pool (batch, tokens, dim) into one vector per image and pooling; the tokens are not kept."""
        if (block, point, self.poolings[0]) in self._pooled:
            raise RuntimeError(f"point {point} of block {block} was reached twice in one forward pass")
        tokens = tokens.float()
        for pooling in self.poolings:
            self._pooled[(block, point, pooling)] = pool_tokens(
                tokens, pooling, num_prefix_tokens=self.num_prefix_tokens, has_class_token=self.has_class_token)

    def take(self) -> dict[tuple[int, str, str], torch.Tensor]:
        """The pooled points of the last forward pass (every chosen block, point and pooling)."""
        pooled, self._pooled = self._pooled, {}
        missing = [(b, p) for b in self.modules for p in self.points if (b, p, self.poolings[0]) not in pooled]
        if missing:
            raise RuntimeError(f"the forward pass did not reach point {missing[0][1]} of block {missing[0][0]}")
        return pooled


__all__ = ["POINTS", "PointReader", "PointSite", "block_modules", "check_points", "point_width"]
