"""Shared step of the pairwise mixing baselines: pair, mix, forward, label, loss.

Every baseline mixes image i with a partner j (a derangement of the batch, never itself) and
trains on soft targets λ̂·y_i + (1 − λ̂)·y_j, label-smoothed as timm does. A method only says how to
mix (``paste``) and, if it reads the model, how to relabel after the forward (``relabel``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..mask import derangement, lam_hat_area, mix_images
from .base import (Objective, StepOutput, check_batch, check_positive, check_probability, derive_seed,
                   mixed_targets, smooth_one_hot, soft_cross_entropy)
from .boxes import box_mask, boxes_at, paste_windows

__all__ = ["ImageMixer", "Mixed", "PairMixer", "TimmMixupFn", "check_interval", "device_generator", "masked_batch",
           "unmixed", "window_batch"]


@dataclass
class Mixed:
    """One mixed batch.

    x: (B, C, H, W) mixed images.
    mask: (B, 1, H, W) share of each pixel that is the sample's own (1 own, 0 partner, blends between).
    lam: (B,) the mixing ratio the method drew (share of the sample meant to be kept).
    lam_hat: (B,) label weight of the sample's own class before any relabelling (usually the kept area).
    partner: (B,) long index of each sample's partner.
    kind: which mixing produced the batch (e.g. "mixup", "cutmix"; "none" when mixing was skipped).
    """

    x: Tensor
    mask: Tensor
    lam: Tensor
    lam_hat: Tensor
    partner: Tensor
    kind: str


def masked_batch(x: Tensor, partner: Tensor, mask: Tensor, lam: float | None, kind: str) -> Mixed:
    """Mix x with x[partner] through a (B, 1, H, W) pixel mask; label by the kept area (CutMix's labelling).

    lam: the ratio the method drew, or None for methods that draw none (then it is the kept area).
    """
    area = lam_hat_area(mask)
    lam_t = area if lam is None else torch.full_like(area, lam)
    return Mixed(mix_images(x, partner, mask), mask, lam_t, area, partner, kind)


def window_batch(x: Tensor, partner: Tensor, patches: Tensor, corners: Tensor, lam: float, kind: str) -> Mixed:
    """Write patches (B, C, h, w) taken from the partners into x at corners (B, 2); label by the kept area."""
    mask = box_mask(boxes_at(corners, tuple(patches.shape[-2:])), tuple(x.shape[-2:]))
    area = lam_hat_area(mask)
    return Mixed(paste_windows(x, patches, corners), mask, torch.full_like(area, lam), area, partner, kind)


def unmixed(x: Tensor, partner: Tensor) -> Mixed:
    """The batch left as it is: mask 1, λ = λ̂ = 1 (targets are the smoothed one-hot labels).

    x: (B, C, H, W); partner: (B,). Returns x itself, a (B, 1, H, W) mask of ones and (B,) ones as λ and λ̂.
    """
    ones = torch.ones(x.shape[0], device=x.device)
    return Mixed(x, torch.ones_like(x[:, :1]), ones, ones, partner, "none")


def check_interval(name: str, value: tuple[float, float], low: float, high: float = math.inf,
                   cast: type = float) -> tuple[float, float]:
    """(lo, hi) cast to ``cast`` after checking low < lo <= hi <= high; ValueError naming the option otherwise."""
    lo, hi = (cast(v) for v in value)
    if not low < lo <= hi <= high:
        raise ValueError(f"{name} must be (lo, hi) with {low} < lo <= hi <= {high}, got {tuple(value)}")
    return lo, hi


def device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` seeded from ``generator``, for bulk draws that should not run on the CPU.

    None when ``generator`` is None (then the device's global RNG is used).
    """
    if generator is None:
        return None
    return torch.Generator(device=device).manual_seed(derive_seed(generator))


class PairMixer(Objective):
    """Base of every method that mixes each image with a partner from the same batch.

    Subclasses implement ``paste(x, partner) -> Mixed``; model-aware ones override ``relabel``.
    prob: probability that a batch is mixed at all (timm's ``prob``); an unmixed batch keeps its
    one-hot (smoothed) labels.
    alpha: the Beta(α, α) parameter of methods that draw λ; None takes the class's ``default_alpha``
    (None for methods that draw no λ: their constructors take no alpha).
    """

    default_alpha: ClassVar[float | None] = None

    def __init__(self, num_classes: int, smoothing: float = 0.1, generator: torch.Generator | None = None,
                 prob: float = 1.0, alpha: float | None = None):
        super().__init__(num_classes, smoothing, generator)
        check_probability(prob=prob)
        self.prob = prob
        self.alpha = self.default_alpha if alpha is None else alpha
        if self.alpha is not None:
            check_positive(alpha=self.alpha)

    def paste(self, x: Tensor, partner: Tensor) -> Mixed:  # pragma: no cover - abstract
        """Mix x (B, C, H, W) with x[partner] (methods whose mask needs a forward override ``mixed_step``)."""
        raise NotImplementedError

    def pair(self, x: Tensor) -> tuple[Tensor, bool]:
        """(B,) partners (B >= 2, else ValueError) and whether to mix this batch (probability ``prob``)."""
        if self.prob <= 0.0:  # never mixes: no partner needed, so any batch size will do
            return torch.arange(x.shape[0], device=x.device), False
        partner = derangement(x.shape[0], self.generator, x.device)
        return partner, self.prob >= 1.0 or float(torch.rand(1, generator=self.generator)) < self.prob

    def mix(self, x: Tensor) -> Mixed:
        """Pair and paste, or leave the batch as it is (kind "none") when this batch is not mixed.

        x: (B, C, H, W), B >= 2. Returns a ``Mixed`` of (B, C, H, W) images, a (B, 1, H, W) mask and (B,) λ,
        λ̂ and partners.
        """
        partner, apply = self.pair(x)
        return self.paste(x, partner) if apply else unmixed(x, partner)

    def relabel(self, model: nn.Module, mixed: Mixed) -> Tensor:
        """(B,) label weight of the own class, read after the forward of ``mixed.x``; default: unchanged."""
        return mixed.lam_hat

    def step(self, model: nn.Module, y: Tensor, mixed: Mixed) -> StepOutput:
        """Forward the mixed batch, label it, and return the loss against the soft targets.

        y: (B,) class indices; mixed: the batch ``mix`` made. Returns the loss, the (B, num_classes) logits and
        the mixed batch's (B, C, H, W) images, (B, 1, H, W) mask and (B,) λ, λ̂ and partners.
        """
        logits = model(mixed.x)
        lam_hat = mixed.lam_hat if mixed.kind == "none" else self.relabel(model, mixed)
        targets = mixed_targets(y, mixed.partner, lam_hat, self.num_classes, self.smoothing)
        return StepOutput(soft_cross_entropy(logits, targets), logits, x_mixed=mixed.x, mask=mixed.mask,
                          lam=mixed.lam, lam_hat=lam_hat, partner=mixed.partner, extras={"kind": mixed.kind})

    def mixed_step(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        return self.step(model, y, self.mix(x))


class TimmMixupFn:
    """A plain mixer as timm's ``mixup_fn``: ``x, soft_targets = fn(x, y)``, and ``fn.mixup_enabled``
    reads and switches the mixer's own flag (timm's ``train.py`` sets it False at ``--mixup-off-epoch``)."""

    def __init__(self, mixer: ImageMixer):
        self._mixer = mixer

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._mixer.mix_with_targets(x, y)

    @property
    def mixup_enabled(self) -> bool:
        return self._mixer.mixup_enabled

    @mixup_enabled.setter
    def mixup_enabled(self, enabled: bool) -> None:
        self._mixer.mixup_enabled = enabled


class ImageMixer(PairMixer):
    """A method that needs no model; ``mixer`` offers it in the place of timm's ``Mixup`` (``mixup_fn``)."""

    @property
    def mixer(self) -> TimmMixupFn:
        """This mixer behind timm's ``Mixup`` contract: ``x, soft_targets = obj.mixer(x, y)``."""
        return TimmMixupFn(self)

    def mix_with_targets(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) images, (B,) labels -> mixed images, (B, num_classes) soft targets (rows sum to 1,
        label smoothing folded in). Unmixed when ``mixup_enabled`` is False."""
        y = check_batch(x, y, self.num_classes)
        if not self.mixup_enabled:
            return x, smooth_one_hot(y, self.num_classes, self.smoothing)
        mixed = self.mix(x)
        return mixed.x, mixed_targets(y, mixed.partner, mixed.lam_hat, self.num_classes, self.smoothing)
