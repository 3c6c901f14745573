"""Metrics against independent facts: torchmetrics, scikit-learn and a hand-computed example."""
from __future__ import annotations

import datetime
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import log_loss, top_k_accuracy_score
from torchmetrics.classification import MulticlassCalibrationError

from mergemix.metrics import (
    EvalMetrics,
    classification_metrics,
    expected_calibration_error,
    maximum_calibration_error,
)

# Hand-computed example, 2 classes, 5 bins of width 0.2. Probability of class 0 and the target:
#   conf 0.95 right, 0.85 wrong, 0.90 right -> bin [0.8, 1): mean conf 0.9, acc 2/3, gap 7/30
#   conf 0.65 right                         -> bin [0.6, 0.8): gap 0.35
#   conf 0.55 wrong                         -> bin [0.4, 0.6): gap 0.55
# ECE = (3 * 7/30 + 0.35 + 0.55) / 5 = 0.32; MCE = 0.55.
# p(true class) = 0.95, 0.15, 0.90, 0.65, 0.45; Brier (2 classes) = mean of 2 * (1 - p_true)^2.
HAND_P0 = [0.95, 0.15, 0.90, 0.35, 0.45]
HAND_TARGET = [0, 0, 0, 1, 0]
HAND_P_TRUE = [0.95, 0.15, 0.90, 0.65, 0.45]


def hand_example() -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.tensor(HAND_P0, dtype=torch.float64)
    logits = torch.stack([p.log(), (1 - p).log()], dim=1).float()
    return logits, torch.tensor(HAND_TARGET)


