"""Classification and calibration metrics: top-1/top-5, NLL, Brier score, ECE, MCE.

Calibration follows torchmetrics' ``MulticlassCalibrationError`` exactly (DESIGN §2.8): the
confidence of a prediction is its top softmax probability, bins are equal-width and closed on the
left, ``[k/n, (k+1)/n)`` for k < n, and a confidence of exactly 1.0 (a softmax saturated in fp32)
falls into an extra bin of its own. ECE is the count-weighted mean of ``|accuracy - confidence|``
over the bins, MCE its maximum over the bins, both as fractions.

Everything is computed in fp32 from the logits (bf16/fp16 logits are up-cast) and accumulated in
fp64 sums, so ``EvalMetrics`` gives the same figures however the data is split into batches or
across DDP ranks.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = ["EvalMetrics", "classification_metrics", "expected_calibration_error", "maximum_calibration_error",
           "reliability_bins"]

_STATES = ("bins", "bins10", "correct1", "correct5", "nll_sum", "brier_sum", "n", "nonfinite")


def _top_label(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(N, C) logits, (N,) class indices -> (N,) fp32 top softmax probability, (N,) bool correct.

    The prediction is the logits' argmax, as timm's accuracy takes it: two logits 1e-9 apart are
    one tie after an fp32 softmax, and the softmax's argmax would then pick the lower index.
    """
    confidence = torch.softmax(logits.float(), dim=1).amax(dim=1)
    return confidence, logits.argmax(dim=1).eq(target)


def _bin_sums(confidence: Tensor, correct: Tensor, n_bins: int) -> Tensor:
    """Per-bin sums, (3, n_bins + 1) fp64: rows are count, sum of confidence, number correct.

    confidence: (N,) fp32 in [0, 1]; correct: (N,) bool. Bin k < n_bins holds confidences in
    ``[k/n_bins, (k+1)/n_bins)``; bin n_bins holds confidences equal to 1.0. Bin edges are the fp32
    ``linspace`` torchmetrics uses, so samples on an edge land in the same bin as there.
    """
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype, device=confidence.device)
    index = torch.bucketize(confidence, edges, right=True) - 1
    values = torch.stack([torch.ones_like(confidence), confidence, correct.to(confidence.dtype)]).double()
    sums = torch.zeros(3, n_bins + 1, dtype=torch.float64, device=confidence.device)
    return sums.scatter_add_(1, index.expand(3, -1), values)


def _calibration_errors(sums: Tensor) -> tuple[float, float]:
    """(3, n_bins + 1) per-bin sums from ``_bin_sums`` -> (ECE, MCE) as fractions; 0 for no data."""
    count, confidence_sum, correct_sum = sums
    filled = count > 0
    if not filled.any():
        return 0.0, 0.0
    gap = (correct_sum[filled] - confidence_sum[filled]).abs() / count[filled]
    ece = (gap * count[filled]).sum() / count.sum()
    return float(ece), float(gap.max())


