"""``mixup``, ``cutmix`` and ``deit`` (MixUp or CutMix, switched per batch: timm's DeiT recipe).

MixUp (Zhang et al., ICLR 2018): x̂ = λ·x_i + (1 − λ)·x_j, label weight λ, λ ~ Beta(α, α).
CutMix (Yun et al., ICCV 2019): λ ~ Beta(α, α); a box of H·√(1−λ) x W·√(1−λ) pixels centred
uniformly on the image (clipped at the border) is filled from x_j; label weight = kept area.
One λ per batch, as both papers and timm's default ``mode='batch'`` do; the box centre is drawn
per sample.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..mask import mix_images
from . import register
from .base import check_non_negative, check_probability, sample_lam
from .boxes import box_mask, cutmix_boxes
from .mixer import ImageMixer, Mixed, PairMixer, masked_batch


def mixup_batch(x: Tensor, partner: Tensor, lam: float) -> Mixed:
    """MixUp of x (B, C, H, W) with x[partner]: a constant mask λ, label weight λ."""
    B = x.shape[0]
    lam_t = torch.full((B,), lam, device=x.device)
    mask = lam_t.view(B, 1, 1, 1).expand(B, 1, *x.shape[-2:])
    return Mixed(mix_images(x, partner, mask), mask, lam_t, lam_t, partner, "mixup")


def cutmix_batch(x: Tensor, partner: Tensor, lam: float, generator: torch.Generator | None) -> Mixed:
    """CutMix of x (B, C, H, W) with x[partner]: one random box per sample, label weight = kept area."""
    size = tuple(x.shape[-2:])
    boxes = cutmix_boxes(lam, x.shape[0], size, generator, x.device)
    return masked_batch(x, partner, box_mask(boxes, size), lam, "cutmix")


def mixup_or_cutmix(x: Tensor, partner: Tensor, mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
                    generator: torch.Generator | None) -> Mixed:
    """timm's switch: CutMix(cutmix_alpha) with probability switch_prob, else MixUp(mixup_alpha).

    An alpha of 0 switches that branch off (as timm's ``--mixup 0`` / ``--cutmix 0``).
    x: (B, C, H, W); partner: (B,). Returns a ``Mixed`` of (B, C, H, W) images, a (B, 1, H, W) mask and
    (B,) λ and λ̂ (kind "mixup" or "cutmix").
    """
    use_cutmix = mixup_alpha <= 0 or (cutmix_alpha > 0 and float(torch.rand(1, generator=generator)) < switch_prob)
    if use_cutmix:
        return cutmix_batch(x, partner, sample_lam(cutmix_alpha, generator), generator)
    return mixup_batch(x, partner, sample_lam(mixup_alpha, generator))


@register
class MixUp(ImageMixer):
    name = "mixup"
    description = "MixUp: blend two images, x̂ = λ·x_i + (1−λ)·x_j, label weight λ ~ Beta(α, α)"
    default_alpha = 0.8

    def paste(self, x: Tensor, partner: Tensor) -> Mixed:
        return mixup_batch(x, partner, sample_lam(self.alpha, self.generator))


@register
class CutMix(ImageMixer):
    name = "cutmix"
    description = "CutMix: paste a random box of the partner (area 1−λ, λ ~ Beta(α, α)), label by kept area"
    default_alpha = 2.0

    def paste(self, x: Tensor, partner: Tensor) -> Mixed:
        return cutmix_batch(x, partner, sample_lam(self.alpha, self.generator), self.generator)


class SwitchMixer(PairMixer):
    """MixUp or CutMix switched per batch (timm's ``switch_prob``); the base of ``deit`` and ``transmix``."""

    def __init__(self, num_classes: int, smoothing: float = 0.1, generator: torch.Generator | None = None,
                 prob: float = 1.0, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5):
        super().__init__(num_classes, smoothing, generator, prob)
        check_non_negative(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)
        if max(mixup_alpha, cutmix_alpha) <= 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 and one of them > 0, "
                             f"got {mixup_alpha} and {cutmix_alpha}")
        check_probability(switch_prob=switch_prob)
        self.mixup_alpha, self.cutmix_alpha, self.switch_prob = mixup_alpha, cutmix_alpha, switch_prob

    def paste(self, x: Tensor, partner: Tensor) -> Mixed:
        return mixup_or_cutmix(x, partner, self.mixup_alpha, self.cutmix_alpha, self.switch_prob, self.generator)


@register
class DeiTMix(SwitchMixer, ImageMixer):
    name = "deit"
    description = "DeiT recipe (timm): MixUp(α=0.8) or CutMix(α=1.0), switched 50/50 per batch"