def random_logits(n: int, c: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * scale
    # make about half the predictions right so every bin sees both outcomes
    target = torch.where(torch.rand(n, generator=g) < 0.5, logits.argmax(1), torch.randint(0, c, (n,), generator=g))
    return logits, target


def torchmetrics_ce(logits: torch.Tensor, target: torch.Tensor, n_bins: int, norm: str) -> float:
    # pass probabilities: torchmetrics only applies softmax when its input leaves [0, 1]
    metric = MulticlassCalibrationError(num_classes=logits.shape[1], n_bins=n_bins, norm=norm)
    return float(metric(torch.softmax(logits.float(), dim=1), target))


def test_hand_computed_example():
    logits, target = hand_example()
    m = classification_metrics(logits, target, n_bins=5)
    assert m["ece"] == pytest.approx(0.32, abs=1e-6)
    assert m["mce"] == pytest.approx(0.55, abs=1e-6)
    assert expected_calibration_error(logits, target, n_bins=5) == pytest.approx(0.32, abs=1e-6)
    assert maximum_calibration_error(logits, target, n_bins=5) == pytest.approx(0.55, abs=1e-6)
    assert m["top1"] == pytest.approx(60.0)
    assert m["top5"] == pytest.approx(100.0)  # top-min(5, C) = top-2 of 2 classes
    assert m["nll"] == pytest.approx(-sum(math.log(p) for p in HAND_P_TRUE) / 5, abs=1e-6)
    assert m["brier"] == pytest.approx(sum(2 * (1 - p) ** 2 for p in HAND_P_TRUE) / 5, abs=1e-6)
    assert m["brier"] == pytest.approx(0.464, abs=1e-6)


@pytest.mark.parametrize("n_bins", [1, 5, 10, 15, 20])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_calibration_errors_match_torchmetrics(n_bins: int, scale: float):
    logits, target = random_logits(1000, 7, scale, seed=n_bins)
    assert expected_calibration_error(logits, target, n_bins) == pytest.approx(
        torchmetrics_ce(logits, target, n_bins, "l1"), abs=1e-6)
    assert maximum_calibration_error(logits, target, n_bins) == pytest.approx(
        torchmetrics_ce(logits, target, n_bins, "max"), abs=1e-6)


def numpy_ece_mce(logits: torch.Tensor, target: torch.Tensor, n_bins: int) -> tuple[float, float]:
    """Independent fp64 reference: bins [k/n, (k+1)/n) and a bin for confidence exactly 1."""
    probs = torch.softmax(logits.float(), 1).numpy()
    conf, correct = probs.max(1).astype(np.float64), probs.argmax(1) == target.numpy()
    index = np.where(conf == 1.0, n_bins, np.floor(conf * n_bins)).astype(int)
    gaps, weights = [], []
    for k in range(n_bins + 1):
        sel = index == k
        if sel.any():
            gaps.append(abs(correct[sel].mean() - conf[sel].mean()))
            weights.append(sel.mean())
    return float(np.dot(gaps, weights)), float(max(gaps))


def test_large_sample_is_exact_in_fp64_where_torchmetrics_rounds_in_fp32():
    # torchmetrics sums confidences in fp32, so on 20k samples it drifts by ~1e-6; we sum in fp64
    logits, target = random_logits(20000, 7, 3.0, seed=10)
    for n_bins in (10, 15):
        ece, mce = numpy_ece_mce(logits, target, n_bins)
        assert expected_calibration_error(logits, target, n_bins) == pytest.approx(ece, abs=1e-9)
        assert maximum_calibration_error(logits, target, n_bins) == pytest.approx(mce, abs=1e-9)
        assert ece == pytest.approx(torchmetrics_ce(logits, target, n_bins, "l1"), abs=1e-5)


@pytest.mark.parametrize("n_bins", [2, 4, 10, 15])
def test_bin_edges_and_saturated_confidences_match_torchmetrics(n_bins: int):
    # confidences exactly 0.5 (a bin edge for even n_bins) and exactly 1.0 (fp32 softmax of a
    # 200-logit gap), which torchmetrics puts in a bin of its own
    edge = torch.zeros(6, 2)
    saturated = torch.tensor([[200.0, 0.0]] * 9)
    logits = torch.cat([edge, saturated, random_logits(300, 2, 2.0, seed=0)[0]])
    target = torch.cat([torch.tensor([0, 1, 1, 0, 0, 0]), torch.tensor([0] * 6 + [1] * 3),
                        torch.randint(0, 2, (300,), generator=torch.Generator().manual_seed(1))])
    assert (torch.softmax(logits, 1).max(1).values == 1.0).sum() >= 9
    assert expected_calibration_error(logits, target, n_bins) == pytest.approx(
        torchmetrics_ce(logits, target, n_bins, "l1"), abs=1e-6)
    assert maximum_calibration_error(logits, target, n_bins) == pytest.approx(
        torchmetrics_ce(logits, target, n_bins, "max"), abs=1e-6)


def test_classification_metrics_match_sklearn_and_torchmetrics():
    logits, target = random_logits(1500, 12, 2.0, seed=3)
    m = classification_metrics(logits, target)
    probs = torch.softmax(logits.double(), 1).numpy()
    y = target.numpy()
    assert m["top1"] == pytest.approx(100 * top_k_accuracy_score(y, probs, k=1, labels=range(12)), abs=1e-9)
    assert m["top5"] == pytest.approx(100 * top_k_accuracy_score(y, probs, k=5, labels=range(12)), abs=1e-9)
    assert m["nll"] == pytest.approx(log_loss(y, probs, labels=range(12)), abs=1e-5)
    onehot = np.eye(12)[y]
    assert m["brier"] == pytest.approx(((probs - onehot) ** 2).sum(1).mean(), abs=1e-5)
    assert m["ece"] == pytest.approx(torchmetrics_ce(logits, target, 15, "l1"), abs=1e-6)
    assert m["ece10"] == pytest.approx(torchmetrics_ce(logits, target, 10, "l1"), abs=1e-6)
    assert m["mce"] == pytest.approx(torchmetrics_ce(logits, target, 15, "max"), abs=1e-6)
    assert set(m) == {"top1", "top5", "nll", "brier", "ece", "ece10", "mce"}


def test_top5_with_fewer_than_five_classes_is_top_c():
    logits, target = random_logits(50, 3, 1.0, seed=4)
    assert classification_metrics(logits, target)["top5"] == 100.0


def assert_same(a: dict, b: dict, rel: float = 0.0) -> None:
    for key in b:
        assert a[key] == pytest.approx(b[key], abs=1e-9, rel=rel), key


@pytest.mark.parametrize("n_bins", [10, 15])
def test_eval_metrics_in_chunks_equals_whole(n_bins: int):
    logits, target = random_logits(1000, 10, 2.5, seed=5)
    metric = EvalMetrics(num_classes=10, n_bins=n_bins)
    for chunk in (slice(0, 1), slice(1, 300), slice(300, 777), slice(777, 1000)):
        metric.update(logits[chunk], target[chunk])
    out = metric.compute()
    assert_same(out, classification_metrics(logits, target, n_bins=n_bins))
    assert out["ece"] == pytest.approx(torchmetrics_ce(logits, target, n_bins, "l1"), abs=1e-6)
    assert out["ece10"] == pytest.approx(torchmetrics_ce(logits, target, 10, "l1"), abs=1e-6)

    bins = out["bins"]
    assert all(len(bins[k]) == n_bins + 1 for k in ("lower", "upper", "count", "confidence", "accuracy"))
    assert sum(bins["count"]) == 1000
    assert bins["lower"][0] == 0.0 and bins["upper"][n_bins - 1] == pytest.approx(1.0)
    # the per-bin lists reproduce the ECE
    ece = sum(c * abs(a - p) for c, a, p in zip(bins["count"], bins["accuracy"], bins["confidence"]) if c) / 1000
    assert ece == pytest.approx(out["ece"], abs=1e-9)
    assert all((c == 0) == (a is None) for c, a in zip(bins["count"], bins["accuracy"]))

    metric.reset()
    metric.update(logits[:10], target[:10])
    assert_same(metric.compute(), classification_metrics(logits[:10], target[:10], n_bins=n_bins))


def test_eval_metrics_bf16_logits_are_scored_in_fp32():
    logits, target = random_logits(400, 10, 2.0, seed=6)
    logits = logits.bfloat16()
    metric = EvalMetrics(num_classes=10)
    metric.update(logits, target)
    assert_same(metric.compute(), classification_metrics(logits.float(), target))
    assert metric.bins.dtype == torch.float64


def test_eval_metrics_states_merge_like_ddp():
    logits, target = random_logits(600, 10, 2.0, seed=7)
    a, b = EvalMetrics(10), EvalMetrics(10)
    a.update(logits[:250], target[:250])
    b.update(logits[250:], target[250:])
    a.merge_state(b)  # applies each state's dist_reduce_fx, as a DDP sync does
    assert_same(a.compute(), classification_metrics(logits, target))


def _ddp_ranks_metrics(rank: int, world: int, init_file: str) -> dict:
    """Join a gloo group, score this rank's share of one data set, return the synced figures."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        logits, target = random_logits(500, 10, 2.0, seed=8)
        metric = EvalMetrics(10)
        metric.update(logits[rank::world], target[rank::world])
        return {k: v for k, v in metric.compute().items() if k != "bins"}
    finally:
        dist.destroy_process_group()


def test_eval_metrics_sync_across_two_gloo_ranks(tmp_path):
    # rank 1 in a spawned process, rank 0 here (one interpreter start instead of two)
    other = mp.get_context("spawn").Process(target=_ddp_ranks_metrics, args=(1, 2, str(tmp_path / "init")))
    other.start()
    try:
        out = _ddp_ranks_metrics(0, 2, str(tmp_path / "init"))
    finally:
        other.join(timeout=120)
    assert other.exitcode == 0
    logits, target = random_logits(500, 10, 2.0, seed=8)
    assert_same(out, classification_metrics(logits, target))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eval_metrics_on_cuda():
    logits, target = random_logits(800, 10, 2.0, seed=9)
    metric = EvalMetrics(10).to("cuda")
    metric.update(logits.cuda().half(), target.cuda())
    # CUDA's fp32 log-softmax differs from the CPU's in the last bits (seen: NLL 5e-9 apart on an H200)
    assert_same(metric.compute(), classification_metrics(logits.half().float(), target), rel=1e-6)
    assert expected_calibration_error(logits.cuda(), target.cuda()) == pytest.approx(
        expected_calibration_error(logits, target), abs=1e-6)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        classification_metrics(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError):
        EvalMetrics(10).update(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))


def test_top1_is_the_logits_argmax_as_timm_takes_it():
    """Logits 1e-9 apart round to one fp32 softmax value; the prediction is still the larger logit."""
    from timm.utils import accuracy

    logits, target = torch.tensor([[0.0, 1e-9, -5.0], [2.0, 0.0, 1.0]]), torch.tensor([1, 0])
    assert classification_metrics(logits, target)["top1"] == pytest.approx(accuracy(logits, target, topk=(1,))[0].item())
    assert classification_metrics(logits, target)["top1"] == 100.0


def test_nan_or_infinite_logits_are_counted_and_stop_an_evaluation():
    from mergemix.errors import TrainingError
    from mergemix.evaluate import evaluate

    metrics = EvalMetrics(3)
    metrics.update(torch.tensor([[float("nan"), 0.0, 1.0], [0.0, 1.0, 2.0], [float("inf"), 0.0, 0.0]]),
                   torch.tensor([0, 2, 0]))
    assert metrics.compute()["nonfinite"] == 2

    class Broken(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 3), float("nan"))

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1), torch.zeros(4).long()),
                                         batch_size=2)
    with pytest.raises(TrainingError, match="4 evaluation images got NaN or infinite logits"):
        evaluate(Broken(), loader, 3, 15, torch.device("cpu"), show=False)


def test_evaluate_starts_a_cuda_graph_generation_before_every_batch(monkeypatch):
    """Under torch.compile's reduce-overhead, CUDA-graph trees replay a graph only once a new
    generation starts or every output of the last call is dead; after training has marked its
    steps, only a mark does it. So each batch's forward must follow a mark of its own."""
    from mergemix.evaluate import evaluate

    events = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("mark"))

    class Recorder(torch.nn.Module):
        def forward(self, x):
            events.append("forward")
            return torch.zeros(x.shape[0], 3)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(5, 1), torch.zeros(5).long()),
                                         batch_size=2)
    evaluate(Recorder(), loader, 3, 15, torch.device("cpu"), show=False)
    assert events == ["mark", "forward"] * 3


