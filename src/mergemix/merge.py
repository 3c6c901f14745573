"""Bipartite soft matching and size-weighted merging (ToMe, Bolya et al. 2023), as pure functions.

Prefix tokens (CLS, distillation, registers) lead the sequence and are never merged nor merged
into. Shapes: B batch, T tokens before the merge (prefix included), N of them patch tokens,
r tokens merged away, C channels.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Matching(NamedTuple):
    """One bipartite matching as indices into the full sequence (prefix tokens included).

    keep: (B, T - r) positions of the tokens that stay, in output order: [prefix, unmerged A, B].
    src: (B, r) positions of the A tokens merged away.
    dst: (B, r) output positions (into ``keep``) of the B token each src token merges into.
    """

    keep: Tensor
    src: Tensor
    dst: Tensor


@torch.no_grad()  # indices only: nothing here is differentiated, so record nothing for autograd
def bipartite_matching(metric: Tensor, r: int, num_prefix: int = 0) -> Matching:
    """Pair each patch token of set A (even patch positions) with its most similar one of set B (odd).

    metric: (B, N, C) similarity features of the N patch tokens (ToMe uses the head-averaged keys);
    the ``num_prefix`` tokens before them in the sequence are kept and never matched.
    The r A-tokens with the most similar partner are merged away (see ``Matching``).
    """
    P, (B, N, _) = num_prefix, metric.shape
    metric = metric / metric.norm(dim=-1, keepdim=True)
    best, best_idx = (metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)).max(dim=-1)  # (B, N_A)
    order = best.argsort(dim=-1, descending=True)
    position = torch.arange(P + N, device=metric.device)
    a_sorted = position[P::2][order]  # sequence positions of A, most similar first
    n_b = N // 2
    keep = torch.cat([position[:P].expand(B, P), a_sorted[:, r:], position[P + 1::2].expand(B, n_b)], dim=1)
    dst = best_idx.gather(1, order[:, :r]) + (keep.shape[1] - n_b)
    return Matching(keep, a_sorted[:, :r], dst)


def merge_tokens(x: Tensor, size: Tensor, m: Matching) -> tuple[Tensor, Tensor]:
    """Merge src tokens into their dst tokens by size-weighted average.

    x: (B, T, C) tokens; size: (B, T) how many original patches each token holds (1 for prefix
    tokens, which are never merged). Returns x (B, T - r, C) in ``m.keep`` order and sizes (B, T - r).

    The (B, T, C) stream is read once, by one gather of the kept tokens; only the r merged
    pairs are then touched: dst += s_src * (x_src - x_dst) / S_dst, with S_dst the dst's new
    size, which sums to the size-weighted mean. A merge that multiplies, divides and
    concatenates whole streams is memory-bound and costs more on a GPU than the tokens it saves;
    in eager mode every extra small op is a kernel launch, so indices come ready from the matching.
    """
    C = x.shape[-1]
    expand = lambda idx: idx[..., None].expand(-1, -1, C)  # noqa: E731
    out = x.gather(1, expand(m.keep))
    size_src = size.gather(1, m.src)
    new_size = size.gather(1, m.keep).scatter_add_(1, m.dst, size_src)
    weight = (size_src / new_size.gather(1, m.dst))[..., None]
    # src and dst rows in one gather: one scatter in the backward instead of two
    pairs = x.gather(1, expand(torch.cat([m.src, m.keep.gather(1, m.dst)], dim=1)))
    r = m.src.shape[1]
    delta = weight * (pairs[:, :r] - pairs[:, r:])
    # in place on the fresh gather output, whose backward needs only the index
    return out.scatter_add_(1, expand(m.dst), delta.to(out.dtype)), new_size


def merged_positions(m: Matching) -> Tensor:
    """(B, T) long: the output position each of the T input tokens lands at after ``merge_tokens``.

    Composing these maps (``pos.gather(1, index)``) tracks which token holds each original patch,
    an index-map form of the source matrix that costs O(L) per block instead of O(K·L).
    """
    (B, n_out), r = m.keep.shape, m.src.shape[1]
    pos = m.keep.new_empty(B, n_out + r)
    pos.scatter_(1, m.keep, torch.arange(n_out, device=pos.device).expand(B, n_out))
    return pos.scatter_(1, m.src, m.dst)


def decreasing_schedule(merge_num: int, depth: int) -> list[int]:
    """Spread ``merge_num`` merges over ``depth`` blocks, linearly from 1.5x to 0.5x the mean.

    Integer per-block counts whose sum is exactly ``merge_num`` (rounded cumulative sums).
    """
    if depth == 1:
        return [merge_num]
    weights = [1.5 - i / (depth - 1) for i in range(depth)]
    cumulative = [round(merge_num * sum(weights[: i + 1]) / depth) for i in range(depth)]
    return [c - p for c, p in zip(cumulative, [0] + cumulative[:-1])]
