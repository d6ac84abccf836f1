"""Character regions of core.diffusion.consistency (pure numpy: runs without MindSpore or PyTorch)."""

from __future__ import annotations

import numpy as np
import pytest

from core.diffusion.consistency import Consistency, check_regions, reader_regions, region_masks
from core.errors import InvalidOption

CLS, SEP = 101, 102


def _prompt(*ids: int, length: int = 12) -> np.ndarray:
    tokens = np.zeros(length, np.int64)
    tokens[: len(ids) + 2] = [CLS, *ids, SEP]
    return tokens


def _marked(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)]


@pytest.mark.parametrize(
    ("prompt", "phrase", "expected"),
    [
        ((5, 6, 7, 8), (6, 7), [2, 3]),  # a two-token word inside
        ((5, 6, 7, 5, 6), (5, 6), [1, 2, 4, 5]),  # repeated: every occurrence
        ((5, 5, 5), (5, 5), [1, 2, 3]),  # overlapping runs
        ((9, 8, 7, 6), (7, 6), [3, 4]),  # at the end of the prompt, just before [SEP]
        ((5, 6, 7), (6, 8), []),  # absent: only a prefix occurs
        ((5, 6, 7), (), []),  # an empty phrase marks nothing
        ((5, 6, 7), (7, SEP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), []),  # longer than the prompt window left
    ],
)
def test_region_masks_mark_every_occurrence(
    prompt: tuple[int, ...], phrase: tuple[int, ...], expected: list[int]
) -> None:
    tokens = _prompt(*prompt)[None]
    masks = region_masks(tokens, [[np.array(phrase, np.int64)]])
    assert masks.shape == (1, 1, 12) and masks.dtype == np.float32
    assert _marked(masks[0, 0]) == expected
    assert set(np.unique(masks)) <= {0.0, 1.0}


def test_region_masks_per_reference_and_panel() -> None:
    """Reference r marks any of its phrases (a name and a description word), in each panel apart."""
    tokens = np.stack([_prompt(5, 6, 30, 7, 8), _prompt(7, 8, 31, 9), _prompt(40, 41)])
    cat = [np.array([5, 6]), np.array([9])]  # two names for one character
    dog = [np.array([7, 8])]
    masks = region_masks(tokens, [cat, dog, []])
    assert masks.shape == (3, 3, 12)
    assert [_marked(m) for m in masks[0]] == [[1, 2], [4], []]
    assert [_marked(m) for m in masks[1]] == [[4, 5], [1, 2], []]
    assert not masks[2].any()
    with pytest.raises(InvalidOption, match="Prompt tokens"):
        region_masks(tokens[0], [dog])
    with pytest.raises(InvalidOption, match="Phrase tokens"):
        region_masks(tokens, [[np.array([1.5])]])


def test_consistency_regions_are_checked() -> None:
    refs = np.zeros((2, 4, 8, 8), np.float32)
    regions = np.zeros((2, 3, 77), np.float32)
    assert Consistency(references=refs, regions=regions).regions is regions
    for bad, match in (
        (np.zeros((3, 3, 77)), "one row per reference"),
        (np.zeros((2, 77)), "one row per reference"),
        (np.full((2, 3, 77), 0.5), "only 0 and 1"),
        (np.full((2, 3, 77), np.nan), "only 0 and 1"),
    ):
        with pytest.raises(InvalidOption, match=match):
            Consistency(references=refs, regions=bad)
    with pytest.raises(InvalidOption, match="reference pictures"):
        Consistency(regions=regions)


def test_reader_regions_follow_the_conditional_rows() -> None:
    """Both guidance halves of panel p read panel p's regions and the maps of p's conditional row."""
    regions = np.zeros((2, 3, 77), np.float32)
    regions[0, 0, 4] = regions[1, 2, 9] = 1
    consistency = Consistency(references=np.zeros((2, 4, 8, 8), np.float32), regions=regions)
    got = reader_regions(consistency, panels=3, halves=2, context_length=77)
    assert got is not None
    tokens, rows = got
    assert tokens.shape == (6, 77, 2) and rows.tolist() == [3, 4, 5, 3, 4, 5]
    for reader in range(6):
        assert np.array_equal(tokens[reader], regions[:, reader % 3].T)
    single = reader_regions(consistency, panels=3, halves=1, context_length=77)
    assert single is not None and single[1].tolist() == [0, 1, 2]
    empty = Consistency(references=consistency.references, regions=np.zeros_like(regions))
    assert reader_regions(empty, 3, 2, 77) is None  # no region at all: exactly the uniform path
    assert reader_regions(Consistency(references=consistency.references), 3, 2, 77) is None
    with pytest.raises(InvalidOption, match="2 panel"):
        reader_regions(consistency, panels=2, halves=2, context_length=77)
    with pytest.raises(InvalidOption, match="Shared regions"):
        check_regions((tokens, rows), readers=6, batch=7, context_length=77)  # one reference row only
    with pytest.raises(InvalidOption, match="rows must lie"):
        check_regions((tokens, rows + 5), readers=6, batch=8, context_length=77)
    checked = check_regions((tokens, rows), readers=6, batch=8, context_length=77)
    assert checked[0].dtype == np.float32 and checked[1].dtype == np.int32