def test_confidence_on_an_fp32_linspace_edge_lands_where_torchmetrics_puts_it():
    # 5 equal logits give a confidence of fp32(0.2) = 0.2000000030; torchmetrics' fp32 linspace puts
    # the 15-bin edge 3/15 at 0.2000000179, so these samples fall in bin 2 [2/15, 3/15), not bin 3
    uniform, peaked = torch.zeros(4, 5), torch.tensor([[0.2, 0, 0, 0, 0]] * 4)  # peaked: p = 0.2339, in bin 3
    logits, target = torch.cat([uniform, peaked]), torch.tensor([0] * 4 + [1] * 4)  # uniform right, peaked wrong
    assert torch.softmax(logits, 1).max(1).values[0].item() == torch.tensor(0.2).item()
    p = torch.softmax(peaked, 1).max(1).values[0].item()
    # own bins: gaps 0.8 (4 right at 0.2) and p (4 wrong at p); merged into one bin it would be (0.2 + p) / 2 - 0.5
    assert expected_calibration_error(logits, target, 15) == pytest.approx((4 * 0.8 + 4 * p) / 8, abs=1e-6)
    assert maximum_calibration_error(logits, target, 15) == pytest.approx(0.8, abs=1e-6)
    assert expected_calibration_error(logits, target, 15) == pytest.approx(
        torchmetrics_ce(logits, target, 15, "l1"), abs=1e-6)


