"""Pure tensor functions for attention-guided masks: recovery, top-k, upsampling, pairing, mixing.

Shapes: B batch, K tokens at the read-out block (prefix tokens included), L original patch
tokens, (gh, gw) the patch grid with gh * gw = L, (H, W) pixels.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def recover(attn: Tensor, source: Tensor) -> Tensor:
    """Spread token scores back to the original patches: Â = Sᵀ·A.

    attn: (B, K) score of each token at the read-out block.
    source: (B, K, L) 0/1 source matrix, or the equivalent (B, L) long index map giving, for
        each original patch, the token (0..K-1) that holds it. The index form is one gather.
    returns: (B, L) per-patch scores.
    """
    if source.dtype in (torch.int32, torch.int64):
        return attn.gather(1, source.long())
    return torch.bmm(source.transpose(1, 2).to(attn.dtype), attn.unsqueeze(-1)).squeeze(-1)


# λ·L within this of an integer counts as that integer: 0.29 · 100 is 28.999999999999996 in floats
KEEP_TOLERANCE = 1e-4


def keep_count(lam: Tensor | float, num_patches: int, batch_size: int, device: torch.device | None = None) -> Tensor:
    """(B,) long: ⌊λ·L⌋ patches to keep (up to ``KEEP_TOLERANCE``), λ a number or (B,), clamped to
    [0, L]; on ``device``."""
    if not isinstance(lam, Tensor):  # counted here: a tensor made of a number is a blocking copy to a GPU
        count = math.floor(lam * num_patches + KEEP_TOLERANCE)
        return torch.full((batch_size,), min(max(count, 0), num_patches), device=device)
    lam = lam.to(device=device, dtype=torch.float64).expand(batch_size)
    return torch.floor(lam * num_patches + KEEP_TOLERANCE).long().clamp_(0, num_patches)


def topk_mask(scores: Tensor, lam: Tensor | float) -> Tensor:
    """Keep the ⌊λ·L⌋ highest-scoring patches of each row.

    scores: (B, L); lam: scalar or (B,) in [0, 1].
    returns: (B, L) float mask with exactly ⌊λ_b·L⌋ ones in row b (a λ_b·L less than ``KEEP_TOLERANCE``
    below an integer counts as that integer, so that a λ rounded in floats keeps its patch). Patches of
    one merged token tie; where the cut falls inside a token, the sort (not a stable one) picks which of
    its patches stay, so that choice may differ between devices.
    """
    B, L = scores.shape
    keep = keep_count(lam, L, B, scores.device)
    order = scores.argsort(dim=1, descending=True)
    ranks_kept = (torch.arange(L, device=scores.device)[None, :] < keep[:, None]).to(scores.dtype)
    return torch.zeros_like(scores).scatter_(1, order, ranks_kept)


def upsample_mask(mask: Tensor, grid: tuple[int, int], patch: tuple[int, int],
                  size: Sequence[int] | None = None) -> Tensor:
    """Patch mask to pixels by nearest repetition.

    mask: (B, L) with L = gh * gw; grid: (gh, gw); patch: (ph, pw); size: (H, W) of the images,
    when the grid covers more (a ViT with ``dynamic_img_pad`` pads them up to whole patches).
    returns: (B, 1, gh * ph, gw * pw), cropped to (B, 1, H, W) when ``size`` is given.
    """
    (gh, gw), (ph, pw) = grid, patch
    B = mask.shape[0]
    # each cell broadcast over its (ph, pw) block, then one copy: a single kernel where two
    # repeat_interleave calls launch several each (a GPU step's mask work is launch-bound)
    m = mask.reshape(B, 1, gh, 1, gw, 1).expand(B, 1, gh, ph, gw, pw).reshape(B, 1, gh * ph, gw * pw)
    return m if size is None else m[..., :size[0], :size[1]]


def attention_mask(attn: Tensor, source: Tensor, lam: Tensor | float, grid: tuple[int, int],
                   patch: tuple[int, int], size: Sequence[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MergeMix's mask from a read-out: recover the token scores to patches, keep the top ⌊λ·L⌋.

    attn: (B, K); source: (B, L) token of each patch; lam: scalar or (B,). Returns (patch scores
    (B, L), patch mask (B, L), pixel mask (B, 1, H, W) of ``size``, 1 where the sample keeps its own).
    """
    scores = recover(attn, source)
    patch_mask = topk_mask(scores, lam)
    return scores, patch_mask, upsample_mask(patch_mask, grid, patch, size)


