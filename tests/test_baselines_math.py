"""Pure functions of the baselines against independent facts: timm's Mixup, hand-built maps, pixel counts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target, rand_bbox
from timm.loss import SoftTargetCrossEntropy
from torch import nn

import mergemix.mix.fmix as fmix_mod
import mergemix.mix.mixer as mixer_mod
import mergemix.mix.mixup as mixup_mod
import mergemix.mix.saliencymix as saliency_mod
from mergemix.mix import create
from mergemix.mix.attention import attention_lam_hat, attention_mass
from mergemix.mix.base import mixed_targets, sample_lam, smooth_one_hot, soft_cross_entropy
from mergemix.mix.boxes import (
    box_mask,
    boxes_at,
    centred_boxes,
    crop_windows,
    cut_size,
    paste_windows,
    random_corners,
)
from mergemix.mix.fmix import fourier_masks, fourier_noise
from mergemix.mix.gridmix import grid_masks
from mergemix.mix.mixer import Mixed
from mergemix.mix.saliencymix import saliency_peaks, spectral_residual
from mergemix.mix.smmix import attention_swap, extreme_windows
from mergemix.mix.smoothmix import gaussian_blob_masks
from mergemix.mix.tokenmix import block_token_mask
from mergemix.tome import Readout

NUM_CLASSES = 10


def flip_partner(batch_size: int, generator=None, device=None) -> torch.Tensor:
    """timm pairs sample i with B-1-i (x.flip(0)); a derangement when B is even."""
    return torch.arange(batch_size - 1, -1, -1, device=device)


def timm_mixup(monkeypatch, lam: float, use_cutmix: bool) -> Mixup:
    mixer = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=NUM_CLASSES)
    monkeypatch.setattr(mixer, "_params_per_batch", lambda: (lam, use_cutmix))
    return mixer


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.77])
def test_mixup_equals_timm(monkeypatch, lam):
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 3, 3, 9, 1, 2])
    monkeypatch.setattr(mixer_mod, "derangement", flip_partner)
    monkeypatch.setattr(mixup_mod, "sample_lam", lambda alpha, generator=None: lam)
    x_ours, t_ours = create("mixup", NUM_CLASSES).mixer(x.clone(), y)
    x_timm, t_timm = timm_mixup(monkeypatch, lam, False)(x.clone(), y)
    torch.testing.assert_close(x_ours, x_timm, atol=1e-6, rtol=0)
    torch.testing.assert_close(t_ours, t_timm, atol=1e-6, rtol=0)


@pytest.mark.parametrize("lam, seed", [(0.2, 0), (0.5, 1), (0.9, 2), (0.05, 3)])
def test_cutmix_equals_timm(monkeypatch, lam, seed):
    x, y = torch.randn(4, 3, 20, 24), torch.tensor([5, 0, 7, 7])
    np.random.seed(seed)
    (yl, yh, xl, xh), _ = cutmix_bbox_and_lam(x.shape, lam)
    box = torch.tensor([[yl, yh, xl, xh]] * 4)
    monkeypatch.setattr(mixer_mod, "derangement", flip_partner)
    monkeypatch.setattr(mixup_mod, "sample_lam", lambda alpha, generator=None: lam)
    monkeypatch.setattr(mixup_mod, "cutmix_boxes", lambda lam, B, size, generator=None, device=None: box)
    x_ours, t_ours = create("cutmix", NUM_CLASSES).mixer(x.clone(), y)
    np.random.seed(seed)  # timm redraws the same box
    x_timm, t_timm = timm_mixup(monkeypatch, lam, True)(x.clone(), y)
    torch.testing.assert_close(x_ours, x_timm, atol=0, rtol=0)
    torch.testing.assert_close(t_ours, t_timm, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_box_geometry_equals_timm(seed):
    """Same centre and λ -> the same clipped box as timm's rand_bbox."""
    size = (20, 24)
    lam = [0.1, 0.4, 0.63, 0.9, 0.0, 0.999][seed]
    np.random.seed(seed)
    cy, cx = np.random.randint(0, size[0]), np.random.randint(0, size[1])
    np.random.seed(seed)
    expected = rand_bbox((1, 3, *size), lam)
    ours = centred_boxes(torch.tensor([cy]), torch.tensor([cx]), cut_size(lam, size), size)
    assert ours[0].tolist() == [int(v) for v in expected]


def test_box_mask_marks_the_box():
    mask = box_mask(torch.tensor([[1, 3, 2, 5], [0, 0, 0, 4]]), (4, 6))
    assert mask.shape == (2, 1, 4, 6)
    assert mask[0, 0, 1:3, 2:5].sum() == 0 and mask[0].sum() == 24 - 6
    assert mask[1].sum() == 24  # an empty box keeps everything


