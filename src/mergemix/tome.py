"""Token merging for timm VisionTransformers, with a CLS-attention read-out at one block.

``patch_tome(model, ...)`` swaps the model's class for a subclass whose forward runs the same
blocks, with the same parameters, but merges r tokens per block (after the attention residual,
before the MLP), keeps token sizes for proportional attention, and at the read-out block leaves
``model.tome_readout``: the CLS attention over the tokens entering that block and which original
patches each of those tokens holds. Every block stays on ``F.scaled_dot_product_attention``; log(size)
enters it as a (B, 1, 1, N) additive float mask. The read-out block adds one CLS-row product for its
score (``cls_row``), or runs unfused (``cls_col``, which needs every query's attention to CLS).
"""
from __future__ import annotations

import contextlib
import functools
import numbers
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from .merge import bipartite_matching, decreasing_schedule, merge_tokens, merged_positions, token_counts
from .models import unwrap

SCORES = ("cls_row", "cls_col")


@dataclass
class Readout:
    """What the read-out block saw.

    attn: (B, K) score of each of the K tokens entering the block (prefix tokens included, in
        sequence order), head-averaged, proportional attention applied, detached.
    index: (B, L) long, the token (0..K-1) holding each original patch.
    size: (B, K) number of original patches in each token (1 for prefix tokens).
    num_prefix_tokens: the first tokens of the sequence that are not patches (CLS, registers, ...).
    grid: (gh, gw) patches of the input; patch: (ph, pw) pixels per token: the patch size, times the
        backbone's stride for a hybrid ViT (None: unknown).
    """

    attn: Tensor
    index: Tensor
    size: Tensor
    num_prefix_tokens: int
    grid: tuple[int, int]
    patch: tuple[int, int] | None = None

    @property
    def source(self) -> Tensor:
        """(B, K, L) 0/1 source matrix: row k marks the patches token k holds (prefix rows are 0)."""
        K = self.attn.shape[1]
        return F.one_hot(self.index, K).transpose(1, 2).to(self.attn.dtype)


@dataclass
class ToMeConfig:
    """Per-model merging settings; plain Python state, so it never reaches the state_dict."""

    r: list[int]
    prop_attn: bool = True
    readout_block: int | None = None
    score: str = "cls_row"
    merge: bool = True  # merging switched on (off: every r counts as 0)
    readout: bool = True  # compute the read-out at ``readout_block``
    readout_only: bool = False  # forward stops after the read-out block (``forward_readout``)


def patch_grid(model: nn.Module, img_size: Sequence[int]) -> tuple[int, int]:
    """(gh, gw) patch grid of a timm ViT for images of ``img_size`` (H, W): the configured grid, or
    another one for a model built with ``dynamic_img_size=True`` (with ``dynamic_img_pad``, rounded up)."""
    return tuple(model.patch_embed.dynamic_feat_size(tuple(img_size)))


def patch_size(model: nn.Module) -> tuple[int, int]:
    """(ph, pw) pixels per token: the patch size, times the backbone's stride for a hybrid ViT."""
    return tuple(model.patch_embed.feat_ratio(as_scalar=False))


def _check_vit(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"token merging and the attention read-out need a timm VisionTransformer, not a "
                         f"{type(model).__name__}: pick a ViT or a method that reads no attention")
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(blk, Block) or not isinstance(attn, Attention):
            raise ValueError(f"block {i} is a {type(blk).__name__} with {type(attn).__name__}; "
                             "only timm's standard Block with Attention is supported")


