"""Image and caption masks: the asked ratio, block shapes, BERT's split, determinism."""
import numpy as np
import pytest
import torch

from megaclip.config import MaskConfig, TextMlmConfig
from megaclip.data.masks import (block_mask, image_mask, num_masked, random_mask, split_indices,
                                 text_mask)


def _masked_neighbour_fraction(mask: np.ndarray, grid: int) -> float:
    """Of the masked patches' 4-neighbours inside the grid, the fraction that is masked."""
    m = mask.reshape(grid, grid)
    hits = total = 0
    for y, x in zip(*np.nonzero(m)):
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            if 0 <= y + dy < grid and 0 <= x + dx < grid:
                total += 1
                hits += m[y + dy, x + dx]
    return hits / total


@pytest.mark.parametrize("grid,ratio", [(14, 0.75), (16, 0.4), (8, 0.5), (4, 0.75)])
@pytest.mark.parametrize("strategy", ["random", "block"])
def test_exact_ratio_for_every_sample(grid, ratio, strategy):
    cfg = MaskConfig(ratio=ratio, strategy=strategy)
    for seed in range(30):
        m = image_mask(np.random.default_rng(seed), grid, cfg)
        assert m.shape == (grid * grid,) and m.dtype == bool
        assert m.sum() == num_masked(grid * grid, ratio) == round(ratio * grid * grid)


def test_block_masks_are_made_of_blocks():
    """At 40% of a 14x14 grid, a masked patch's neighbours are mostly masked in block masks
    (rectangles) and at about the ratio in random masks."""
    blocks = np.mean([_masked_neighbour_fraction(block_mask(np.random.default_rng(s), 14, 0.4), 14)
                      for s in range(20)])
    scattered = np.mean([_masked_neighbour_fraction(random_mask(np.random.default_rng(s), 14, 0.4),
                                                    14) for s in range(20)])
    assert scattered == pytest.approx(0.4, abs=0.06)
    assert blocks > 0.7, blocks
    # and some sample has a full rectangle of at least min_patches (16) masked patches
    m = block_mask(np.random.default_rng(0), 14, 0.4).reshape(14, 14)
    assert any(m[y:y + h, x:x + w].all() for h in range(2, 15) for w in range(2, 15)
               if h * w >= 16 for y in range(15 - h) for x in range(15 - w))


def test_masks_are_a_function_of_the_seed():
    cfg = MaskConfig(strategy="block")
    a = image_mask(np.random.default_rng(5), 14, cfg)
    b = image_mask(np.random.default_rng(5), 14, cfg)
    c = image_mask(np.random.default_rng(6), 14, cfg)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_split_indices_lists_visible_then_masked():
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    keep, masked = split_indices(mask)
    assert keep.tolist() == [[1, 3], [0, 1]] and masked.tolist() == [[0, 2], [2, 3]]


def test_text_mask_picks_caption_pieces_with_bert_split():
    cfg = TextMlmConfig(mask_ratio=0.2, mask_token_prob=0.8, random_token_prob=0.1)
    ordinary = np.arange(10, 60)
    tokens = torch.tensor([2] + list(range(100, 120)) + [3] + [0] * 10)  # BOS, 20 pieces, EOS, pad
    eot = 21
    kinds = {"embed": 0, "random": 0, "kept": 0}
    for seed in range(400):
        m = text_mask(np.random.default_rng(seed), tokens, eot, cfg, ordinary)
        chosen = m.target.nonzero().flatten()
        assert len(chosen) == 4  # 20% of 20 pieces
        assert chosen.min() >= 1 and chosen.max() <= 20  # never BOS, EOS or padding
        assert not (m.use_mask_embedding & ~m.target).any()
        changed = m.tokens != tokens
        assert not (changed & ~m.target).any()
        assert all(10 <= int(t) < 60 for t in m.tokens[changed])
        kinds["embed"] += int(m.use_mask_embedding.sum())
        kinds["random"] += int(changed.sum())  # originals lie outside the ordinary ids
        kinds["kept"] += int((m.target & ~m.use_mask_embedding & ~changed).sum())
    total = sum(kinds.values())
    assert kinds["embed"] / total == pytest.approx(0.8, abs=0.03)
    assert kinds["random"] / total == pytest.approx(0.1, abs=0.03)
    assert kinds["kept"] / total == pytest.approx(0.1, abs=0.03)


def test_text_mask_always_masks_one_piece_of_a_short_caption():
    tokens = torch.tensor([2, 50, 3, 0, 0])
    m = text_mask(np.random.default_rng(0), tokens, 2, TextMlmConfig(), np.arange(10, 20))
    assert m.target.tolist() == [False, True, False, False, False]
