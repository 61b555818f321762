import pytest

from mimprobe.blocks import parse_block_spec, resolve_blocks
from mimprobe.errors import BadInputError


@pytest.mark.parametrize("spec, expected", [
    (None, list(range(12))),
    (4, [8, 9, 10, 11]),
    ([0, 5, -1], [0, 5, 11]),
    ([3, 3, 1], [1, 3]),
])
def test_resolve_blocks(spec, expected):
    assert resolve_blocks(spec, 12) == expected


@pytest.mark.parametrize("spec", [[12], [-13], 0, 13, []])
def test_resolve_blocks_rejects_out_of_range(spec):
    with pytest.raises(BadInputError, match="block|blocks"):
        resolve_blocks(spec, 12)


def test_unknown_index_message_names_the_depth():
    with pytest.raises(BadInputError, match=r"unknown block index 12: the model has 12 blocks, numbered 0\.\.11"):
        resolve_blocks([1, 12], 12)


@pytest.mark.parametrize("text, expected", [
    ("all", None), ("last:4", 4), ("last4", 4), ("0,5,11", [0, 5, 11]), ("4-6", [4, 5, 6]), ("-1,0", [-1, 0]),
    ("0, 2-3", [0, 2, 3]),
])
def test_parse_block_spec(text, expected):
    assert parse_block_spec(text) == expected


@pytest.mark.parametrize("text", ["last:x", "a,b", "5-2"])
def test_parse_block_spec_rejects(text):
    with pytest.raises(BadInputError, match="--blocks"):
        parse_block_spec(text)