def test_crop_and_paste_windows_move_pixels_per_sample():
    x = torch.arange(2 * 1 * 5 * 6, dtype=torch.float32).view(2, 1, 5, 6)
    corners = torch.tensor([[0, 1], [3, 4]])
    crop = crop_windows(x, corners, (2, 2))
    assert torch.equal(crop[0, 0], x[0, 0, 0:2, 1:3]) and torch.equal(crop[1, 0], x[1, 0, 3:5, 4:6])
    out = paste_windows(x, crop.flip(0), torch.tensor([[1, 1], [0, 0]]))
    assert torch.equal(out[0, 0, 1:3, 1:3], x[1, 0, 3:5, 4:6]) and torch.equal(out[1, 0, 0:2, 0:2], x[0, 0, 0:2, 1:3])
    assert (out != x).sum() <= 8 and not torch.equal(out, x)


def test_random_corners_keep_the_box_inside():
    g = torch.Generator().manual_seed(0)
    corners = random_corners(500, (3, 5), (8, 9), g)
    boxes = boxes_at(corners, (3, 5))
    assert boxes.min() >= 0 and (boxes[:, 1] <= 8).all() and (boxes[:, 3] <= 9).all()
    assert corners[:, 0].max() == 5 and corners[:, 1].max() == 4  # every place is reachable


def _hand_readout_model(attn: list[float]) -> nn.Module:
    """A stand-in model whose last forward left a hand-built read-out on a 2x2 grid, CLS first."""
    model = nn.Identity()
    model.tome_readout = Readout(torch.tensor([attn]), torch.arange(4)[None] + 1, torch.ones(1, 5), 1, (2, 2))
    return model


def test_attention_mass_hand_example():
    scores = torch.tensor([[0.05, 0.10, 0.15, 0.20]])  # CLS kept 0.5 for itself
    assert attention_mass(scores, torch.tensor([[1.0, 0, 1, 0]])).item() == pytest.approx(0.4)
    assert attention_mass(scores, torch.tensor([[0.5, 1, 0, 0]])).item() == pytest.approx(0.025 / 0.5 + 0.2)


def test_transmix_and_tokenmix_labels_are_attention_mass_of_kept_pixels():
    """2x2 grid of 2x2-pixel patches, CLS attention (0.2 | 0.1, 0.2, 0.3, 0.2) -> patch shares 1/8, 2/8, 3/8, 2/8."""
    model = _hand_readout_model([0.2, 0.1, 0.2, 0.3, 0.2])
    token_mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    token_mask[0, :2] = 1.0
    token_mask[0, 2:] = 0.0  # top row kept (TokenMix-style, whole patches)
    token_mask = token_mask.view(2, 1, 2, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
    token_mask[1, :, :, 3:] = 0.0  # right pixel column cut away: half of patches 1 and 3 (TransMix-style box)
    mixed = Mixed(token_mask, token_mask, torch.ones(2), torch.ones(2), torch.tensor([1, 0]), "cutmix")
    expected = torch.tensor([(1 + 2) / 8, 1 - 0.5 * (2 + 2) / 8])
    torch.testing.assert_close(attention_lam_hat(model, mixed), expected)
    transmix = create("transmix", NUM_CLASSES)
    torch.testing.assert_close(transmix.relabel(model, mixed), expected)
    # the authors' code averages area and attention: λ̂ = (λ_area + λ_attention) / 2
    mixed.lam_hat = torch.tensor([0.5, 0.75])  # the own pixels' share of each image above
    parity = create("transmix", NUM_CLASSES, area_weight=0.5)
    torch.testing.assert_close(parity.relabel(model, mixed), torch.tensor([(0.5 + 3 / 8) / 2, (0.75 + 0.75) / 2]))
    mixed.kind = "mixup"  # MixUp batches keep λ, as in the paper
    torch.testing.assert_close(transmix.relabel(model, mixed), mixed.lam_hat)
    torch.testing.assert_close(create("tokenmix", NUM_CLASSES).relabel(model, mixed), expected)


@pytest.mark.parametrize("lam", [0.0, 0.37, 1.0])
def test_fourier_masks_keep_exactly_floor_lam_pixels(lam):
    g = torch.Generator().manual_seed(0)
    noise = fourier_noise(3, (12, 10), 3.0, g)
    assert noise.shape == (3, 12, 10) and torch.isfinite(noise).all()
    mask = fourier_masks(noise, lam)
    assert mask.shape == (3, 1, 12, 10) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.flatten(1).sum(1) == math.floor(lam * 120)).all()