def fills_grid(size: Sequence[int], grid: tuple[int, int], patch: tuple[int, int]) -> bool:
    """Whether images of ``size`` (H, W) are exactly the (gh, gw) grid of (ph, pw) patches; not so for
    images a model with ``dynamic_img_pad`` pads up to whole patches."""
    return tuple(size) == (grid[0] * patch[0], grid[1] * patch[1])


def patch_fraction(mask: Tensor, grid: tuple[int, int], patch: tuple[int, int] | None = None) -> Tensor:
    """Pixel mask (B, 1, H, W) -> (B, L) share of each patch's pixels that are 1 (area pooling).

    patch: (ph, pw), needed where the image does not fill the grid (a model with ``dynamic_img_pad``
    pads it at the bottom and right): the share is then of each patch's real pixels.
    """
    H, W = mask.shape[-2:]
    if patch is None or fills_grid((H, W), grid, patch):
        return torch.nn.functional.adaptive_avg_pool2d(mask.float(), grid).flatten(1)
    pad = (0, grid[1] * patch[1] - W, 0, grid[0] * patch[0] - H)
    real = torch.nn.functional.pad(mask.new_ones(1, 1, H, W, dtype=torch.float32), pad)
    kept = torch.nn.functional.pad(mask.float(), pad)
    return (torch.nn.functional.avg_pool2d(kept, patch) / torch.nn.functional.avg_pool2d(real, patch)).flatten(1)


def to_device(t: Tensor, device: torch.device | str | None) -> Tensor:
    """A small tensor drawn on the CPU, moved to ``device`` without making the CPU wait for the GPU.

    A blocking copy to a GPU synchronises the stream: the CPU would stop at every training step
    until the GPU had run all queued work, and could no longer launch ahead. A non-blocking one from
    ordinary host memory is staged by the driver before the call returns, so ``t`` may be freed at
    once. None: ``t`` itself.
    """
    return t.to(device, non_blocking=True)


def derangement(batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """A random partner for every sample, never itself.

    A random permutation followed by a random non-zero cyclic shift along it, so every sample
    gets a different partner and no sample is its own. Needs batch_size >= 2.
    returns: (B,) long, partner[i] != i.
    """
    if batch_size < 2:
        raise ValueError(f"mixing needs a batch of at least 2 samples to pair them, got {batch_size} "
                         f"(a DataLoader's last batch: drop_last=True)")
    perm = torch.randperm(batch_size, generator=generator)
    shift = int(torch.randint(1, batch_size, (1,), generator=generator))
    partner = torch.empty_like(perm)
    partner[perm] = perm.roll(-shift)
    return to_device(partner, device)


def mix_images(x: Tensor, partner: Tensor, mask: Tensor) -> Tensor:
    """x̂ = M ⊙ x + (1 − M) ⊙ x[partner].

    x: (B, C, H, W); partner: (B,) long; mask: (B, 1, H, W), 1 keeps the sample's own pixel.
    A 0/1 mask selects pixels exactly; a soft mask blends them.
    """
    mask = mask.to(x.dtype)
    return torch.lerp(x[partner], x, mask)


def lam_hat_area(mask: Tensor) -> Tensor:
    """Label weight of the kept sample = kept fraction of its patches (B, L) or pixels (B, 1, H, W). -> (B,)."""
    return mask.flatten(1).float().mean(dim=1)


def lam_hat_gaussian(keep: Tensor, num_tokens: int, num_patches: int,
                     generator: torch.Generator | None = None) -> Tensor:
    """The method's Step 3 as the reference code computes it.

    Per sample z_b ~ N(μ, σ_b) with μ = K/L (K patch tokens left at the read-out block) and
    σ_b = p_b/L (p_b = keep[b] patches kept), then min-max normalised across the batch to [0, 1].
    Note: min-max normalisation cancels μ and the common scale of σ, so the result is
    batch-normalised noise with mean about 0.5, independent of how much of the image was kept.
    Where the batch's draws do not differ (a batch of one, or nothing kept anywhere: every σ_b = 0)
    min-max is undefined, and the kept fraction p_b/L stands in.
    keep: (B,) long, on the CPU (the noise is drawn there); returns (B,) on the CPU.
    """
    mu = num_tokens / num_patches
    sigma = keep.double() / num_patches
    z = mu + sigma * torch.randn(keep.shape[0], generator=generator, dtype=torch.float64)
    spread = z.max() - z.min()
    lam_hat = (z - z.min()) / spread if spread > 0 else sigma
    return lam_hat.float()
