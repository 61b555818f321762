"""The one definition of "which blocks" used by every layer of mimprobe.

Block numbers are 0-based and match timm's ``blocks.{i}`` parameter names.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import BadInputError

BlockSpec = None | int | Sequence[int]


def resolve_blocks(spec: BlockSpec, num_blocks: int) -> list[int]:
    """Turn a block specification into sorted, unique 0-based block indices.

    Args:
        spec: ``None`` for all blocks, an ``int`` n for the last n blocks, or a sequence of indices
            (negative ones count from the end, as in Python), exactly as timm's ``feature_take_indices``.
        num_blocks: Depth of the model.

    Returns:
        Sorted unique indices in ``[0, num_blocks)``.

    Raises:
        BadInputError: An index or count outside the model's depth.
    """
    if isinstance(spec, bool):
        raise BadInputError(f"invalid block specification {spec!r}: use None (all), an int n (last n) or a list")
    if isinstance(spec, int):
        if not 0 < spec <= num_blocks:
            raise BadInputError(
                f"cannot take the last {spec} blocks: the model has {num_blocks} blocks; use 1..{num_blocks}")
    elif spec is not None:
        spec = list(spec)
        if not spec:
            raise BadInputError("empty block list: give at least one block index, or 'all'")
        bad = [i for i in spec if not -num_blocks <= int(i) < num_blocks]
        if bad:
            raise BadInputError(
                f"unknown block index {bad[0]}: the model has {num_blocks} blocks, "
                f"numbered 0..{num_blocks - 1} (negative indices count from the end)")
        spec = [int(i) for i in spec]
    # timm (hence torch) loads here, not at import: `mimprobe place` parses --blocks without it
    from timm.models._features import feature_take_indices  # timm does not re-export it

    take_indices, _ = feature_take_indices(num_blocks, spec)
    return sorted(set(int(i) for i in take_indices))


def parse_block_spec(text: str) -> BlockSpec:
    """Parse the CLI form of a block specification.

    ``all`` → None; ``last:N`` (or ``lastN``) → N; ``0,5,-1`` → a list; ``2-5`` inside a list → a range.

    Raises:
        BadInputError: The text is none of these forms.
    """
    text = text.strip().lower()
    if text in ("", "all"):
        return None
    if text.startswith("last"):
        count = text[4:].lstrip(":= ")
        if count.isdigit():
            return int(count)
        raise BadInputError(f"invalid --blocks {text!r}: write last:N with a whole number N, e.g. last:4")
    indices: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:  # a range a-b (a leading '-' is a negative index)
                first, last = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                start, stop = int(first), int(last)
                if start < 0 or stop < start:
                    raise ValueError
                indices.extend(range(start, stop + 1))
            else:
                indices.append(int(part))
        except ValueError:
            raise BadInputError(
                f"invalid --blocks {text!r}: use 'all', 'last:N', or a comma list such as 0,5,11 or 4-11"
            ) from None
    return indices


RELATIVE_DEPTH_TEXT = "relative depth: block / (depth - 1)"


def relative_depth(blocks, num_blocks: int):
    """Where blocks sit in a model of ``num_blocks`` blocks, from 0 (the first block) to 1 (the last): block /
    (num_blocks - 1), so that models of different depths span the same axis and their first and last blocks align
    (as MIM-Refiner's Figure 1 lays MAE, data2vec 2.0 and refined models of different sizes on one axis, arXiv
    2402.10093). A model of one block sits at 1.

    Args:
        blocks: 0-based block numbers (an int, or an array-like of them).
        num_blocks: The model's depth.

    Returns:
        Floats of the same shape as ``blocks``.
    """
    import numpy as np

    values = np.asarray(blocks, dtype=float)
    if num_blocks <= 1:
        return np.ones_like(values)
    return values / (num_blocks - 1)
