"""Mask math on hand-built examples and invariants."""
import pytest
import torch

from mergemix import mask as M


def test_recover_hand_example():
    attn = torch.tensor([[0.1, 0.5, 0.4]])  # CLS, token a, token b
    source = torch.tensor([[[0, 0, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]]]).float()
    assert torch.allclose(M.recover(attn, source), torch.tensor([[0.5, 0.4, 0.5, 0.4]]))
    index = torch.tensor([[1, 2, 1, 2]])
    assert torch.allclose(M.recover(attn, index), torch.tensor([[0.5, 0.4, 0.5, 0.4]]))


# by hand: ⌊λ·100⌋, where 0.29 · 100 and 0.57 · 100 round to just below 29 and 57 in floats
@pytest.mark.parametrize("lam, k", [(0.0, 0), (0.29, 29), (0.5, 50), (0.57, 57), (0.7, 70), (0.999, 99), (1.0, 100)])
def test_topk_mask_count_and_choice(lam, k):
    scores = torch.randn(5, 100)
    m = M.topk_mask(scores, lam)
    assert torch.equal(M.topk_mask(scores, torch.tensor(lam)), m)  # an fp32 λ counts the same
    assert torch.equal(m.sum(1), torch.full((5,), float(k)))
    if 0 < k < 100:  # the kept ones are the highest scores
        assert (scores[m.bool()].view(5, k).min(1).values > scores[~m.bool()].view(5, -1).max(1).values).all()


def test_topk_mask_per_sample_lambda():
    lam = torch.tensor([0.0, 0.25, 0.5, 0.99])
    m = M.topk_mask(torch.randn(4, 16), lam)
    assert m.sum(1).tolist() == [0, 4, 8, 15]


def test_upsample_any_grid():
    mask = torch.tensor([[1.0, 0, 0, 1, 1, 0]])
    up = M.upsample_mask(mask, (2, 3), (4, 5))
    assert up.shape == (1, 1, 8, 15)
    assert torch.equal(up[0, 0, ::4, ::5].flatten(), mask[0])
    assert up.sum() == mask.sum() * 20
    assert torch.allclose(M.patch_fraction(up, (2, 3)), mask)


@pytest.mark.parametrize("B", [2, 3, 5, 64])
def test_derangement_no_self_pairs(B):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = M.derangement(B, g)
        assert (p != torch.arange(B)).all()
        assert sorted(p.tolist()) == list(range(B))
    assert torch.equal(M.derangement(B, torch.Generator().manual_seed(3)), M.derangement(B, torch.Generator().manual_seed(3)))


def test_derangement_needs_two():
    with pytest.raises(ValueError, match="at least 2"):
        M.derangement(1)


def test_mix_pixel_exact():
    x = torch.randn(4, 3, 8, 8)
    partner = torch.tensor([2, 0, 3, 1])
    mask = M.upsample_mask(M.topk_mask(torch.randn(4, 4), 0.5), (2, 2), (4, 4))
    mixed = M.mix_images(x, partner, mask)
    keep = mask.bool().expand_as(x)
    assert torch.equal(mixed[keep], x[keep])
    assert torch.equal(mixed[~keep], x[partner][~keep])


def test_lam_hat_policies():
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0]])
    assert torch.allclose(M.lam_hat_area(mask), torch.tensor([0.5, 0.25]))
    keep = torch.tensor([3, 10, 50, 90])
    g = torch.Generator().manual_seed(0)
    lh = M.lam_hat_gaussian(keep, num_tokens=98, num_patches=196, generator=g)
    assert lh.shape == (4,) and lh.min() == 0 and torch.isclose(lh.max(), torch.tensor(1.0))
    # batch-normalised noise: identical draws for the same seed, whatever the keep counts' scale
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = M.lam_hat_gaussian(keep, 98, 196, g1)
    b = M.lam_hat_gaussian(keep * 2, 10, 196, g2)
    assert torch.allclose(a, b, atol=1e-5)


