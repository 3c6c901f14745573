"""``smmix``: the max-min attention region mixing of SMMix (Chen et al., ICCV 2023).

What is implemented, per step:
1. a no-grad pass of the training model on the clean batch that stops after the read-out block
   (the last block by default) gives each image's CLS attention over its patches (heads averaged);
2. λ ~ Beta(α, α), one per batch, sets a window of kh x kw patches, (kh, kw) = ⌊(gh, gw)·√(1−λ)⌋
   (CutMix's side lengths on the patch grid: a square on a square grid);
3. the partner's window with the largest attention sum is pasted, pixel for pixel, over the
   own image's window with the smallest attention sum (windows on the patch grid, so no patch is
   cut through; the two windows are generally at different places);
4. the label weight of the own class is the kept area, 1 − kh·kw/L.
Not implemented: the paper's fine-grained token-level labels and its feature-consistency loss
(both need extra heads or outputs beyond the class logits).

Also unlike the authors' code (ChenMnZ/SMMix, ``smmix.py`` and ``deit.py``): there a patch's score is
the mean attention it receives from the patches (last block, heads averaged), not the CLS row; the
window side is uniform over ⌊0.25·side⌋..⌊0.75·side⌋ patches (3..10 of 14), not from λ; the
attention pass runs in eval mode (here in the training model's mode, drop-path included); and it
alternates with MixUp (switch 0.5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..mask import fills_grid, recover
from ..tome import forward_readout
from . import register
from .attention import ReadsAttention
from .base import StepOutput, sample_lam
from .boxes import crop_windows, cut_size
from .mixer import Mixed, PairMixer, unmixed, window_batch


def extreme_windows(scores: Tensor, grid: tuple[int, int], window: tuple[int, int], largest: bool) -> Tensor:
    """Top-left corner (row, col), in patches, of the window with the largest (or smallest) score sum.

    scores: (B, L) per-patch scores on a (gh, gw) grid; window: (kh, kw) patches, 1 <= kh <= gh.
    returns: (B, 2) long; ties go to the first window in row-major order.
    """
    B = scores.shape[0]
    sums = F.avg_pool2d(scores.float().view(B, 1, *grid), window, stride=1).flatten(1)
    idx = sums.argmax(dim=1) if largest else sums.argmin(dim=1)
    cols = grid[1] - window[1] + 1
    return torch.stack([idx // cols, idx % cols], dim=1)


def attention_swap(x: Tensor, partner: Tensor, scores: Tensor, grid: tuple[int, int], patch: tuple[int, int],
                   lam: float) -> Mixed:
    """Paste the partner's most-attended kh x kw patch window over the own least-attended one.

    x: (B, C, H, W) with (H, W) = grid·patch; scores: (B, L) per-patch attention of x on the (gh, gw)
    grid of (ph, pw)-pixel patches. (kh, kw) = ⌊(gh, gw)·√(1−λ)⌋, floored as CutMix's box sides are,
    so on a coarse grid the window is often smaller than 1 − λ asks, or empty (a zero-size window
    pastes nothing); the label follows what was pasted: weight = kept area.
    """
    if not fills_grid(x.shape[-2:], grid, patch):
        raise ValueError(f"smmix swaps whole patches: images of {x.shape[-2]}x{x.shape[-1]} pixels are not a "
                         f"{grid[0]}x{grid[1]} grid of {patch[0]}x{patch[1]} patches (pad them to whole patches)")
    window = cut_size(lam, grid)
    search = (max(window[0], 1), max(window[1], 1))

    def to_pixels(corners: Tensor) -> Tensor:  # (B, 2) patch rows and columns -> pixels
        return torch.stack((corners[:, 0] * patch[0], corners[:, 1] * patch[1]), dim=1)

    src = to_pixels(extreme_windows(scores[partner], grid, search, largest=True))
    dst = to_pixels(extreme_windows(scores, grid, search, largest=False))
    box = (window[0] * patch[0], window[1] * patch[1])
    return window_batch(x, partner, crop_windows(x[partner], src, box), dst, lam, "smmix")


@register
class SMMix(ReadsAttention, PairMixer):
    name = "smmix"
    description = "SMMix: the partner's most-attended window replaces the own least-attended one, label by area"
    passes = "1 no-grad partial fwd + 1 fwd + 1 bwd"
    default_alpha = 1.0

    def __init__(self, num_classes: int, smoothing: float = 0.1, generator: torch.Generator | None = None,
                 prob: float = 1.0, alpha: float | None = None, readout_block: int = -1):
        super().__init__(num_classes, smoothing, generator, prob, alpha)
        self.readout_block = readout_block

    def mixed_step(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        partner, apply = self.pair(x)
        if not apply:
            return self.step(model, y, unmixed(x, partner))
        with torch.no_grad():
            readout = forward_readout(model, x)
        scores = recover(readout.attn, readout.index)
        lam = sample_lam(self.alpha, self.generator)
        out = self.step(model, y, attention_swap(x, partner, scores, readout.grid, readout.patch, lam))
        out.scores, out.extras["scores_of"] = scores, "original"  # what placed the windows
        return out