def expected_calibration_error(logits: Tensor, target: Tensor, n_bins: int = 15) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins, as a fraction.

    logits: (N, C); target: (N,) class indices. Equals torchmetrics'
    ``MulticlassCalibrationError(C, n_bins, norm='l1')`` on the softmax of ``logits``.
    """
    _check_inputs(logits, target)
    return _calibration_errors(_bin_sums(*_top_label(logits, target), n_bins))[0]


def maximum_calibration_error(logits: Tensor, target: Tensor, n_bins: int = 15) -> float:
    """Top-label MCE (largest per-bin ``|accuracy - confidence|``), as a fraction.

    logits: (N, C); target: (N,) class indices. Equals torchmetrics'
    ``MulticlassCalibrationError(C, n_bins, norm='max')`` on the softmax of ``logits``.
    """
    _check_inputs(logits, target)
    return _calibration_errors(_bin_sums(*_top_label(logits, target), n_bins))[1]


def _check_inputs(logits: Tensor, target: Tensor) -> None:
    """One-line errors for inputs that would otherwise give wrong figures without a word, or a
    device-side assert: logits (N, C) of raw scores, target (N,) class indices in [0, C), any
    integer dtype."""
    if logits.ndim != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, C) and target (N,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must hold class indices (an integer dtype), got {target.dtype}")
    if not target.numel():
        return
    classes, rows = logits.shape[1], logits.detach().float()
    out_of_range = ((target < 0) | (target >= classes)).any()
    # from 8 values on, logits that happen to look so are too unlikely to matter (a 2-class batch of one is not)
    probabilities = (((rows >= 0) & (rows <= 1)).all() & ((rows.sum(dim=1) - 1).abs().amax() <= 1e-3)
                     & (rows.numel() >= 8 and classes > 1))
    bad_target, looks_like_probabilities = torch.stack([out_of_range, probabilities]).tolist()  # one sync a batch
    if bad_target:
        low, high = int(target.min()), int(target.max())
        raise ValueError(f"target holds class {low if low < 0 else high}, outside 0..{classes - 1} "
                         f"for {classes} logits per row")
    if looks_like_probabilities:
        # their softmax is near-uniform: top-1 stays right, but ECE, NLL and Brier would all be wrong
        raise ValueError("these rows are probabilities (each in [0, 1], summing to 1), not logits: "
                         "pass their log, torch.log(probs), whose softmax gives them back")


def _batch_stats(logits: Tensor, target: Tensor, n_bins: int) -> dict[str, Tensor]:
    """Sum-reducible statistics of one batch: logits (N, C), target (N,) class indices.

    Returns fp64 tensors: ``bins`` (3, n_bins + 1) and ``bins10`` (3, 11) per-bin sums (see
    ``_bin_sums``), and scalars ``correct1``, ``correct5`` (top-min(5, C)), ``nll_sum``,
    ``brier_sum``, ``n``, ``nonfinite`` (rows with a NaN or infinite logit: their figures mean nothing).
    """
    _check_inputs(logits, target)
    logits, target = logits.float(), target.long()  # one_hot takes int64 only
    confidence, correct = _top_label(logits, target)
    k = min(5, logits.shape[1])
    top5 = logits.topk(k, dim=1).indices.eq(target[:, None]).any(dim=1)
    probs = torch.softmax(logits, dim=1)
    brier = (probs - F.one_hot(target, logits.shape[1]).float()).pow(2).sum(dim=1)
    return {
        "bins": _bin_sums(confidence, correct, n_bins),
        "bins10": _bin_sums(confidence, correct, 10),
        "correct1": correct.sum().double(),
        "correct5": top5.sum().double(),
        "nll_sum": F.cross_entropy(logits, target, reduction="none").double().sum(),
        "brier_sum": brier.double().sum(),
        "n": torch.tensor(float(target.shape[0]), dtype=torch.float64, device=logits.device),
        "nonfinite": (~logits.isfinite().all(dim=1)).sum().double(),
    }


def _summarise(stats: dict[str, Tensor]) -> dict[str, float]:
    """Statistics from ``_batch_stats`` (possibly summed over batches) -> the reported figures."""
    n = max(float(stats["n"]), 1.0)
    ece, mce = _calibration_errors(stats["bins"])
    return {
        "top1": 100.0 * float(stats["correct1"]) / n,
        "top5": 100.0 * float(stats["correct5"]) / n,
        "nll": float(stats["nll_sum"]) / n,
        "brier": float(stats["brier_sum"]) / n,
        "ece": ece,
        "ece10": _calibration_errors(stats["bins10"])[0],
        "mce": mce,
    }


def classification_metrics(logits: Tensor, target: Tensor, n_bins: int = 15) -> dict[str, float]:
    """All figures for one set of predictions.

    logits: (N, C); target: (N,) class indices. Returns ``top1``, ``top5`` (top-min(5, C)) in
    percent as timm reports them; ``nll`` (mean cross-entropy), ``brier`` (mean over samples of
    the squared distance between softmax and one-hot, summed over classes); ``ece`` (``n_bins``
    bins), ``ece10`` (10 bins) and ``mce`` (``n_bins`` bins) as fractions.
    """
    return _summarise(_batch_stats(logits, target, n_bins))


def reliability_bins(sums: Tensor) -> dict[str, list]:
    """(3, n_bins + 1) per-bin sums -> JSON-ready per-bin lists for a reliability diagram.

    Keys ``lower``, ``upper``, ``count``, ``confidence`` (mean confidence), ``accuracy``: one entry
    per bin, n_bins + 1 entries, the last being the bin ``[1.0, 1.0]`` of saturated confidences.
    ``confidence`` and ``accuracy`` are None for empty bins.
    """
    n_bins = sums.shape[1] - 1
    count, confidence_sum, correct_sum = sums.cpu().tolist()
    return {
        "lower": [k / n_bins for k in range(n_bins)] + [1.0],
        "upper": [(k + 1) / n_bins for k in range(n_bins)] + [1.0],
        "count": [int(c) for c in count],
        "confidence": [s / c if c else None for s, c in zip(confidence_sum, count)],
        "accuracy": [s / c if c else None for s, c in zip(correct_sum, count)],
    }


class EvalMetrics(Metric):
    """Every figure of ``classification_metrics``, accumulated over batches and synced across ranks.

    All states are sums (``dist_reduce_fx='sum'``), fp64, on the metric's device. ``update(logits,
    target)`` takes (N, C) logits (any float dtype; rows of probabilities are refused) and (N,)
    class indices; ``compute()`` returns the keys of ``classification_metrics`` plus ``bins``, the per-bin lists of the ``n_bins``
    reliability diagram (see ``reliability_bins``).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    bins: Tensor
    bins10: Tensor
    correct1: Tensor
    correct5: Tensor
    nll_sum: Tensor
    brier_sum: Tensor
    n: Tensor
    nonfinite: Tensor

    def __init__(self, num_classes: int, n_bins: int = 15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1 or n_bins < 1:
            raise ValueError(f"num_classes and n_bins must be positive, got {num_classes} and {n_bins}")
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.add_state("bins", torch.zeros(3, n_bins + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bins10", torch.zeros(3, 11, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("correct1", "correct5", "nll_sum", "brier_sum", "n", "nonfinite"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add one batch: logits (N, C), target (N,) class indices."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits (N, {self.num_classes}), got {tuple(logits.shape)}")
        stats = _batch_stats(logits.detach(), target, self.n_bins)
        for name in _STATES:
            setattr(self, name, getattr(self, name) + stats[name])

    def compute(self) -> dict[str, Any]:
        """Figures over everything seen since the last ``reset()``, plus ``bins`` and ``nonfinite``
        (the number of predictions with a NaN or infinite logit)."""
        return {**_summarise({name: getattr(self, name) for name in _STATES}), "bins": reliability_bins(self.bins),
                "nonfinite": int(self.nonfinite)}
