"""``resizemix``: ResizeMix (Qin et al., 2020, "ResizeMix: Mixing Data with Preserved Object Information
and True Labels").

The whole partner image is shrunk by a scale τ ∈ [scope] and pasted at a random place where it
fits whole; the label weight of the own class is the area left uncovered (≈ 1 − τ²). The paper
draws τ ~ U(scope), scope (0.1, 0.8); here τ = lo + (hi − lo)·u with u ~ Beta(α, α), so the
default α = 1 is the paper's uniform draw. One τ per batch (so the shrinking is one batched
resize, antialiased); the place is drawn per sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import register
from .base import sample_lam
from .boxes import random_corners
from .mixer import ImageMixer, Mixed, check_interval, window_batch


def resizemix_batch(x: Tensor, partner: Tensor, tau: float, generator: torch.Generator | None) -> Mixed:
    """Paste x[partner] resized to round(τ·H) x round(τ·W) pixels (at least 1) into x at a random place per sample.

    x: (B, C, H, W); partner: (B,); tau: the scale, in (0, 1]. Returns a ``Mixed`` of (B, C, H, W) images,
    a (B, 1, H, W) mask, (B,) λ = 1 − τ² and (B,) λ̂ = the kept area.
    """
    B, size = x.shape[0], tuple(x.shape[-2:])
    box = (max(round(tau * size[0]), 1), max(round(tau * size[1]), 1))
    # in float32: the CPU's antialiased resize has no bfloat16 kernel
    small = F.interpolate(x[partner].float(), size=box, mode="bilinear", align_corners=False,
                          antialias=True).to(x.dtype)
    corners = random_corners(B, box, size, generator, x.device)
    return window_batch(x, partner, small, corners, 1.0 - tau * tau, "resizemix")


@register
class ResizeMix(ImageMixer):
    name = "resizemix"
    description = "ResizeMix: paste the whole partner shrunk by τ ∈ scope at a random place, label by kept area"
    default_alpha = 1.0

    def __init__(self, num_classes: int, smoothing: float = 0.1, generator: torch.Generator | None = None,
                 prob: float = 1.0, alpha: float | None = None, scope: tuple[float, float] = (0.1, 0.8)):
        super().__init__(num_classes, smoothing, generator, prob, alpha)
        self.scope = check_interval("scope", scope, 0.0, 1.0)

    def paste(self, x: Tensor, partner: Tensor) -> Mixed:
        lo, hi = self.scope
        return resizemix_batch(x, partner, lo + (hi - lo) * sample_lam(self.alpha, self.generator), self.generator)
