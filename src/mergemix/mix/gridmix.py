"""``gridmix``: GridMix (Baek, Bang, Shim, Pattern Recognition 2021), the image-level mixing.

The image is cut into an n x n grid (n drawn per batch from ``grid_sizes``, inclusive); each cell
is the own image with probability λ, else the partner's, independently per cell and sample
(λ ~ Beta(α, α), one per batch). Label weight = kept area. The paper's auxiliary local-context
head (a per-cell classification loss) needs an extra model head and is not implemented.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..mask import to_device
from . import register
from .base import sample_lam
from .mixer import ImageMixer, Mixed, check_interval, masked_batch


def grid_masks(lam: float, cells: int, batch_size: int, size: tuple[int, int],
               generator: torch.Generator | None = None, device: torch.device | None = None) -> Tensor:
    """(B, 1, H, W) 0/1 mask of a cells x cells grid, each cell 1 (own) with probability lam.

    Row r lies in cell ⌊r·cells/H⌋, so cell borders fall at ⌈i·H/cells⌉ and cells differ by at most
    one pixel when cells ∤ H.
    """
    H, W = size
    keep = to_device((torch.rand(batch_size, cells, cells, generator=generator) < lam).float(), device)
    rows = torch.arange(H, device=device) * cells // H
    cols = torch.arange(W, device=device) * cells // W
    return keep[:, rows][:, :, cols][:, None]


@register
class GridMix(ImageMixer):
    name = "gridmix"
    description = "GridMix: n x n grid, each cell kept with probability λ else the partner's, label by kept area"
    default_alpha = 1.0

    def __init__(self, num_classes: int, smoothing: float = 0.1, generator: torch.Generator | None = None,
                 prob: float = 1.0, alpha: float | None = None, grid_sizes: tuple[int, int] = (2, 6)):
        super().__init__(num_classes, smoothing, generator, prob, alpha)
        self.grid_sizes = check_interval("grid_sizes", grid_sizes, 0, cast=int)

    def paste(self, x: Tensor, partner: Tensor) -> Mixed:
        lam = sample_lam(self.alpha, self.generator)
        cells = int(torch.randint(self.grid_sizes[0], self.grid_sizes[1] + 1, (1,), generator=self.generator))
        mask = grid_masks(lam, cells, x.shape[0], tuple(x.shape[-2:]), self.generator, x.device)
        return masked_batch(x, partner, mask, lam, "gridmix")
