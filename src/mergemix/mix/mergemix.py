"""``mergemix``: keep the patches the model attends to on its token-merged sequence.

One step (aux_loss="clean", the method's Step 4):
1. clean forward with ToMe merging; it yields the CLS attention over the K tokens entering the
   read-out block and which patches each token holds;
2. recover the attention to the L patches (Â = Sᵀ·A), keep the top ⌊λL⌋ patches of each image,
   fill the rest from a partner (a derangement of the batch);
3. label weight λ̂ per sample ("area": kept fraction; "gaussian": the reference's Step 3);
4. loss = CE(f(x̂), λ̂·y + (1−λ̂)·y_partner) + CE(f(x), y), both label-smoothed, fp32.
aux_loss="none" takes the mask from a no-grad pass that stops after the read-out block and
trains on the mixed batch only; aux_loss="mixup" adds a plain MixUp loss instead of the clean one.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from .. import mask as M
from ..tome import SCORES, Readout, configure_tome, forward_readout, patch_tome, tome_options
from . import register
from ..models import unwrap
from .base import (Objective, StepOutput, check_non_negative, check_positive, mixed_targets, sample_lam,
                   smooth_one_hot, soft_cross_entropy)

LAM_POLICIES = ("area", "gaussian")
AUX_LOSSES = ("clean", "mixup", "none")
PASSES = {
    "clean": "2 fwd + 2 bwd (clean pass gives the mask)",
    "mixup": "1 no-grad partial fwd + 2 fwd + 2 bwd (batched)",
    "none": "1 no-grad partial fwd (up to the read-out block) + 1 fwd + 1 bwd",
}


def default_readout_block(depth: int) -> int:
    """⌊0.75·depth⌋ − 1, 0-based: index 8 (the 9th block) of 12, as the reference reads CIFAR-100."""
    return max(int(0.75 * depth) - 1, 0)


@register
class MergeMix(Objective):
    """MergeMix (module docstring: one step). Options:

    alpha: λ ~ Beta(α, α), the kept share of patches; merge_num: tokens merged in all (None: half the
    patches) or r: tokens merged per block (an int or a per-block list), not both; merge_every: merge
    in every k-th block only; readout_block: the block whose CLS attention gives the mask (None:
    ⌊0.75·depth⌋ − 1; negative: from the end); score: "cls_row" (CLS's attention to each token) or
    "cls_col" (each token's to CLS); lam_policy: λ̂ as the kept "area" or the reference's "gaussian";
    aux_loss: "clean", "mixup" or "none" (see ``PASSES``); mixup_alpha: the MixUp auxiliary's α;
    merge_train: merge in the mixed training forwards too; prop_attn: ToMe's proportional attention.
    """

    name = "mergemix"
    description = "MergeMix: ToMe-merged CLS attention, recovered to patches, keeps the top ⌊λL⌋ patches"
    passes = PASSES["clean"]
    per_model = {"merge_num": "half the patches", "readout_block": "block ⌊0.75·depth⌋ − 1"}

    def __init__(self, num_classes: int, smoothing: float = 0.1, generator: torch.Generator | None = None,
                 alpha: float = 1.0, merge_num: int | None = None, r: int | list[int] | None = None,
                 readout_block: int | None = None, lam_policy: str = "area", aux_loss: str = "clean",
                 score: str = "cls_row", merge_train: bool = True, mixup_alpha: float = 0.8,
                 prop_attn: bool = True, merge_every: int = 1):
        super().__init__(num_classes, smoothing, generator)
        if lam_policy not in LAM_POLICIES:
            raise ValueError(f"unknown lam_policy {lam_policy!r}; choose one of {', '.join(LAM_POLICIES)}")
        if aux_loss not in AUX_LOSSES:
            raise ValueError(f"unknown aux_loss {aux_loss!r}; choose one of {', '.join(AUX_LOSSES)}")
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
        check_positive(alpha=alpha, mixup_alpha=mixup_alpha)
        if merge_num is not None and r is not None:
            raise ValueError(f"merge_num={merge_num} and r={r} both given: set either the total (merge_num) "
                             f"or the tokens merged per block (r), not both")
        check_non_negative(merge_num=merge_num, r=r)
        check_positive(merge_every=merge_every)
        self.alpha, self.mixup_alpha = alpha, mixup_alpha
        self.merge_num, self.r, self.merge_every, self.readout_block = merge_num, r, merge_every, readout_block
        self._schedule: list[int] = []  # merges per block, known once prepare() patched a model
        self.lam_policy, self.aux_loss, self.score = lam_policy, aux_loss, score
        self.merge_train, self.prop_attn = merge_train, prop_attn
        self.passes = PASSES[aux_loss]

    def patch_model(self, net: nn.Module) -> None:
        """Patch ``net`` for merging with a read-out; merge_num defaults to half the patches.

        Merging and the read-out are switched on only inside a training step: outside it (for
        evaluation, or anyone calling the model) the patched model computes what timm's does.
        """
        depth = len(getattr(net, "blocks", ()))
        block = default_readout_block(depth) if self.readout_block is None else self.readout_block
        merge_num = self.merge_num
        if merge_num is None and self.r is None:
            merge_num = getattr(getattr(net, "patch_embed", None), "num_patches", 0) // 2
        patch_tome(net, self.r, merge_num=merge_num, merge_every=self.merge_every,
                   prop_attn=self.prop_attn, readout_block=block, score=self.score)
        # resolved only once the model took them: a model that fails leaves the options as given
        self.merge_num, self.readout_block, self._schedule = merge_num, net.tome.readout_block, list(net.tome.r)
        configure_tome(net, merge=False, readout=False)

    def notes(self) -> list[str]:
        schedule, notes = self._schedule, []
        if any(schedule) and not any(schedule[: self.readout_block]):
            notes.append(f"the read-out block {self.readout_block} comes before any merge (merges per block: "
                         f"{schedule}): MergeMix's mask is then a plain top-k of the attention; a later "
                         f"readout_block (--readout-block) reads merged tokens")
        if any(schedule) and self.aux_loss == "none" and self.merge_train and not self.prop_attn:
            # measured: 61.2 % plain against 69.6 % merged for one such Fashion-MNIST run (README)
            notes.append(f"aux_loss none without proportional attention trains on bias-free merged forwards "
                         f"only, and plain evaluation can score points below the model merged as it trained: "
                         f"--eval-merged evaluates it both ways (objective.trained_forward(model) in a loop of "
                         f"your own); afterwards, mergemix eval --checkpoint RUN --merge-num {self.merge_num} "
                         f"--merge-every {self.merge_every} --no-prop-attn")
        return notes

    def trained_forward(self, model: nn.Module) -> contextlib.AbstractContextManager | None:
        """Merging on (as in the training forwards), read-out off; None when training does not merge."""
        if not (self.merge_train and any(self._schedule)):
            return None
        return tome_options(model, merge=True, readout=False)

    def clean_step(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        """Plain label-smoothed CE on the forward MergeMix trains its clean loss with: merged where the
        mixed steps merge it (``aux_loss`` clean, whose clean pass gives the mask, or ``merge_train``)."""
        with tome_options(model, merge=self.merge_train or self.aux_loss == "clean", readout=False):
            return super().clean_step(model, x, y)

    def _read_out(self, model: nn.Module, x: Tensor) -> tuple[Readout, Tensor | None]:
        """The merged read-out of the clean batch, and the clean pass's (B, num_classes) logits where
        the auxiliary loss needs that pass (``clean``); else a no-grad forward up to the read-out block."""
        if self.aux_loss == "clean":
            with tome_options(model, merge=True, readout=True):
                clean_logits = model(x)
            return unwrap(model).tome_readout, clean_logits
        # in the model's current mode: in training, drop-path and dropout shape this mask too,
        # as they shape the clean pass's
        with torch.no_grad(), tome_options(model, merge=True, readout=True):
            return forward_readout(model, x), None

    def _label_weight(self, readout: Readout, lam_cpu: Tensor, patch_mask: Tensor, mask: Tensor,
                      x: Tensor) -> Tensor:
        """(B,) λ̂, the own class's weight, by ``lam_policy``: the kept area of the (B, L) patch mask
        (of the (B, 1, H, W) pixel mask where padding leaves patches partly empty), or the gaussian draw."""
        if self.lam_policy == "area":
            # images padded up to whole patches (dynamic_img_pad): the kept share of the real pixels
            whole = M.fills_grid(x.shape[-2:], readout.grid, readout.patch)
            return M.lam_hat_area(patch_mask if whole else mask)
        B, L = readout.index.shape
        keep = M.keep_count(lam_cpu, L, B)  # the mask's counts, without reading them back from the GPU
        tokens = readout.attn.shape[1] - readout.num_prefix_tokens
        return M.to_device(M.lam_hat_gaussian(keep, tokens, L, self.generator), x.device)

    def mixed_step(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        # drawn first so that a batch too small to pair fails before any forward
        partner = M.derangement(x.shape[0], self.generator, x.device)
        readout, clean_logits = self._read_out(model, x)
        B = x.shape[0]
        # λ stays on the CPU as well: keep_count and the gaussian λ̂ then read nothing back from the GPU
        lam_cpu = torch.full((B,), sample_lam(self.alpha, self.generator))
        lam = M.to_device(lam_cpu, x.device)
        scores, patch_mask, mask = M.attention_mask(readout.attn, readout.index, lam, readout.grid, readout.patch,
                                                    x.shape[-2:])
        x_mixed = M.mix_images(x, partner, mask)
        lam_hat = self._label_weight(readout, lam_cpu, patch_mask, mask, x)
        targets = mixed_targets(y, partner, lam_hat, self.num_classes, self.smoothing)

        extras: dict[str, Any] = {"readout": readout}
        # with merging on, the mixed pass repeats the clean pass's settings (its read-out unused),
        # so a compiled model traces and compiles one graph for both passes instead of two
        same_as_clean = self.aux_loss == "clean" and self.merge_train
        with tome_options(model, merge=self.merge_train, readout=same_as_clean):
            if self.aux_loss == "mixup":
                mix_partner = M.derangement(B, self.generator, x.device)
                mix_lam = sample_lam(self.mixup_alpha, self.generator)
                x_mixup = torch.lerp(x[mix_partner], x, mix_lam)
                logits, mixup_logits = model(torch.cat([x_mixed, x_mixup])).split(B)
                aux = soft_cross_entropy(mixup_logits, mixed_targets(y, mix_partner, mix_lam, self.num_classes, self.smoothing))
                extras.update(mixup_lam=mix_lam, mixup_partner=mix_partner)
            else:
                logits = model(x_mixed)
                aux = 0.0 if clean_logits is None else soft_cross_entropy(
                    clean_logits, smooth_one_hot(y, self.num_classes, self.smoothing))
        loss = soft_cross_entropy(logits, targets)
        return StepOutput(loss + aux, clean_logits if clean_logits is not None else logits, x_mixed=x_mixed,
                          mask=mask, lam=lam, lam_hat=lam_hat, partner=partner, scores=scores, extras=extras)