def resolve_schedule(num_patches: int, depth: int, r: int | Sequence[int] | None = None,
                     merge_num: int | None = None, merge_every: int = 1) -> list[int]:
    """Per-block merge counts from an int r, a per-block list, or a total ``merge_num`` (merged
    in every ``merge_every``-th block, see ``decreasing_schedule``).

    Raises ValueError when a block would merge more than half of the patch tokens it receives.
    """
    if r is not None and merge_num is not None:
        raise ValueError("give either r or merge_num, not both")
    if merge_every != 1 and merge_num is None:
        raise ValueError(f"merge_every={merge_every} spreads a total merge_num over the blocks; give merge_num, "
                         "or a per-block list r with the zeros where you want them")
    if merge_num is not None:
        schedule = decreasing_schedule(int(merge_num), depth, merge_every)
    elif r is None:
        schedule = [0] * depth
    elif isinstance(r, numbers.Integral) or (isinstance(r, Tensor) and r.ndim == 0):
        schedule = [int(r)] * depth
    else:
        schedule = [int(v) for v in r]
        if len(schedule) != depth:
            raise ValueError(f"r has {len(schedule)} entries but the model has {depth} blocks")
    overfull = _overfull_block(schedule, num_patches)
    if overfull is not None:
        i, ri, left = overfull
        if merge_num is not None:
            largest = next(n for n in range(int(merge_num), -1, -1)
                           if _overfull_block(decreasing_schedule(n, depth, merge_every), num_patches) is None)
            hint = f"; the largest merge_num this schedule fits is {largest}"
        else:
            hint = ""
        what = f"merge_num={merge_num}" if merge_num is not None else f"r={ri}"
        raise ValueError(f"{what} is too large: block {i} would merge {ri} of the {left} patch tokens left "
                         f"(at most half, {left // 2}){hint}")
    return schedule


def _overfull_block(schedule: Sequence[int], num_patches: int) -> tuple[int, int, int] | None:
    """(block, its r, patch tokens it receives) of the first block that would merge more than half
    of the patch tokens it receives (or a negative count), or None when every block fits."""
    left = num_patches
    for i, ri in enumerate(schedule):
        if ri < 0 or ri > left // 2:
            return i, ri, left
        left -= ri
    return None


def patch_tome(model: nn.Module, r: int | Sequence[int] | None = None, *, merge_num: int | None = None,
               merge_every: int = 1, prop_attn: bool = True, readout_block: int | None = None,
               score: str = "cls_row") -> nn.Module:
    """Patch a timm VisionTransformer in place for token merging and attention read-out.

    r: tokens merged per block (int) or a per-block list; merge_num: total tokens merged, spread
    as a decreasing schedule over every ``merge_every``-th block. readout_block: 0-based index of the block whose CLS attention is
    read out (negative: counted from the end, -1 the last; None: no read-out). score: "cls_row" (the CLS query's attention over the tokens)
    or "cls_col" (each token's attention to CLS). Adds no parameters; calling it again
    reconfigures. Returns the model; a wrapped one (torch.compile, DDP) has the model inside patched.
    """
    wrapper, model = model, unwrap(model)
    _check_vit(model)
    depth = len(model.blocks)
    num_patches = model.patch_embed.num_patches
    schedule = resolve_schedule(num_patches, depth, r, merge_num, merge_every)
    if readout_block is not None:
        if not -depth <= readout_block < depth:
            raise ValueError(f"read-out block {readout_block} is out of range for a model with {depth} blocks "
                             f"(0..{depth - 1}, or {-depth}..-1 counted from the end)")
        readout_block %= depth  # negative: counted from the end, as Python indexes
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    if readout_block is not None and model.cls_token is None:
        raise ValueError("the attention read-out needs a class token; this model has none (class_token=False)")
    if any(schedule):
        _check_pool(model.global_pool, model.attn_pool)
    # patch dropout keeps a random subset of the patches, which neither merging nor the read-out's
    # patch index (one entry per patch of the grid) follows
    if (any(schedule) or readout_block is not None) and model.patch_drop.__class__ is not nn.Identity:
        raise ValueError("token merging and the attention read-out cannot be combined with patch dropout "
                         "(patch_drop_rate > 0)")
    model.tome = ToMeConfig(schedule, prop_attn, readout_block, score)
    if not isinstance(model, ToMeMixin):
        model.__class__ = _tome_class(type(model))
        model.tome_readout = model.tome_size = None
    return wrapper


