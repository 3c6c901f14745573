"""``none``: no mixing, label-smoothed cross-entropy on the clean batch."""
from __future__ import annotations

from torch import Tensor, nn

from . import register
from .base import Objective, StepOutput


@register
class NoMix(Objective):
    name = "none"
    description = "no mixing: label-smoothed cross-entropy on the clean images"
    pairs_images = False

    def mixed_step(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        return self.clean_step(model, x, y)
