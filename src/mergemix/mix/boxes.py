"""Box geometry shared by the box methods (CutMix, SaliencyMix, ResizeMix, SMMix, TokenMix), as pure tensor functions.

A box is a row (y0, y1, x0, x1) of a (B, 4) long tensor: half-open pixel ranges [y0, y1) x [x0, x1).
Random draws come from the caller's CPU ``torch.Generator`` and are moved to ``device``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..mask import to_device


def box_mask(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, 4) boxes -> (B, 1, H, W) float mask: 0 inside the box (partner's pixels), 1 outside (own)."""
    H, W = size
    ys = torch.arange(H, device=boxes.device)
    xs = torch.arange(W, device=boxes.device)
    in_y = (ys >= boxes[:, 0:1]) & (ys < boxes[:, 1:2])  # (B, H)
    in_x = (xs >= boxes[:, 2:3]) & (xs < boxes[:, 3:4])  # (B, W)
    inside = in_y[:, :, None] & in_x[:, None, :]
    return (~inside).float()[:, None]


def centred_boxes(cy: Tensor, cx: Tensor, cut: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Boxes of cut = (h, w) pixels centred on (cy, cx), (B,) each, clipped to the image (CutMix's box).

    The box spans [c - h//2, c - h//2 + h) before clipping: h pixels, as timm's ``rand_bbox`` from 1.0.29
    on, where the CutMix paper's code (and timm before) take [c - h//2, c + h//2), a pixel shorter for
    odd h. Labels follow the area either way.
    returns: (B, 4) long.
    """
    y0, x0 = cy - cut[0] // 2, cx - cut[1] // 2
    return torch.stack([y0.clamp(0, size[0]), (y0 + cut[0]).clamp(0, size[0]),
                        x0.clamp(0, size[1]), (x0 + cut[1]).clamp(0, size[1])], dim=1).long()


def cut_size(lam: float, size: tuple[int, int]) -> tuple[int, int]:
    """CutMix's box side lengths for keeping a share lam of the image: ⌊H·√(1−λ)⌋ x ⌊W·√(1−λ)⌋."""
    ratio = math.sqrt(max(1.0 - lam, 0.0))
    return int(size[0] * ratio), int(size[1] * ratio)


def cutmix_boxes(lam: float, batch_size: int, size: tuple[int, int], generator: torch.Generator | None = None,
                 device: torch.device | None = None) -> Tensor:
    """CutMix boxes: side lengths from λ (``cut_size``), centres uniform over the image, one per sample.

    returns: (B, 4) long; clipping at the border makes the box smaller, so label by its true area.
    """
    cy = torch.randint(0, size[0], (batch_size,), generator=generator)
    cx = torch.randint(0, size[1], (batch_size,), generator=generator)
    return to_device(centred_boxes(cy, cx, cut_size(lam, size), size), device)


def boxes_at(corners: Tensor, box: tuple[int, int]) -> Tensor:
    """(B, 2) top-left corners (y, x) of boxes of box = (h, w) pixels -> (B, 4) long boxes."""
    y, x = corners[:, 0], corners[:, 1]
    return torch.stack([y, y + box[0], x, x + box[1]], dim=1).long()


def random_corners(batch_size: int, box: tuple[int, int], size: tuple[int, int],
                   generator: torch.Generator | None = None, device: torch.device | None = None) -> Tensor:
    """Top-left corners (y, x), uniform over the places where a box of (h, w) pixels fits whole.

    returns: (B, 2) long.
    """
    y = torch.randint(0, size[0] - box[0] + 1, (batch_size,), generator=generator)
    x = torch.randint(0, size[1] - box[1] + 1, (batch_size,), generator=generator)
    return to_device(torch.stack([y, x], dim=1), device)


def _window_index(corners: Tensor, box: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Advanced indices (batch (B,1,1), rows (B,h,1), cols (B,1,w)) of each sample's (h, w) window."""
    B = corners.shape[0]
    rows = corners[:, 0:1] + torch.arange(box[0], device=corners.device)
    cols = corners[:, 1:2] + torch.arange(box[1], device=corners.device)
    return torch.arange(B, device=corners.device)[:, None, None], rows[:, :, None], cols[:, None, :]


def crop_windows(x: Tensor, corners: Tensor, box: tuple[int, int]) -> Tensor:
    """Cut an (h, w) window out of every image at its own corner.

    x: (B, C, H, W); corners: (B, 2) long, windows must lie inside the image.
    returns: (B, C, h, w).
    """
    b, r, c = _window_index(corners, box)
    return x[b, :, r, c].permute(0, 3, 1, 2)


def paste_windows(x: Tensor, patches: Tensor, corners: Tensor) -> Tensor:
    """A copy of x with patches (B, C, h, w) written at each sample's corner (B, 2); x is not modified."""
    b, r, c = _window_index(corners, patches.shape[-2:])
    out = x.clone()
    out[b, :, r, c] = patches.permute(0, 2, 3, 1).to(x.dtype)
    return out
