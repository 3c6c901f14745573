"""``smoothmix``: SmoothMix (Lee et al., CVPR Workshops 2020), a soft-edged CutMix.

The partner enters through a Gaussian blob G(p) = exp(−‖(p − c)/(H, W)‖² / (2σ²)) with the centre c
uniform over the image and the spread σ ~ U(``sigma_range``) in units of the image size, both per
sample; x̂ = (1 − G)·x_i + G·x_j and the label weight of the own class is the mean of 1 − G. The
blob's spread is the method's only random ratio: it draws no Beta(α, α), so it takes no alpha
(the α = 0.2 of OpenMixup's config has no effect on this formulation).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..mask import to_device
from . import register
from .mixer import ImageMixer, Mixed, check_interval, masked_batch


def gaussian_blob_masks(batch_size: int, size: tuple[int, int], sigma_range: tuple[float, float],
                        generator: torch.Generator | None = None, device: torch.device | None = None) -> Tensor:
    """(B, 1, H, W) own-image share 1 − G, G a Gaussian blob with a random centre and spread per sample."""
    H, W = size
    u = to_device(torch.rand(3, batch_size, generator=generator), device)
    cy, cx = u[0] * H, u[1] * W
    sigma = sigma_range[0] + u[2] * (sigma_range[1] - sigma_range[0])
    ys = (torch.arange(H, device=device) + 0.5 - cy[:, None]) / H  # (B, H)
    xs = (torch.arange(W, device=device) + 0.5 - cx[:, None]) / W  # (B, W)
    dist2 = ys[:, :, None] ** 2 + xs[:, None, :] ** 2
    return 1.0 - torch.exp(-dist2 / (2 * sigma[:, None, None] ** 2))[:, None]


@register
class SmoothMix(ImageMixer):
    name = "smoothmix"
    description = "SmoothMix: the partner enters through a soft Gaussian blob, label by kept (soft) area"

    def __init__(self, num_classes: int, smoothing: float = 0.1, generator: torch.Generator | None = None,
                 prob: float = 1.0, sigma_range: tuple[float, float] = (0.25, 0.5)):
        super().__init__(num_classes, smoothing, generator, prob)
        self.sigma_range = check_interval("sigma_range", sigma_range, 0.0)

    def paste(self, x: Tensor, partner: Tensor) -> Mixed:
        mask = gaussian_blob_masks(x.shape[0], tuple(x.shape[-2:]), self.sigma_range, self.generator, x.device)
        return masked_batch(x, partner, mask, None, "smoothmix")
