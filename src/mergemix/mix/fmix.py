"""``fmix``: FMix (Harris et al., 2020, "FMix: Enhancing Mixed Sample Data Augmentation").

A mask is cut from low-frequency noise: a complex Gaussian spectrum scaled by 1/f^δ (f the
frequency magnitude, floored at 1/max(H, W); decay power δ = 3 in the paper), inverse-FFT'd to a
grey image; the ⌊λ·H·W⌋ brightest pixels are the own image, the rest the partner's.
λ ~ Beta(α, α), one per batch; each sample gets its own mask. Label weight = kept area.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..mask import topk_mask
from . import register
from .base import check_positive, sample_lam
from .mixer import ImageMixer, Mixed, device_generator, masked_batch


def fourier_noise(batch_size: int, size: tuple[int, int], decay_power: float,
                  generator: torch.Generator | None = None, device: torch.device | None = None) -> Tensor:
    """(B, H, W) low-frequency noise: random spectrum · 1/max(f, 1/max(H, W))^δ, inverse real FFT."""
    H, W = size
    freq = torch.sqrt(torch.fft.fftfreq(H, device=device)[:, None] ** 2 + torch.fft.rfftfreq(W, device=device)[None, :] ** 2)
    scale = freq.clamp_min(1.0 / max(H, W)) ** -decay_power
    gen = device_generator(generator, torch.device(device or "cpu"))
    parts = torch.randn(2, batch_size, *freq.shape, generator=gen, device=device)
    return torch.fft.irfft2(torch.complex(parts[0], parts[1]) * scale, s=size)


def fourier_masks(noise: Tensor, lam: float) -> Tensor:
    """(B, H, W) noise -> (B, 1, H, W) binary mask with the ⌊λ·H·W⌋ highest pixels of each sample set to 1."""
    B, H, W = noise.shape
    return topk_mask(noise.reshape(B, H * W), lam).view(B, 1, H, W)


@register
class FMix(ImageMixer):
    name = "fmix"
    description = "FMix: binary mask from thresholded low-frequency Fourier noise, label by kept area"
    default_alpha = 1.0

    def __init__(self, num_classes: int, smoothing: float = 0.1, generator: torch.Generator | None = None,
                 prob: float = 1.0, alpha: float | None = None, decay_power: float = 3.0):
        super().__init__(num_classes, smoothing, generator, prob, alpha)
        check_positive(decay_power=decay_power)
        self.decay_power = decay_power

    def paste(self, x: Tensor, partner: Tensor) -> Mixed:
        lam = sample_lam(self.alpha, self.generator)
        noise = fourier_noise(x.shape[0], tuple(x.shape[-2:]), self.decay_power, self.generator, x.device)
        return masked_batch(x, partner, fourier_masks(noise, lam), lam, "fmix")