def test_lam_hat_gaussian_per_sample_sigma_hand_computed():
    """DESIGN §2.5: z_b = μ + σ_b·n_b with μ = K/L, σ_b = keep_b/L, n_b standard normal (float64,
    drawn from the generator), then min-max normalised across the batch."""
    keep, K, L = torch.tensor([3, 10, 50, 90, 196]), 98, 196
    n = torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z = K / L + keep.double() / L * n
    expected = (z - z.min()) / (z.max() - z.min())
    got = M.lam_hat_gaussian(keep, K, L, torch.Generator().manual_seed(4))
    assert torch.allclose(got, expected.float(), atol=1e-7) and got.max() == 1.0
    # the per-sample spread matters: with equal keep counts the same draw normalises differently
    same = M.lam_hat_gaussian(torch.full((5,), 50), K, L, torch.Generator().manual_seed(4))
    assert not torch.allclose(got, same, atol=1e-3)


def test_lam_hat_gaussian_without_spread_is_the_kept_fraction():
    """Min-max is undefined when every draw is equal: one sample, or nothing kept (σ_b = 0)."""
    g = torch.Generator().manual_seed(0)
    assert torch.equal(M.lam_hat_gaussian(torch.zeros(4, dtype=torch.long), 98, 196, g), torch.zeros(4))
    assert torch.equal(M.lam_hat_gaussian(torch.tensor([49]), 98, 196, g), torch.tensor([0.25]))


def test_patch_fraction_of_an_image_padded_to_whole_patches():
    """6x6 pixels on a 2x2 grid of 4x4 patches (dynamic_img_pad pads 2 rows and columns): the
    right and bottom patches hold 4x2, 2x4 and 2x2 real pixels."""
    mask = torch.ones(1, 1, 6, 6)
    mask[..., :4, :4] = 0  # exactly the top-left patch
    assert torch.equal(M.patch_fraction(mask, (2, 2), (4, 4)), torch.tensor([[0.0, 1, 1, 1]]))
    mask[..., 5, :] = 0  # the last real row: half of the bottom patches' real pixels
    assert torch.equal(M.patch_fraction(mask, (2, 2), (4, 4)), torch.tensor([[0.0, 1, 0.5, 0.5]]))


def test_upsample_mask_crops_to_the_image_size():
    """A 6x6 grid of 8 px patches covers 48 px; images of 44 px (padded up by dynamic_img_pad) get
    the top-left 44x44 of it."""
    mask = (torch.arange(36) % 2).float()[None]
    full = M.upsample_mask(mask, (6, 6), (8, 8))
    cropped = M.upsample_mask(mask, (6, 6), (8, 8), (44, 44))
    assert full.shape == (1, 1, 48, 48) and torch.equal(cropped, full[..., :44, :44])


def test_attention_mask_by_hand():
    """Tokens [CLS, t1, t2] with scores 0.5, 0.3, 0.2; a 2x2 grid whose patches t1 holds (0, 3) and
    t2 holds (1, 2). λ = 0.5 keeps ⌊0.5·4⌋ = 2 patches: t1's, the higher scored, i.e. the diagonal."""
    attn = torch.tensor([[0.5, 0.3, 0.2]])
    source = torch.tensor([[1, 2, 2, 1]])
    scores, patch_mask, pixels = M.attention_mask(attn, source, 0.5, (2, 2), (2, 2), (4, 3))
    assert torch.equal(scores, torch.tensor([[0.3, 0.2, 0.2, 0.3]]))
    assert torch.equal(patch_mask, torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    expected = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # cropped to 4x3
    assert torch.equal(pixels, expected[None, None])


def test_fills_grid_reads_height_and_width_in_their_own_order():
    """A 2x3 grid of 4x5-pixel patches (ph=4, pw=5) covers exactly 8x15 pixels; 15x8 or 10x12 is not it."""
    assert M.fills_grid((8, 15), (2, 3), (4, 5))
    assert not M.fills_grid((15, 8), (2, 3), (4, 5)) and not M.fills_grid((10, 12), (2, 3), (4, 5))
    assert not M.fills_grid((7, 15), (2, 3), (4, 5))  # one row short: padded up to whole patches


def test_lam_hat_area_of_a_pixel_mask_is_its_kept_pixel_share():
    """(B, 1, H, W) pixel masks, non-square: 6 of 24 and 20 of 24 pixels kept."""
    mask = torch.zeros(2, 1, 4, 6)
    mask[0, 0, :1] = 1
    mask[1, 0, :, 1:] = 1
    assert torch.allclose(M.lam_hat_area(mask), torch.tensor([6 / 24, 20 / 24]))