def _check_pool(global_pool: str, attn_pool: nn.Module | None) -> None:
    """Merged tokens pool as the plain sequence would only by the class token or a size-weighted mean
    (or not at all: '' returns the tokens)."""
    if global_pool not in ("token", "avg", "") or attn_pool is not None:
        raise ValueError(f"token merging supports global_pool 'token', 'avg' or '' (none), not {global_pool!r}")


def configure_tome(model: nn.Module, merge: bool | None = None, readout: bool | None = None,
                   readout_only: bool | None = None) -> None:
    """Switch merging (off: every r counts as 0), the read-out, and read-out-only forwards (the
    forward stops after the read-out block and returns its scores) off or on, without
    re-creating the model; None leaves a setting as it is."""
    cfg = _config(model)
    for name, value in (("merge", merge), ("readout", readout), ("readout_only", readout_only)):
        if value is not None:
            setattr(cfg, name, value)


@contextlib.contextmanager
def tome_options(model: nn.Module, merge: bool | None = None, readout: bool | None = None,
                 readout_only: bool | None = None) -> Iterator[None]:
    """``configure_tome`` for the duration of a ``with`` block."""
    cfg = _config(model)
    saved = (cfg.merge, cfg.readout, cfg.readout_only)
    configure_tome(model, merge, readout, readout_only)
    try:
        yield
    finally:
        cfg.merge, cfg.readout, cfg.readout_only = saved


def tokens_per_block(model: nn.Module) -> list[int]:
    """Number of tokens (prefix included) entering each block under the current settings."""
    cfg = _config(model)
    return token_counts(model.patch_embed.num_patches + model.num_prefix_tokens, cfg.r if cfg.merge else [0] * len(cfg.r))


def forward_readout(model: nn.Module, x: Tensor) -> Readout:
    """Run the model only up to its read-out block and return the read-out: ``attn`` (B, K), ``index``
    (B, L), ``size`` (B, K) for the K tokens entering that block (see ``Readout``).

    The cheap mask pass: blocks after the read-out block are never run. Use under no_grad.
    ``model`` may be wrapped (torch.compile, DDP): the call goes through the wrapper, so a
    compiled model compiles this partial forward as a graph of its own.
    """
    net = unwrap(model)
    if _config(net).readout_block is None:
        raise ValueError("forward_readout needs a read-out block: patch_tome(..., readout_block=l)")
    with tome_options(net, readout=True, readout_only=True):
        model(x)
    return net.tome_readout


def _config(model: nn.Module) -> ToMeConfig:
    cfg = getattr(unwrap(model), "tome", None)
    if not isinstance(cfg, ToMeConfig):
        raise ValueError("the model is not patched for token merging: call objective.prepare(model) first for a "
                         "mixing method, or mergemix.tome.patch_tome(model, ...) to merge without one")
    return cfg


