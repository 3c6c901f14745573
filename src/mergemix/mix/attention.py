"""CLS attention for the attention-based baselines (TransMix, TokenMix, SMMix).

They read attention through the same read-out MergeMix uses (``mergemix.tome``, with no merging:
r = 0), never through a second mechanism. By default the read-out block is the last one, as
TransMix reads "the attention map of the last Transformer block".
"""
from __future__ import annotations

from torch import Tensor, nn

from ..mask import patch_fraction, recover
from ..tome import Readout, patch_tome
from ..models import unwrap
from .base import StepOutput
from .mixer import Mixed


def attention_mass(scores: Tensor, keep: Tensor, eps: float = 1e-12) -> Tensor:
    """Share of the CLS attention that falls on the kept part of each image.

    scores: (B, L) CLS attention over the L patch tokens (prefix tokens left out).
    keep: (B, L) how much of each patch is the sample's own (0/1, or a fraction for patches a
        pixel-level box cuts through).
    returns: (B,) Σ_l a_l·keep_l / Σ_l a_l, in [0, 1]. Normalising over the patches leaves out the
    attention CLS pays to itself and to other prefix tokens, so own and partner shares sum to 1.
    """
    scores = scores.float()
    return (scores * keep.float()).sum(dim=1) / scores.sum(dim=1).clamp_min(eps)


def last_readout(model: nn.Module) -> Readout:
    """The read-out the model's last forward left (attention detached); RuntimeError if it left none."""
    readout = getattr(unwrap(model), "tome_readout", None)
    if readout is None:
        raise RuntimeError("the model left no attention read-out: call objective.prepare(model) before training")
    return readout


def attention_lam_hat(model: nn.Module, mixed: Mixed) -> Tensor:
    """(B,) label weight of the own class = CLS attention mass on the own pixels (TransMix's λ), read
    from the forward of ``mixed.x`` that just ran.

    The pixel mask is pooled to the patch grid by area, so a box that cuts a patch counts the
    kept fraction of that patch.
    """
    readout = last_readout(model)
    kept = patch_fraction(mixed.mask, readout.grid, readout.patch)
    return attention_mass(recover(readout.attn, readout.index), kept)


class ReadsAttention:
    """Mixin for objectives that read CLS attention: ``prepare`` patches the model for a read-out
    at ``readout_block``. Use before the objective base class: ``class X(ReadsAttention, PairMixer)``.
    """

    readout_block: int

    def patch_model(self, net: nn.Module) -> None:
        """Read-out at ``readout_block`` (negative: counted from the end), no merging."""
        patch_tome(net, r=0, readout_block=self.readout_block)

    def step(self, model: nn.Module, y: Tensor, mixed: Mixed) -> StepOutput:
        """PairMixer's step, with the (B, L) CLS attention over the mixed images (the labels' source) as
        ``scores``, marked ``extras["scores_of"] = "mixed"`` for figures."""
        out = super().step(model, y, mixed)  # type: ignore[misc]
        readout = last_readout(model)
        out.scores, out.extras["scores_of"] = recover(readout.attn, readout.index), "mixed"
        return out
