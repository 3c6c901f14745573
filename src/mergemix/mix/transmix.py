"""``transmix``: TransMix (Chen et al., CVPR 2022), labels from the ViT's own attention.

The batch is mixed as in the DeiT recipe (CutMix with probability ``switch_prob``, else MixUp).
For a CutMix batch the label weight of the own image is the share of the last block's CLS
attention (heads averaged) that falls on the own pixels, λ̂ = Σ a_l·m_l / Σ a_l, with m the mask
pooled to the patch grid by area; it is read from the same training forward as the logits, so it
costs no extra pass, and it is detached (a target, not a path for gradients). MixUp batches keep
λ, as in the paper. Normalising over the patch tokens leaves out CLS's attention to itself, so
the two label weights sum to 1.

``area_weight`` w blends in the box's area: λ̂ = w·area + (1 − w)·attention. The paper's equation is
w = 0 (the default); the authors' released code averages the two, w = 0.5, for parity with it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import register
from .attention import ReadsAttention, attention_lam_hat
from .base import check_probability
from .mixer import Mixed
from .mixup import SwitchMixer


@register
class TransMix(ReadsAttention, SwitchMixer):
    name = "transmix"
    description = "TransMix: DeiT-recipe batch, CutMix labels re-weighted by the CLS attention on each image"
    passes = "1 fwd + 1 bwd (attention read from the same forward)"

    def __init__(self, num_classes: int, smoothing: float = 0.1, generator: torch.Generator | None = None,
                 prob: float = 1.0, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.8,
                 readout_block: int = -1, area_weight: float = 0.0):
        super().__init__(num_classes, smoothing, generator, prob, mixup_alpha, cutmix_alpha, switch_prob)
        check_probability(area_weight=area_weight)
        self.readout_block, self.area_weight = readout_block, area_weight

    def relabel(self, model: nn.Module, mixed: Mixed) -> Tensor:
        if mixed.kind != "cutmix":
            return mixed.lam_hat
        return torch.lerp(attention_lam_hat(model, mixed), mixed.lam_hat, self.area_weight)