def test_rejects_probabilities_and_bad_targets_with_one_line_errors():
    """Probabilities would pass through a second softmax and give a near-uniform confidence (ECE
    and NLL silently wrong); out-of-range or float targets would give torch's errors (a device-side
    assert on CUDA)."""
    logits, target = random_logits(64, 10, 2.0, seed=3)
    metric = EvalMetrics(10)
    with pytest.raises(ValueError, match=r"probabilities .*torch\.log\(probs\)"):
        metric.update(torch.softmax(logits, dim=1), target)
    # their log is accepted and gives the logits' figures back
    assert_same(classification_metrics(torch.softmax(logits, dim=1).log(), target),
                classification_metrics(logits, target), rel=1e-5)
    with pytest.raises(ValueError, match="target holds class 10, outside 0..9"):
        metric.update(logits, torch.full((64,), 10))
    with pytest.raises(ValueError, match="target holds class -1"):
        classification_metrics(logits, torch.full((64,), -1))
    with pytest.raises(ValueError, match="integer dtype"):
        classification_metrics(logits, target.float())
    assert int(metric.n) == 0  # nothing half-added
    for figure in (expected_calibration_error, maximum_calibration_error):  # the public helpers check too
        with pytest.raises(ValueError, match="probabilities"):
            figure(torch.softmax(logits, dim=1), target)
        with pytest.raises(ValueError, match="outside 0..9"):
            figure(logits, target + 10)
    # a 2-class batch of one whose logits happen to sum to 1 is too likely to be refused
    assert classification_metrics(torch.tensor([[0.3, 0.7]]), torch.tensor([1]))["top1"] == 100.0


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_targets_of_any_integer_dtype_give_the_int64_figures(dtype):
    logits, target = random_logits(64, 10, 2.0, seed=4)
    metric = EvalMetrics(10)
    metric.update(logits, target.to(dtype))
    assert_same(metric.compute(), classification_metrics(logits, target))