def _attention(attn: Attention, x: Tensor, bias: Tensor | None, score: str | None,
               need_output: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """timm Attention forward with an additive key bias and an optional CLS score read-out.

    x: (B, N, C); bias: (B, 1, 1, N) or None. Returns (output (B, N, C) or None, scores (B, N)
    or None, keys (B, heads, N, head_dim), whose head average is ToMe's similarity metric).
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if bias is not None:
        bias = bias.to(q.dtype)
    scores = out = None
    if score == "cls_col":
        # every query's attention to CLS needs the full matrix, so this block runs unfused
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        probs = (logits if bias is None else logits + bias).softmax(dim=-1)
        scores = probs[..., 0].mean(dim=1).detach()
        out = attn.attn_drop(probs) @ v if need_output else None
    else:
        if score == "cls_row":
            with torch.no_grad():  # only the CLS query row: one (B, H, 1, N) product
                logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
                scores = (logits if bias is None else logits + bias).softmax(dim=-1)[:, :, 0].mean(dim=1)
        if need_output:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                 dropout_p=attn.attn_drop.p if attn.training else 0.0)
    if out is not None:
        out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
        if gate is not None:
            out = out * gate
        out = attn.proj_drop(attn.proj(out))
    return out, scores, k


def _run_block(blk: Block, x: Tensor, size: Tensor | None, index: Tensor | None, r: int, *, npt: int,
               prop_attn: bool, score: str | None, track_index: bool,
               need_output: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """One block: attention with log(size) as key bias, merge r tokens, MLP.

    x: (B, K, C); size: (B, K) patches per token, None before the first merge (all 1); index:
    (B, L) token holding each original patch, None until tracked (identity). ``score`` names the
    CLS read-out to compute here (None: none); ``track_index`` composes ``index`` with this
    block's merge. Returns (x (B, K - r, C) or None without ``need_output``, size, index, scores
    (B, K) or None).
    """
    bias = size.log()[:, None, None, :] if prop_attn and size is not None else None
    h, scores, keys = _attention(blk.attn, blk.norm1(x), bias, score, need_output)
    if not need_output:
        return None, size, index, scores
    x = x + blk.drop_path1(blk.ls1(h))
    if r > 0:
        if size is None:  # float32 whatever the model's dtype: bf16 counts only to 256 exactly
            size = x.new_ones(x.shape[:2], dtype=torch.float32)
        m = bipartite_matching(keys[:, :, npt:].mean(dim=1), r, num_prefix=npt)
        if track_index:
            pos = merged_positions(m)
            index = pos[:, npt:] if index is None else pos.gather(1, index)
        x, size = merge_tokens(x, size, m)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, size, index, scores


def _run_blocks(model: VisionTransformer, x: Tensor) -> tuple[Tensor | None, Tensor | None, Readout | None]:
    """Embed and run the blocks with merging. Returns (tokens (B, K_out, C) after the final norm,
    patch-token sizes (B, K_out - prefix) or None if nothing merged, read-out or None); with
    ``readout_only`` set it stops at the read-out block and returns (None, None, read-out)."""
    cfg: ToMeConfig = model.tome
    grid = patch_grid(model, x.shape[-2:])
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    npt = model.num_prefix_tokens
    L = x.shape[1] - npt
    if L != model.patch_embed.num_patches and cfg.merge and any(cfg.r):
        # another image size (dynamic_img_size): the schedule was checked for the configured one
        try:
            resolve_schedule(L, len(cfg.r), r=cfg.r)
        except ValueError as e:
            raise ValueError(f"the merge schedule {list(cfg.r)} was set for {model.patch_embed.num_patches} patches, "
                             f"this input has {L} ({grid[0]}x{grid[1]}): {e}; merge fewer or feed larger images") from None
    readout_at = cfg.readout_block if cfg.readout else None
    # None until the first merge: all sizes 1, identity index. size (B, K) covers every token
    # (1 for prefix tokens, so log(size) is the whole additive bias); index (B, L) is the
    # position of the token holding each original patch.
    size = index = readout = None
    run_block = _run_block
    if model.grad_checkpointing and torch.is_grad_enabled():  # recompute each block in the backward
        run_block = functools.partial(checkpoint, _run_block, use_reentrant=False)
    for i, blk in enumerate(model.blocks):
        at_readout = i == readout_at
        size_in, index_in = size, index
        x, size, index, scores = run_block(
            blk, x, size, index, cfg.r[i] if cfg.merge else 0, npt=npt, prop_attn=cfg.prop_attn,
            score=cfg.score if at_readout else None,
            track_index=readout_at is not None and i < readout_at,  # the source is only needed up to the read-out
            need_output=not (at_readout and cfg.readout_only))
        if at_readout:
            readout = _make_readout(scores, index_in, size_in, npt, L, grid, patch_size(model))
            if cfg.readout_only:
                return None, None, readout
    return model.norm(x), None if size is None else size[:, npt:], readout


def _make_readout(scores: Tensor, index: Tensor | None, size: Tensor | None, npt: int, L: int,
                  grid: tuple[int, int], patch: tuple[int, int]) -> Readout:
    B = scores.shape[0]
    if index is None:
        index = torch.arange(npt, npt + L, device=scores.device).expand(B, L)
    full_size = scores.new_ones(B, npt + L) if size is None else size
    return Readout(scores.float(), index, full_size.detach(), npt, grid, patch)


class ToMeMixin:
    """Forward of a token-merging VisionTransformer; mixed into the model's own class.

    ``forward_features`` leaves the read-out (``tome_readout``) and the patch tokens' sizes
    (``tome_size``, (B, K - prefix), None if nothing merged) of its input on the model, so that
    ``forward_head`` of its output pools a merged sequence as the unmerged one would be;
    ``forward`` keeps the read-out only.
    """

    tome: ToMeConfig
    tome_readout: Readout | None
    tome_size: Tensor | None

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor | None:
        """Tokens (B, K, C) after the final norm; None in a read-out-only forward."""
        if attn_mask is not None or is_causal:
            cfg = self.tome
            if (cfg.merge and any(cfg.r)) or (cfg.readout and cfg.readout_block is not None):
                raise ValueError("attn_mask and is_causal apply to a fixed sequence: turn merging and the "
                                 "read-out off (configure_tome) to use them")
            self.tome_readout = self.tome_size = None
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        x, self.tome_size, self.tome_readout = _run_blocks(self, x)
        return x

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        """timm's pooling of x (B, K, C) to (B, C); over merged tokens, "avg" is the size-weighted mean."""
        size, npt = self.tome_size, self.num_prefix_tokens
        merged = size is not None and size.shape == (x.shape[0], x.shape[1] - npt)
        if merged:  # reset_classifier may have changed the pooling since patch_tome checked it
            _check_pool(pool_type or self.global_pool, self.attn_pool)
        if not merged or (pool_type or self.global_pool) != "avg":
            return super().pool(x, pool_type)
        # a merged token stands for `size` patches: the size-weighted mean is the plain mean
        if self.pool_include_prefix:  # prefix tokens count once each
            size = torch.cat([size.new_ones(size.shape[0], npt), size], dim=1)
        else:
            x = x[:, npt:]
        return ((x * size[..., None]).sum(1) / size.sum(1, keepdim=True)).to(x.dtype)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """(B, C, H, W) images -> (B, num_classes) logits; a read-out-only forward returns the read-out's
        (B, K) CLS attention instead."""
        x = self.forward_features(x, attn_mask, is_causal)
        if x is None:  # read-out only: the blocks after it never ran
            return self.tome_readout.attn
        x = self.forward_head(x)
        # the sizes served the pooling above; kept on the model, they would hold an output of a
        # replayed CUDA graph (torch.compile mode "reduce-overhead") alive into the next call
        self.tome_size = None
        return x


_CLASSES: dict[type, type] = {}


def _tome_class(base: type) -> type:
    """One cached subclass per model class, so isinstance checks and repr stay meaningful. It is
    named as an attribute of this module (see ``__getattr__``), so a patched model pickles."""
    if base not in _CLASSES:
        name = f"ToMe{base.__name__}"
        _CLASSES[base] = type(name, (ToMeMixin, base), {"__module__": __name__, "__qualname__": name})
    return _CLASSES[base]


def __getattr__(name: str) -> type:
    """``ToMe<Base>``, the patched class of any VisionTransformer class loaded: what unpickling a
    patched model (``torch.save(model)``) looks up."""
    if name.startswith("ToMe"):
        bases, seen = [VisionTransformer], []
        while bases:
            base = bases.pop()
            if not issubclass(base, ToMeMixin):
                seen.append(base)
                bases.extend(base.__subclasses__())
        for base in seen:
            if base.__name__ == name[4:]:
                return _tome_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
