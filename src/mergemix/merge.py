"""Bipartite soft matching and size-weighted merging (ToMe, Bolya et al. 2023), as pure functions.

Prefix tokens (CLS, distillation, registers) lead the sequence and are never merged nor merged
into. Shapes: B batch, T tokens before the merge (prefix included), N of them patch tokens,
r tokens merged away, C channels.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

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


@torch.library.custom_op("mergemix::argsort_descending", mutates_args=())
def argsort_descending(x: Tensor) -> Tensor:
    """(..., n) -> (..., n) long: ``x.argsort(dim=-1, descending=True)``, opaque to ``torch.compile``.

    Inductor would lower the sort to a Triton bitonic-sort kernel, a separate one for each token
    count, and Triton compiles those slowly: on an H200 they kept a merged DeiT-S's cold compile
    waiting 152 s for kernels (7.5 s with this op). As a custom op the sort stays ATen's, so compiled
    and eager runs break ties the same way; its output is contiguous, as the fake below declares.
    """
    return x.argsort(dim=-1, descending=True).contiguous()


@argsort_descending.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.long)


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
    # eager calls the sort itself: the custom op adds 0.1 ms of dispatch a call on a 2-core CPU (140 vs 26 µs)
    order = argsort_descending(best) if torch.compiler.is_compiling() else best.argsort(dim=-1, descending=True)
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
    """
    size_src = size.gather(1, m.src)
    new_size = size.gather(1, m.keep).scatter_add_(1, m.dst, size_src)
    weight = size_src / new_size.gather(1, m.dst)
    return _Merge.apply(x, m.keep, m.src, m.dst, weight), new_size


class _Merge(torch.autograd.Function):
    """The merge as the linear map it is: out = x[keep]; out[dst] += w * (x[src] - x[keep[dst]]).

    The weights w = s_src / S_dst (B, r) make the dst the size-weighted mean. Written out by hand
    because autograd's gradient of a row gather zero-fills a (B, T, C) buffer and scatter-adds into
    it with atomics, once per gather, then adds the buffers: several passes over the whole stream.
    Here keep and src together hold every position once, so the backward writes each row of the
    gradient once, into an uninitialised buffer; only the r dst rows accumulate. Rows move with
    ``index_select``/``index_copy_``/``index_add_`` over (B·T, C), one index per row: a gather with
    the index expanded to (B, n, C) computes an offset from an int64 for every element, 2 to 7
    times slower on the CPU (benchmarks/merge_ab.py).
    """

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, src: Tensor, dst: Tensor, weight: Tensor) -> Tensor:
        (B, T, C), n = x.shape, keep.shape[1]
        dst_pos = keep.gather(1, dst)
        rows_keep, rows_src, rows_dst_pos = _flat_rows(T, keep, src, dst_pos)
        (rows_dst,) = _flat_rows(n, dst)  # positions in the output
        flat = x.reshape(B * T, C)
        # the weights stay float32 under AMP: the r products are rounded once, to x's dtype
        delta = weight.reshape(-1, 1) * (flat.index_select(0, rows_src) - flat.index_select(0, rows_dst_pos))
        ctx.save_for_backward(rows_keep, rows_src, rows_dst_pos, rows_dst, weight)
        out = flat.index_select(0, rows_keep).index_add_(0, rows_dst, delta.to(x.dtype))
        return out.view(B, n, C)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        rows_keep, rows_src, rows_dst_pos, rows_dst, weight = ctx.saved_tensors
        B, _, C = grad.shape
        flat = grad.reshape(-1, C)
        grad_delta = (weight.reshape(-1, 1) * flat.index_select(0, rows_dst)).to(grad.dtype)
        grad_x = grad.new_empty(rows_keep.numel() + rows_src.numel(), C)  # B·T rows: kept and merged ones
        grad_x.index_copy_(0, rows_keep, flat).index_copy_(0, rows_src, grad_delta)
        return grad_x.index_add_(0, rows_dst_pos, -grad_delta).view(B, -1, C), None, None, None, None


def _flat_rows(T: int, *indices: Tensor) -> tuple[Tensor, ...]:
    """Each (B, n) index of token positions in sequences of T tokens -> (B·n,) row numbers of the
    (B·T, C) flattened batch. One arange of row offsets serves them all: eager GPU passes are
    launch-bound, and a merge runs several of these per block."""
    B = indices[0].shape[0]
    offsets = torch.arange(0, B * T, T, device=indices[0].device)[:, None]
    return tuple((index + offsets).reshape(-1) for index in indices)


def merged_positions(m: Matching) -> Tensor:
    """(B, T) long: the output position each of the T input tokens lands at after ``merge_tokens``.

    Composing these maps (``pos.gather(1, index)``) tracks which token holds each original patch,
    an index-map form of the source matrix that costs O(L) per block instead of O(K·L).
    """
    (B, n_out), r = m.keep.shape, m.src.shape[1]
    pos = m.keep.new_empty(B, n_out + r)
    pos.scatter_(1, m.keep, torch.arange(n_out, device=pos.device).expand(B, n_out))
    return pos.scatter_(1, m.src, m.dst)


def token_counts(num_tokens: int, schedule: Sequence[int]) -> list[int]:
    """Tokens entering each block when block i merges ``schedule[i]`` of them: [T, T - r0, T - r0 - r1, ...]."""
    counts = []
    for r in schedule:
        counts.append(num_tokens)
        num_tokens -= r
    return counts


def decreasing_schedule(merge_num: int, depth: int, every: int = 1) -> list[int]:
    """Spread ``merge_num`` merges over ``depth`` blocks, linearly from 1.5x to 0.5x the mean.

    every: merge only in blocks 0, every, 2·every, ... (the others merge nothing), so the same
    total is merged in fewer, larger steps: fewer matching and gather kernels per forward and
    fewer distinct token counts for ``torch.compile`` to specialise on.
    Integer per-block counts whose sum is exactly ``merge_num`` (rounded cumulative sums).
    """
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    n = len(range(0, depth, every))  # blocks that merge
    weights = [1.5 - i / (n - 1) for i in range(n)] if n > 1 else [1.0]
    cumulative = [round(merge_num * sum(weights[: i + 1]) / n) for i in range(n)]
    schedule = [0] * depth
    schedule[::every] = [c - p for c, p in zip(cumulative, [0] + cumulative[:-1])]
    return schedule