def test_fourier_noise_is_low_frequency():
    """The decay 1/f^3 makes neighbouring pixels far more alike than white noise's."""
    noise = fourier_noise(8, (32, 32), 3.0, torch.Generator().manual_seed(1))
    neighbour_corr = torch.corrcoef(torch.stack([noise[:, :, :-1].flatten(), noise[:, :, 1:].flatten()]))[0, 1]
    assert neighbour_corr > 0.9


def test_grid_masks_are_constant_per_cell():
    g = torch.Generator().manual_seed(0)
    mask = grid_masks(0.5, 3, 4, (9, 12), g)
    assert mask.shape == (4, 1, 9, 12)
    cells = mask.view(4, 3, 3, 3, 4)  # (B, row cell, row in cell, col cell, col in cell)
    assert (cells.amax(dim=(2, 4)) == cells.amin(dim=(2, 4))).all()
    assert grid_masks(1.0, 4, 2, (8, 8), g).min() == 1 and grid_masks(0.0, 4, 2, (8, 8), g).max() == 0


def test_grid_masks_put_cell_borders_where_the_docstring_says():
    """A 4 x 4 grid on 10 x 7 pixels: borders at ⌈i·10/4⌉ = 0, 3, 5, 8, 10 (rows 3, 2, 3, 2) and
    ⌈i·7/4⌉ = 0, 2, 4, 6, 7 (columns 2, 2, 2, 1), as grid_masks documents; each cell its own draw."""
    rows, cols = [0, 3, 5, 8, 10], [0, 2, 4, 6, 7]
    mask = grid_masks(0.5, 4, 8, (10, 7), torch.Generator().manual_seed(0))
    keep = torch.rand(8, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5  # the same draw, replayed
    expected = torch.empty(8, 1, 10, 7)
    for i in range(4):
        for j in range(4):
            expected[:, 0, rows[i]:rows[i + 1], cols[j]:cols[j + 1]] = keep[:, i, j, None, None].float()
    assert torch.equal(mask, expected)
    # every border is seen: some sample keeps one side of it and not the other
    assert all((keep[:, i - 1] != keep[:, i]).any() and (keep[:, :, i - 1] != keep[:, :, i]).any() for i in (1, 2, 3))


@pytest.mark.parametrize("lam", [0.3, 0.8])
def test_gridmix_keeps_each_cell_with_probability_lam(monkeypatch, lam):
    """400 samples x 25 cells at a fixed λ: the kept share is λ within 5 binomial standard errors."""
    import mergemix.mix.gridmix as gridmix_mod

    monkeypatch.setattr(gridmix_mod, "sample_lam", lambda alpha, generator: lam)
    obj = create("gridmix", NUM_CLASSES, generator=torch.Generator().manual_seed(0), grid_sizes=(5, 5))
    mixed = obj.mix(torch.zeros(400, 1, 10, 10))
    cells = mixed.mask[:, 0, ::2, ::2]  # one pixel of each 2 x 2 cell
    assert cells.shape == (400, 5, 5) and set(cells.unique().tolist()) <= {0.0, 1.0}
    se = math.sqrt(lam * (1 - lam) / cells.numel())
    assert abs(float(cells.mean()) - lam) < 5 * se
    torch.testing.assert_close(mixed.lam, torch.full((400,), lam))


@pytest.mark.parametrize("sigma_range", [(0.3, 0.3), (0.1, 0.6)])
def test_smoothmix_mask_is_one_minus_the_gaussian_blob(sigma_range):
    """Pixel by pixel, 1 − exp(−(((r + ½ − c_y)/H)² + ((q + ½ − c_x)/W)²) / (2σ²)) at pixel centres, with
    the centre c = (u₀·H, u₁·W) and σ = lo + u₂·(hi − lo) replayed from the generator's draws in order:
    the partners' derangement (a permutation and a shift), then u ~ U[0, 1)^(3 x B)."""
    from mergemix.mask import derangement

    B, H, W = 3, 6, 10
    obj = create("smoothmix", NUM_CLASSES, generator=torch.Generator().manual_seed(7), sigma_range=sigma_range)
    mixed = obj.mix(torch.randn(B, 3, H, W))
    replay = torch.Generator().manual_seed(7)
    assert torch.equal(mixed.partner, derangement(B, replay))  # the replay is in step with the method
    u = torch.rand(3, B, generator=replay).tolist()
    lo, hi = sigma_range
    expected = torch.empty(B, 1, H, W, dtype=torch.float64)
    for b in range(B):
        cy, cx, sigma = u[0][b] * H, u[1][b] * W, lo + u[2][b] * (hi - lo)
        for r in range(H):
            for q in range(W):
                d2 = ((r + 0.5 - cy) / H) ** 2 + ((q + 0.5 - cx) / W) ** 2
                expected[b, 0, r, q] = 1 - math.exp(-d2 / (2 * sigma**2))
    torch.testing.assert_close(mixed.mask.double(), expected, atol=1e-6, rtol=0)


def test_gaussian_blobs_are_soft_and_centred_per_sample():
    mask = gaussian_blob_masks(6, (16, 16), (0.25, 0.5), torch.Generator().manual_seed(0))
    assert mask.shape == (6, 1, 16, 16) and mask.min() >= 0 and mask.max() < 1
    assert len({int(m.argmin()) for m in mask}) > 1  # centres differ
    assert ((mask > 0.01) & (mask < 0.99)).any()  # soft edges, not a box


def two_spot_images() -> torch.Tensor:
    """Image 0: bright square at rows 30:36, cols 8:14; image 1: dark square at rows 5:9, cols 38:42.

    Both on a smooth textured background (a flat one has exact spectral zeros).
    """
    background = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    x = 0.3 * F.interpolate(background, size=(48, 48), mode="bilinear").repeat(1, 3, 1, 1)
    x[0, :, 30:36, 8:14] += 3.0
    x[1, :, 5:9, 38:42] -= 3.0
    return x


def test_spectral_residual_finds_the_odd_spot():
    x = two_spot_images()
    saliency = spectral_residual(x)
    assert saliency.shape == (2, 64, 64)
    cy, cx = saliency_peaks(saliency, (48, 48))
    assert 28 <= cy[0] < 38 and 6 <= cx[0] < 16
    assert 3 <= cy[1] < 11 and 36 <= cx[1] < 44


def test_spectral_residual_is_the_same_under_autocast():
    """The objective runs inside --amp's autocast: the saliency (and so the box) must not depend on it."""
    x = torch.rand(4, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed_precision = spectral_residual(x)
    assert mixed_precision.dtype == torch.float32
    torch.testing.assert_close(mixed_precision, spectral_residual(x), atol=0, rtol=0)


def test_saliencymix_box_covers_the_partners_spot(monkeypatch):
    """The pasted box is centred on the PARTNER's odd spot (not the own one) and holds the partner's pixels."""
    x = two_spot_images()
    spots = [(slice(30, 36), slice(8, 14)), (slice(5, 9), slice(38, 42))]
    monkeypatch.setattr(saliency_mod, "sample_lam", lambda alpha, generator=None: 0.75)  # 24x24 box
    mixed = create("saliencymix", NUM_CLASSES).paste(x, torch.tensor([1, 0]))
    for b, p in [(0, 1), (1, 0)]:
        assert mixed.mask[b, 0][spots[p]].eq(0).all()  # partner's spot lies inside the box ...
        assert torch.equal(mixed.x[b][:, spots[p][0], spots[p][1]], x[p][:, spots[p][0], spots[p][1]])
        assert mixed.mask[b, 0][spots[b]].eq(1).all()  # ... and the own spot (24+ px away) outside it
        rows, cols = (mixed.mask[b, 0] == 0).nonzero(as_tuple=True)
        cy, cx = (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2
        if 0 < rows.min() and rows.max() < 47:  # unclipped side: centred on the spot (+-1 px for the 3-px cell)
            assert spots[p][0].start - 1 <= cy <= spots[p][0].stop
        if 0 < cols.min() and cols.max() < 47:
            assert spots[p][1].start - 1 <= cx <= spots[p][1].stop


def test_saliency_peak_maps_cells_to_pixel_centres():
    sal = torch.zeros(1, 4, 4)
    sal[0, 3, 1] = 1
    cy, cx = saliency_peaks(sal, (8, 16))
    assert (cy.item(), cx.item()) == (7, 6)


def test_block_token_mask_never_overshoots_and_nearly_fills():
    g = torch.Generator().manual_seed(0)
    count = torch.randint(0, 197, (400,), generator=g)
    taken = block_token_mask(count, (14, 14), g)
    assert taken.shape == (400, 196)
    got = taken.sum(1)
    assert (got <= count).all()
    assert ((count - got) / 196).mean() < 0.05
    assert block_token_mask(torch.zeros(3, dtype=torch.long), (4, 4), g).sum() == 0


def test_block_token_mask_is_made_of_blocks():
    """A single round can only add one rectangle: its tokens form a filled box."""
    g = torch.Generator().manual_seed(3)
    taken = block_token_mask(torch.full((50,), 12), (8, 8), g, rounds=1).view(50, 8, 8)
    for m in taken:
        if m.sum() == 0:
            continue
        rows, cols = m.nonzero(as_tuple=True)
        assert m[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_extreme_windows_hand_map():
    scores = torch.zeros(1, 16)
    scores[0, [6, 7, 10, 11]] = 1.0  # hot 2x2 at (1, 2)
    scores[0, 0] = -1.0  # the coldest patch is the top-left one
    assert extreme_windows(scores, (4, 4), (2, 2), largest=True).tolist() == [[1, 2]]
    assert extreme_windows(scores, (4, 4), (2, 2), largest=False).tolist() == [[0, 0]]


def test_attention_swap_moves_partner_hot_window_onto_own_cold_window():
    B, grid = 2, (4, 4)
    x = torch.arange(B * 16 * 16, dtype=torch.float32).view(B, 1, 16, 16)  # every pixel unique
    scores = torch.rand(B, 16, generator=torch.Generator().manual_seed(0))
    partner = torch.tensor([1, 0])
    lam = 0.75  # window: floor(4 * sqrt(0.25)) = 2 patches = 8 pixels
    mixed = attention_swap(x, partner, scores, grid, (4, 4), lam)
    for b in range(B):
        src = extreme_windows(scores[partner[b]][None], grid, (2, 2), True)[0] * 4
        dst = extreme_windows(scores[b][None], grid, (2, 2), False)[0] * 4
        pasted = mixed.x[b, 0, dst[0]:dst[0] + 8, dst[1]:dst[1] + 8]
        assert torch.equal(pasted, x[partner[b], 0, src[0]:src[0] + 8, src[1]:src[1] + 8])
        assert mixed.mask[b, 0, dst[0]:dst[0] + 8, dst[1]:dst[1] + 8].sum() == 0
    torch.testing.assert_close(mixed.lam_hat, torch.full((B,), 0.75))
    nothing = attention_swap(x, partner, scores, grid, (4, 4), 1.0)  # zero-size window pastes nothing
    assert torch.equal(nothing.x, x) and nothing.lam_hat.eq(1).all()
    # images padded up to whole patches (dynamic_img_pad): 14 px are not 4 patches of 4 px
    with pytest.raises(ValueError, match="14x16 pixels are not a 4x4 grid of 4x4 patches"):
        attention_swap(x[..., :14, :], partner, scores, grid, (4, 4), lam)


def test_resizemix_takes_bfloat16_images():
    """The CPU's antialiased resize has no bfloat16 kernel: the resize runs in float32."""
    from mergemix.mix.resizemix import resizemix_batch

    x = torch.rand(4, 3, 16, 16)
    partner = torch.tensor([1, 2, 3, 0])
    half = resizemix_batch(x.bfloat16(), partner, 0.5, torch.Generator().manual_seed(0))
    full = resizemix_batch(x, partner, 0.5, torch.Generator().manual_seed(0))
    assert half.x.dtype == torch.bfloat16 and torch.allclose(half.x.float(), full.x, atol=1e-2)
    assert torch.equal(half.mask, full.mask) and torch.equal(half.lam_hat, full.lam_hat)


def test_resizemix_pastes_the_resized_partner():
    from mergemix.mix.resizemix import resizemix_batch

    x = torch.randn(3, 3, 20, 20)
    partner = torch.tensor([2, 0, 1])
    mixed = resizemix_batch(x, partner, 0.5, torch.Generator().manual_seed(0))
    small = F.interpolate(x[partner], size=(10, 10), mode="bilinear", align_corners=False, antialias=True)
    for b in range(3):
        ys, xs = (mixed.mask[b, 0] == 0).nonzero(as_tuple=True)
        assert len(ys) == 100
        torch.testing.assert_close(mixed.x[b, :, ys.min():ys.max() + 1, xs.min():xs.max() + 1], small[b])
    torch.testing.assert_close(mixed.lam_hat, torch.full((3,), 0.75))


def test_soft_cross_entropy_equals_torch_label_smoothed_ce():
    """torch's label_smoothing=s targets (1-s)·onehot + s/C are exactly timm's smoothed one-hot."""
    g = torch.Generator().manual_seed(0)
    logits, y = 3 * torch.randn(7, NUM_CLASSES, generator=g), torch.randint(0, NUM_CLASSES, (7,), generator=g)
    for s in (0.0, 0.1, 0.3):
        torch.testing.assert_close(soft_cross_entropy(logits, smooth_one_hot(y, NUM_CLASSES, s)),
                                   F.cross_entropy(logits, y, label_smoothing=s))
    loss = soft_cross_entropy(logits.bfloat16(), smooth_one_hot(y, NUM_CLASSES, 0.1))  # fp32 even for bf16 logits
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.bfloat16().float(), y, label_smoothing=0.1))


@pytest.mark.parametrize("lam", [0.0, 0.35, 0.8])
def test_soft_cross_entropy_equals_timm_on_mixed_targets(lam):
    """timm's mixup_target (partner = flip) and SoftTargetCrossEntropy give the same targets and loss."""
    g = torch.Generator().manual_seed(1)
    logits, y = 3 * torch.randn(6, NUM_CLASSES, generator=g), torch.tensor([0, 3, 3, 9, 1, 2])
    timm_targets = mixup_target(y, NUM_CLASSES, lam=lam, smoothing=0.1)
    torch.testing.assert_close(mixed_targets(y, flip_partner(6), lam, NUM_CLASSES, 0.1), timm_targets)
    torch.testing.assert_close(soft_cross_entropy(logits, timm_targets), SoftTargetCrossEntropy()(logits, timm_targets))


def lam_draws(alpha: float, n: int = 5000) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return np.array([sample_lam(alpha, g) for _ in range(n)])


@pytest.mark.parametrize("alpha", [0.2, 2.0])
def test_sample_lam_moments_are_beta_alpha_alpha(alpha):
    """Beta(α, α): mean 1/2, variance 1/(4(2α+1)), excess kurtosis −6/(2α+3); checked within 5 standard errors."""
    lam = lam_draws(alpha)
    n = len(lam)
    assert ((lam >= 0) & (lam <= 1)).all()
    var = 1 / (4 * (2 * alpha + 1))
    se_mean = math.sqrt(var / n)
    se_var = var * math.sqrt((2 - 6 / (2 * alpha + 3)) / n)  # sqrt((μ4 − σ⁴)/n), μ4 = σ⁴(3 − 6/(2α+3))
    assert abs(lam.mean() - 0.5) < 5 * se_mean
    assert abs(lam.var() - var) < 5 * se_var


@pytest.mark.parametrize("alpha", [0.2, 2.0])
def test_sample_lam_passes_ks_test_against_scipy_beta(alpha):
    """The whole distribution: Kolmogorov-Smirnov against scipy's Beta(α, α) (scipy optional, not a dependency)."""
    stats = pytest.importorskip("scipy.stats")
    assert stats.kstest(lam_draws(alpha), stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_each_methods_shape_option_reaches_its_masks(monkeypatch):
    """The options, not just the pure functions, shape the masks: ResizeMix's scope sets the pasted
    side (τ = 0.3 of 32 px: a 10 px window, label 1 − 100/1024), FMix's decay_power the smoothness of
    its mask (at λ = 0.5, white noise agrees with its neighbour half the time), GridMix's grid_sizes
    the cells (2 x 2: 16 px squares; 8 x 8: 4 px ones)."""
    import mergemix.mix.fmix as fmix_mod
    import mergemix.mix.gridmix as gridmix_mod

    x = torch.randn(6, 3, 32, 32)

    def mixed(name, seed=0, **options):
        return create(name, 10, generator=torch.Generator().manual_seed(seed), **options).mix(x)

    for seed in range(3):
        assert torch.allclose(mixed("resizemix", seed, scope=(0.3, 0.3)).lam_hat, torch.tensor(1 - 100 / 1024))
    monkeypatch.setattr(fmix_mod, "sample_lam", lambda alpha, generator: 0.5)

    def agreement(mask):  # share of vertically adjacent pixels that come from the same image
        return float((mask[..., 1:, :] == mask[..., :-1, :]).float().mean())

    assert agreement(mixed("fmix", decay_power=3.0).mask) > 0.9
    assert agreement(mixed("fmix", decay_power=0.01).mask) < 0.6
    monkeypatch.setattr(gridmix_mod, "sample_lam", lambda alpha, generator: 0.5)

    def constant_on(mask, side):  # whether every side x side square holds one image only
        return torch.equal(F.max_pool2d(mask, side), -F.max_pool2d(-mask, side))

    for cells, side in ((2, 16), (8, 4)):
        mask = mixed("gridmix", grid_sizes=(cells, cells)).mask
        assert constant_on(mask, side) and not constant_on(mask, 2 * side), cells


def test_resizemix_draws_lambda_one_minus_tau_squared_and_labels_by_the_rounded_box():
    """τ = 0.3 on 32x32: λ = 1 − 0.09 = 0.91, but the pasted box is round(9.6) = 10 px a side: λ̂ = 1 − 100/1024."""
    from mergemix.mix.resizemix import resizemix_batch

    x, partner = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 0])
    mixed = resizemix_batch(x, partner, 0.3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(mixed.lam, torch.full((3,), 0.91))
    torch.testing.assert_close(mixed.lam_hat, torch.full((3,), 1 - 100 / 1024))
    assert (mixed.mask == 0).flatten(1).sum(1).tolist() == [100, 100, 100]


def test_fmix_keeps_floor_lam_own_pixels_and_records_lam(monkeypatch):
    """λ = 0.3 on 12x10: each mask keeps ⌊0.3·120⌋ = 36 own pixels (the brightest noise), the partner the other 84."""
    monkeypatch.setattr(fmix_mod, "sample_lam", lambda alpha, generator=None: 0.3)
    x = torch.randn(4, 3, 12, 10)
    mixed = create("fmix", NUM_CLASSES, generator=torch.Generator().manual_seed(0)).paste(x, torch.tensor([1, 2, 3, 0]))
    assert mixed.mask.flatten(1).sum(1).tolist() == [36.0] * 4
    torch.testing.assert_close(mixed.lam, torch.full((4,), 0.3))
    torch.testing.assert_close(mixed.lam_hat, torch.full((4,), 0.3))


@pytest.mark.parametrize("name", ["mixup", "cutmix", "deit"])
def test_prob_is_the_share_of_batches_mixed(name):
    """prob = 0.3 (timm's mixup_prob): over 400 batches the mixed share is 0.3 within 5 binomial
    standard errors (a method that mixes always, or with probability 1 − prob, is far outside)."""
    obj = create(name, NUM_CLASSES, generator=torch.Generator().manual_seed(0), prob=0.3)
    x = torch.randn(2, 3, 8, 8)
    mixed = sum(obj.mix(x).kind != "none" for _ in range(400)) / 400
    assert abs(mixed - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 400)


@pytest.mark.parametrize("name, small, large", [
    ("mixup", {"alpha": 0.05}, {"alpha": 50.0}),
    ("cutmix", {"alpha": 0.05}, {"alpha": 50.0}),
    ("fmix", {"alpha": 0.05}, {"alpha": 50.0}),
    ("gridmix", {"alpha": 0.05}, {"alpha": 50.0}),
    ("deit", {"mixup_alpha": 0.05, "cutmix_alpha": 50.0, "switch_prob": 0.0},
     {"mixup_alpha": 50.0, "cutmix_alpha": 0.05, "switch_prob": 0.0}),
    ("deit", {"mixup_alpha": 50.0, "cutmix_alpha": 0.05, "switch_prob": 1.0},
     {"mixup_alpha": 0.05, "cutmix_alpha": 50.0, "switch_prob": 1.0}),
])
def test_each_alpha_option_shapes_the_lam_its_branch_draws(name, small, large):
    """λ ~ Beta(α, α) from the α of the branch that mixes: α = 50 keeps every λ within 0.5 ± 0.2 (each
    draw fails with p < 1e-4), α = 0.05 pushes most λ within 0.1 of 0 or 1 (about 9% fall between)."""
    x = torch.randn(2, 3, 8, 8)

    def lams(options):
        obj = create(name, NUM_CLASSES, generator=torch.Generator().manual_seed(0), **options)
        return torch.stack([obj.mix(x).lam[0] for _ in range(40)])

    assert ((lams(large) - 0.5).abs() < 0.2).all()
    assert ((lams(small) - 0.5).abs() < 0.4).float().mean() < 1 / 3


def test_cutmix_box_centres_reach_every_row_and_column():
    """Centres are uniform over all H x W pixels: on a 10 x 30 image, 1 x 3 boxes (λ = 0.99) drawn 3000
    times cover every pixel, the last row and the right-hand columns included."""
    from mergemix.mix.boxes import cutmix_boxes

    assert cut_size(0.99, (10, 30)) == (1, 3)
    boxes = cutmix_boxes(0.99, 3000, (10, 30), torch.Generator().manual_seed(0))
    covered = (box_mask(boxes, (10, 30)) == 0).any(dim=0)
    assert covered.all()


@pytest.mark.parametrize("size", [(9, 11), (8, 7)])
def test_fourier_masks_have_the_image_size_for_odd_sides(size):
    noise = fourier_noise(2, size, 3.0, torch.Generator().manual_seed(0))
    assert noise.shape == (2, *size)
    mask = fourier_masks(noise, 0.4)
    assert (mask.flatten(1).sum(1) == math.floor(0.4 * size[0] * size[1])).all()


def test_resizemix_keeps_the_aspect_of_non_square_images():
    """τ = 0.5 on 20 x 40 images: the partner is shrunk to 10 x 20 px, λ̂ = 1 − 200/800."""
    from mergemix.mix.resizemix import resizemix_batch

    x, partner = torch.randn(3, 3, 20, 40), torch.tensor([1, 2, 0])
    mixed = resizemix_batch(x, partner, 0.5, torch.Generator().manual_seed(0))
    small = F.interpolate(x[partner], size=(10, 20), mode="bilinear", align_corners=False, antialias=True)
    for b in range(3):
        ys, xs = (mixed.mask[b, 0] == 0).nonzero(as_tuple=True)
        assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (10, 20)
        torch.testing.assert_close(mixed.x[b, :, ys.min():ys.max() + 1, xs.min():xs.max() + 1], small[b])
    torch.testing.assert_close(mixed.lam_hat, torch.full((3,), 0.75))


def test_block_token_mask_reaches_every_token():
    """One-token blocks (count 1, min_block 1) at a uniform place: 3000 samples on a 4 x 5 grid take
    every token, the last row and column included."""
    taken = block_token_mask(torch.ones(3000, dtype=torch.long), (4, 5), torch.Generator().manual_seed(0), min_block=1)
    assert (taken.sum(1) == 1).all() and taken.amax(dim=0).eq(1).all()


def test_block_token_mask_proposes_blocks_of_at_least_min_block_tokens():
    """count = min_block = 16: each proposal has area 16 before its sides are rounded (h = round(√(16a)),
    w = round(√(16/a)), a ∈ [1/3, 3]), so an accepted block holds 12..16 tokens; never a small one."""
    taken = block_token_mask(torch.full((300,), 16), (8, 8), torch.Generator().manual_seed(0), min_block=16, rounds=1)
    sizes = taken.sum(1)
    assert (sizes > 0).sum() > 100 and ((sizes == 0) | (sizes >= 12)).all()


def test_deit_and_transmix_switch_to_cutmix_as_design_says():
    """DESIGN §2.7: DeiT switches 50/50, TransMix 0.8 to CutMix: 400 batches each within 5 standard errors."""
    x = torch.randn(2, 3, 8, 8)
    for name, p in (("deit", 0.5), ("transmix", 0.8)):
        obj = create(name, NUM_CLASSES, generator=torch.Generator().manual_seed(0))
        share = sum(obj.mix(x).kind == "cutmix" for _ in range(400)) / 400
        assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / 400), name


def test_spectral_residual_prefers_a_small_spot_to_a_large_bright_region():
    """Hou & Zhang's point: a large bright region is expected (its log spectrum is smooth), a small odd
    spot is not. The left half is 2.0 brighter, a 4 x 4 spot on the right only 1.5: the saliency peak is
    the spot, where the brightest pixels (the plain amplitude without the residual) lie in the left half."""
    background = torch.randn(1, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    x = 0.3 * F.interpolate(background, size=(48, 48), mode="bilinear").repeat(1, 3, 1, 1)
    x[..., :, :24] += 2.0
    x[..., 36:40, 36:40] += 1.5
    cy, cx = saliency_peaks(spectral_residual(x), (48, 48))
    assert 34 <= cy[0] < 42 and 34 <= cx[0] < 42


def test_attention_swap_takes_the_window_the_partner_attends_to_most():
    """Hand-built 4 x 4 maps where each image attends to a different place: image 0 most to the top-left
    2 x 2 window and least to the bottom-right one, image 1 most to the top-right and least to the
    bottom-left. Image 0 gets image 1's top-right window over its bottom-right one, and vice versa."""
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16)
    scores = torch.zeros(2, 16)
    scores[0, [0, 1, 4, 5]], scores[0, 15] = 1.0, -1.0
    scores[1, [2, 3, 6, 7]], scores[1, 12] = 1.0, -1.0
    mixed = attention_swap(x, torch.tensor([1, 0]), scores, (4, 4), (4, 4), 0.75)  # 2 x 2 patch windows
    expected = x.clone()
    expected[0, 0, 8:16, 8:16] = x[1, 0, 0:8, 8:16]
    expected[1, 0, 8:16, 0:8] = x[0, 0, 0:8, 0:8]
    assert torch.equal(mixed.x, expected)
