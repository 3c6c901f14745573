"""Bipartite soft matching and size-weighted merging (ToMe, Bolya et al. 2023), as pure functions.

All functions act on patch tokens only; prefix tokens (CLS, distillation, registers) are
split off by the caller so they are never merged and never merged into.
Shapes: B batch, N patch tokens before the merge, r tokens merged away, C channels.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Matching(NamedTuple):
    """Indices of one bipartite matching, see ``bipartite_matching``."""

    unmerged: Tensor
    src: Tensor
    dst: Tensor


def bipartite_matching(metric: Tensor, r: int) -> Matching:
    """Pair each token of set A (even positions) with its most similar token of set B (odd).

    metric: (B, N, C) similarity features (ToMe uses the head-averaged keys).
    Returns indices into A: ``unmerged`` (B, N_A - r) and ``src`` (B, r), the r A-tokens with the
    most similar partner; and ``dst`` (B, r), the index into B each src token merges into.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    best, best_idx = (a @ b.transpose(-1, -2)).max(dim=-1)  # (B, N_A)
    order = best.argsort(dim=-1, descending=True)
    src = order[:, :r]
    return Matching(order[:, r:], src, best_idx.gather(1, src))


def merge_tokens(x: Tensor, size: Tensor, m: Matching, num_prefix: int = 0) -> tuple[Tensor, Tensor]:
    """Merge src tokens into their dst tokens by size-weighted average.

    x: (B, P + N, C) tokens, the P = ``num_prefix`` prefix tokens first (kept as they are);
    size: (B, N) how many original patches each patch token holds.
    returns: x (B, P + N - r, C) laid out as [prefix, unmerged A tokens, B tokens], and the
    patch-token sizes (B, N - r).

    The (B, N, C) stream is read once, by one gather of the kept tokens; only the r merged
    pairs are then touched: dst += s_src * (x_src - x_dst) / S_dst, with S_dst the dst's new
    size, which sums to the size-weighted mean. A merge that multiplies, divides and
    concatenates whole streams is memory-bound and costs more on a GPU than the tokens it saves.
    """
    B, _, C = x.shape
    P, n_unmerged = num_prefix, m.unmerged.shape[1]
    n_b = (x.shape[1] - P) // 2
    expand = lambda idx: idx[..., None].expand(-1, -1, C)  # noqa: E731
    prefix = torch.arange(P, device=x.device).expand(B, P)
    b_tokens = torch.arange(P + 1, P + 2 * n_b, 2, device=x.device).expand(B, n_b)
    keep = torch.cat([prefix, P + 2 * m.unmerged, b_tokens], dim=1)
    out = x.gather(1, expand(keep))
    size_a, size_b = size[:, ::2], size[:, 1::2]
    size_src = size_a.gather(1, m.src)
    size_b = size_b.scatter_add(1, m.dst, size_src)
    new_size = torch.cat([size_a.gather(1, m.unmerged), size_b], dim=1)
    weight = (size_src / size_b.gather(1, m.dst))[..., None]
    delta = weight * (x.gather(1, expand(P + 2 * m.src)) - x.gather(1, expand(P + 1 + 2 * m.dst)))
    # in place on the fresh gather output, whose backward needs only the index
    return out.scatter_add_(1, expand(P + n_unmerged + m.dst), delta.to(out.dtype)), new_size


def merged_positions(num_tokens: int, m: Matching) -> Tensor:
    """(B, N) long: the position each of the N tokens lands at after ``merge_tokens``.

    Composing these maps (``pos.gather(1, index)``) tracks which token holds each original patch,
    an index-map form of the source matrix that costs O(L) per block instead of O(K·L).
    """
    B, n_unmerged = m.unmerged.shape
    n_a, n_b = (num_tokens + 1) // 2, num_tokens // 2
    device = m.src.device
    pos_a = torch.empty(B, n_a, dtype=torch.long, device=device)
    pos_a.scatter_(1, m.unmerged, torch.arange(n_unmerged, device=device).expand(B, -1))
    pos_a.scatter_(1, m.src, n_unmerged + m.dst)
    pos = torch.empty(B, num_tokens, dtype=torch.long, device=device)
    pos[:, ::2] = pos_a
    pos[:, 1::2] = n_unmerged + torch.arange(n_b, device=device)
    return pos


def decreasing_schedule(merge_num: int, depth: int) -> list[int]:
    """Spread ``merge_num`` merges over ``depth`` blocks, linearly from 1.5x to 0.5x the mean.

    Integer per-block counts whose sum is exactly ``merge_num`` (rounded cumulative sums).
    """
    if depth == 1:
        return [merge_num]
    weights = [1.5 - i / (depth - 1) for i in range(depth)]
    cumulative = [round(merge_num * sum(weights[: i + 1]) / depth) for i in range(depth)]
    return [c - p for c, p in zip(cumulative, [0] + cumulative[:-1])]
