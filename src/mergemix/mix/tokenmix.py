"""``tokenmix``: TokenMix (Liu et al., ECCV 2022), token-level mixing with attention labels.

The partner's share is a set of random blocks at patch (token) resolution, so no patch is cut
through: block-wise masking as in BEiT, vectorised over the batch. λ ~ Beta(α, α) (one per
batch) sets the target of ⌊(1−λ)·L⌋ partner tokens; each round every sample proposes one
rectangle of area U(min(min_block, remaining), remaining) tokens (remaining: the tokens still to
place) and aspect ratio log-uniform in [1/max_aspect, max_aspect] at a uniform place, accepted
when it adds new tokens without overshooting the target; after ``rounds`` rounds a sample may fall a little short of it.
Here, as TransMix does, the model's own CLS attention (last block, heads averaged) from the same
training forward gives the own class's weight: the attention mass on the own tokens.

Where this departs from the authors' code (Sense-X/TokenMix, ``tokenmix.py``): there each image's
weight is the share of a pre-trained teacher's class map (ReLabel's, precomputed per image) over the
tokens it contributes; the partner's share is fixed at half the tokens plus 14, not drawn from
Beta(α, α); blocks may be one token (here ``min_block``, 4); and it alternates with MixUp (switch 0.5).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..mask import keep_count, to_device, upsample_mask
from ..tome import patch_grid, patch_size
from . import register
from .attention import ReadsAttention, attention_lam_hat
from .base import check_positive, sample_lam
from .boxes import box_mask
from .mixer import Mixed, PairMixer, masked_batch


def block_token_mask(count: Tensor, grid: tuple[int, int], generator: torch.Generator | None = None,
                     min_block: int = 4, max_aspect: float = 3.0, rounds: int = 16) -> Tensor:
    """Grow a union of random rectangles on the patch grid up to count[b] tokens per sample.

    count: (B,) long target number of tokens (on count's device); grid: (gh, gw).
    returns: (B, L) float, 1 on the chosen tokens; never more than count[b] ones per row.
    """
    B, (gh, gw) = count.shape[0], grid
    device = count.device
    u = to_device(torch.rand(rounds, 4, B, generator=generator), device)
    log_aspect = math.log(max_aspect)
    chosen = torch.zeros(B, gh, gw, dtype=torch.bool, device=device)
    filled = torch.zeros(B, dtype=torch.long, device=device)
    for area_u, aspect_u, top_u, left_u in u:
        remaining = count - filled  # tokens still to place
        lo = remaining.clamp(max=min_block).float()
        area = lo + area_u * (remaining.float() - lo)
        aspect = torch.exp((2 * aspect_u - 1) * log_aspect)
        h = torch.sqrt(area * aspect).round().long().clamp(1, gh)
        w = torch.sqrt(area / aspect).round().long().clamp(1, gw)
        top = (top_u * (gh - h + 1)).long()
        left = (left_u * (gw - w + 1)).long()
        inside = box_mask(torch.stack([top, top + h, left, left + w], dim=1), grid)[:, 0] == 0
        new = inside & ~chosen
        added = new.flatten(1).sum(dim=1)
        accept = (added > 0) & (added <= remaining)
        chosen |= new & accept[:, None, None]
        filled += added * accept
    return chosen.flatten(1).float()


@register
class TokenMix(ReadsAttention, PairMixer):
    name = "tokenmix"
    description = "TokenMix: partner tokens in random blocks at patch resolution, labels by CLS attention mass"
    passes = "1 fwd + 1 bwd (attention read from the same forward)"
    default_alpha = 1.0

    def __init__(self, num_classes: int, smoothing: float = 0.1, generator: torch.Generator | None = None,
                 prob: float = 1.0, alpha: float | None = None, min_block: int = 4, max_aspect: float = 3.0,
                 readout_block: int = -1):
        super().__init__(num_classes, smoothing, generator, prob, alpha)
        check_positive(min_block=min_block, max_aspect=max_aspect)
        self.min_block, self.max_aspect, self.readout_block = min_block, max(max_aspect, 1 / max_aspect), readout_block

    def paste(self, x: Tensor, partner: Tensor) -> Mixed:
        net = self.prepared_model
        if net is None:
            raise RuntimeError("tokenmix draws its masks on the model's patch grid: call objective.prepare(model) first")
        # the grid of this batch's image size (models with dynamic_img_size take several)
        grid, patch = patch_grid(net, x.shape[-2:]), patch_size(net)
        B, L = x.shape[0], grid[0] * grid[1]
        lam = sample_lam(self.alpha, self.generator)
        count = keep_count(1.0 - lam, L, B, x.device)  # ⌊(1−λ)·L⌋ as the masks of MergeMix count
        taken = block_token_mask(count, grid, self.generator, self.min_block, self.max_aspect)
        return masked_batch(x, partner, upsample_mask(1.0 - taken, grid, patch, x.shape[-2:]), lam, "tokenmix")

    def relabel(self, model: nn.Module, mixed: Mixed) -> Tensor:
        return attention_lam_hat(model, mixed)
