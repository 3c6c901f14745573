"""``saliencymix``: SaliencyMix (Uddin et al., ICLR 2021).

The box of CutMix (side lengths from λ ~ Beta(α, α), one λ per batch) is centred on the most
salient pixel of the partner image, and the partner's pixels in that box replace the same box of
the own image; label weight = kept area. Saliency is the spectral residual of Hou & Zhang (CVPR
2007), as this project's design chose; the authors' code uses OpenCV's fine-grained static saliency
instead. Computed after OpenCV's ``StaticSaliencySpectralResidual``: grey image (channel mean) resized
to 64 x 64; residual R = log|F| − 3x3 mean of log|F|; saliency = |F⁻¹(exp(R + i·phase))|² smoothed
by a 5x5 Gaussian with σ = 8 (OpenCV smooths before squaring). All batched on the device.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from . import register
from .base import sample_lam
from .boxes import box_mask, centred_boxes, cut_size
from .mixer import ImageMixer, Mixed, masked_batch

SALIENCY_SIZE = 64
BLUR_SIZE, BLUR_SIGMA = 5, 8.0


def _smooth(img: Tensor, kernel: Tensor) -> Tensor:
    """(B, 1, h, w) -> same, separable filtering with a 1-D kernel (odd length), reflected borders."""
    pad = kernel.numel() // 2
    img = F.pad(img, (pad, pad, pad, pad), mode="reflect")
    img = F.conv2d(img, kernel.view(1, 1, 1, -1))
    return F.conv2d(img, kernel.view(1, 1, -1, 1))


def spectral_residual(x: Tensor) -> Tensor:
    """(B, C, H, W) images -> (B, 64, 64) spectral-residual saliency of their grey versions, in float32
    under --amp too (autocast would run its convolutions in bfloat16 and move the peak by a pixel)."""
    device = x.device.type  # (a device without autocast, such as meta, has nothing to switch off)
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
        grey = x.float().mean(dim=1, keepdim=True)
        grey = F.interpolate(grey, size=(SALIENCY_SIZE, SALIENCY_SIZE), mode="bilinear", align_corners=False)
        spectrum = torch.fft.fft2(grey)
        log_amp = spectrum.abs().clamp_min(1e-8).log()
        box = torch.full((3,), 1.0 / 3, device=x.device)
        residual = log_amp - _smooth(log_amp, box)
        saliency = torch.fft.ifft2(torch.polar(residual.exp(), spectrum.angle())).abs() ** 2
        t = torch.arange(BLUR_SIZE, device=x.device, dtype=torch.float32) - BLUR_SIZE // 2
        gauss = torch.exp(-t**2 / (2 * BLUR_SIGMA**2))
        return _smooth(saliency, gauss / gauss.sum())[:, 0]


def saliency_peaks(saliency: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(B, h, w) saliency -> pixel coordinates (cy, cx), (B,) long each, of its peak in an H x W image."""
    B, h, w = saliency.shape
    idx = saliency.reshape(B, -1).argmax(dim=1)
    iy, ix = idx // w, idx % w
    return (iy * 2 + 1) * size[0] // (2 * h), (ix * 2 + 1) * size[1] // (2 * w)


@register
class SaliencyMix(ImageMixer):
    name = "saliencymix"
    description = "SaliencyMix: CutMix box centred on the partner's spectral-residual saliency peak"
    default_alpha = 0.2

    def paste(self, x: Tensor, partner: Tensor) -> Mixed:
        lam = sample_lam(self.alpha, self.generator)
        size = tuple(x.shape[-2:])
        cy, cx = saliency_peaks(spectral_residual(x[partner]), size)
        mask = box_mask(centred_boxes(cy, cx, cut_size(lam, size), size), size)
        return masked_batch(x, partner, mask, lam, "saliencymix")
