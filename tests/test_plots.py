"""Figures are written as PNGs of the expected size and are not blank; drawing helpers on hand examples."""
from __future__ import annotations

import csv

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from mergemix.errors import DataError
from mergemix.metrics import EvalMetrics
from mergemix.mix import StepOutput
from mergemix.plots import (
    _cluster_boundaries,
    _display_bins,
    bins_ece,
    mix_grid,
    overlay_reliability,
    reliability_diagram,
    training_curves,
)


BACKEND = matplotlib.get_backend()


def read_png(path) -> np.ndarray:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(path)


def assert_picture(path, height: int, width: int) -> None:
    image = read_png(path)
    assert image.shape[:2] == (height, width)
    assert image[..., :3].std() > 0.05  # not blank


def eval_bins(seed: int, scale: float, saturated: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(500, 10, generator=g) * scale
    logits[:saturated, 0] = 200.0  # confidence exactly 1.0: the extra bin
    target = torch.where(torch.rand(500, generator=g) < 0.6, logits.argmax(1), torch.randint(0, 10, (500,), generator=g))
    metric = EvalMetrics(10)
    metric.update(logits, target)
    return metric.compute()


@pytest.mark.parametrize("confidence", [0.15, 0.5, 0.95])
def test_reliability_legends_cover_no_bar(tmp_path, monkeypatch, confidence):
    """Wherever the confidence mass lies (an under-confident mixup run's: at the left), no bar hides
    behind a legend, in either panel."""
    from mergemix import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    edges = np.linspace(0, 1, 16)
    centre = np.clip(edges[:-1] + 1 / 30, 0, 1)
    count = np.round(1000 * np.exp(-((centre - confidence) / 0.08) ** 2)).astype(int)
    bins = {"lower": edges[:-1].tolist(), "upper": edges[1:].tolist(), "count": count.tolist(),
            "confidence": centre.tolist(), "accuracy": np.clip(centre + 0.3, 0, 1).tolist()}
    reliability_diagram(bins, tmp_path / "r.png")
    fig = drawn[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        bars = [p.get_window_extent(renderer) for p in ax.patches if p.get_height() > 0]
        assert bars and not any(legend.overlaps(bar) for bar in bars), (ax.get_ylabel(), confidence)


def test_reliability_diagram(tmp_path):
    out = eval_bins(0, 3.0, saturated=20)
    path = reliability_diagram(out["bins"], tmp_path / "sub" / "reliability.png", title="test run")
    assert path == tmp_path / "sub" / "reliability.png"
    assert_picture(path, 700, 600)
    assert bins_ece(out["bins"]) == pytest.approx(out["ece"], abs=1e-9)


# five bins of width 0.2, the first empty, and the saturated bin [1, 1]; the diagram pools the latter
# into the top bar: 60 samples, confidence (40 * 0.9 + 20 * 1.0) / 60 = 0.9333, accuracy (40 * 0.8 + 20 * 0.95) / 60
# = 0.85; ECE (10 * 0.1 + 30 * 0.05 + 50 * 0 + 40 * 0.1 + 20 * 0.05) / 150 = 0.05
HAND_BINS = {"lower": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], "upper": [0.2, 0.4, 0.6, 0.8, 1.0, 1.0],
             "count": [0, 10, 30, 50, 40, 20], "confidence": [None, 0.3, 0.5, 0.7, 0.9, 1.0],
             "accuracy": [None, 0.4, 0.45, 0.7, 0.8, 0.95]}


def drawn_figures(monkeypatch) -> list:
    from mergemix import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    return drawn


def test_reliability_diagram_draws_the_bins_it_is_given(tmp_path, monkeypatch):
    """Top: a bar per non-empty bin as high as its accuracy, and a gap bar from there to its mean
    confidence; bottom: each bin's share of the samples; the title's ECE. All from HAND_BINS by hand."""
    drawn = drawn_figures(monkeypatch)
    reliability_diagram(HAND_BINS, tmp_path / "r.png", title="hand")
    top, bottom = drawn[0].axes
    bars = {c.get_label(): c.patches for c in top.containers}
    assert set(bars) == {"accuracy", "gap to mean confidence"}
    acc, gap = bars["accuracy"], bars["gap to mean confidence"]
    assert [p.get_x() for p in acc] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert [p.get_width() for p in acc] == pytest.approx([0.2] * 4)
    assert [p.get_y() for p in acc] == [0] * 4
    assert [p.get_height() for p in acc] == pytest.approx([0.4, 0.45, 0.7, 0.85])
    assert [p.get_x() for p in gap] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert [p.get_y() for p in gap] == pytest.approx([0.4, 0.45, 0.7, 0.85])  # from the accuracy ...
    assert [p.get_y() + p.get_height() for p in gap] == pytest.approx([0.3, 0.5, 0.7, 56 / 60])  # ... to the confidence
    assert [abs(p.get_height()) for p in gap] == pytest.approx([0.1, 0.05, 0.0, 56 / 60 - 0.85])
    (share,) = bottom.containers
    assert [p.get_height() for p in share.patches] == pytest.approx([0, 10 / 150, 30 / 150, 50 / 150, 60 / 150])
    assert top.get_title() == "hand\nECE 0.0500  (5 bins, n=150)"


def test_overlay_reliability_draws_each_runs_non_empty_bins(tmp_path, monkeypatch):
    """One line per run through (mean confidence, accuracy) of its non-empty bins, ECE in its label;
    below, its share of samples per bin as steps over the bin edges."""
    thirds = {"lower": [0, 1 / 3, 2 / 3, 1.0], "upper": [1 / 3, 2 / 3, 1.0, 1.0], "count": [5, 0, 15, 0],
              "confidence": [0.2, None, 0.8, None], "accuracy": [0.4, None, 0.6, None]}  # ECE 0.2
    drawn = drawn_figures(monkeypatch)
    overlay_reliability({"hand": HAND_BINS, "thirds": thirds}, tmp_path / "o.png")
    top, bottom = drawn[0].axes
    lines = {line.get_label(): line for line in top.lines}
    assert set(lines) == {"perfect calibration", "hand (ECE 0.0500)", "thirds (ECE 0.2000)"}
    hand, third = lines["hand (ECE 0.0500)"], lines["thirds (ECE 0.2000)"]
    assert list(hand.get_xdata()) == pytest.approx([0.3, 0.5, 0.7, 56 / 60])
    assert list(hand.get_ydata()) == pytest.approx([0.4, 0.45, 0.7, 0.85])
    assert list(third.get_xdata()) == pytest.approx([0.2, 0.8]) and list(third.get_ydata()) == pytest.approx([0.4, 0.6])
    steps = [p.get_data() for p in bottom.patches]
    assert len(steps) == 2
    assert list(steps[0].values) == pytest.approx([0, 10 / 150, 30 / 150, 50 / 150, 60 / 150])
    assert list(steps[0].edges) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert list(steps[1].values) == pytest.approx([0.25, 0, 0.75]) and list(steps[1].edges) == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_display_bins_pool_saturated_bin_into_top_bar():
    out = eval_bins(1, 3.0, saturated=20)
    bins, d = out["bins"], _display_bins(out["bins"])
    assert len(bins["count"]) == 16 and bins["count"][-1] >= 20
    assert len(d["count"]) == 15 and d["count"].sum() == 500
    assert d["count"][-1] == bins["count"][-2] + bins["count"][-1]
    top = [k for k in (-2, -1) if bins["count"][k]]
    expected = sum(bins["accuracy"][k] * bins["count"][k] for k in top) / d["count"][-1]
    assert d["accuracy"][-1] == pytest.approx(expected)
    assert np.isnan(d["accuracy"][d["count"] == 0]).all()


def test_overlay_reliability(tmp_path):
    runs = {"cutmix": eval_bins(2, 1.0)["bins"], "mergemix": eval_bins(3, 4.0)["bins"]}
    assert_picture(overlay_reliability(runs, tmp_path / "overlay.png"), 700, 700)
    with pytest.raises(ValueError):
        overlay_reliability({}, tmp_path / "empty.png")


def test_training_curves(tmp_path, monkeypatch):
    csv_path = tmp_path / "summary.csv"
    header = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "eval_ece", "lr", "epoch_time"]
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for e in range(6):
            w.writerow([e, 2.0 / (e + 1), 2.2 / (e + 1), 40 + 8 * e, 70 + 4 * e, 0.2 - 0.02 * e, 1e-3, 3.5])
        w.writerow([6, 0.3, "", "", "", "", 1e-3, 3.5])  # an epoch without evaluation
    assert_picture(training_curves(csv_path, tmp_path / "curves.png"), 450, 1500)
    # epochs from 1, as the console counts them ("epoch   1/7"); summary.csv counts from 0
    from mergemix import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    training_curves(csv_path, tmp_path / "curves.png")
    loss_panel = drawn[0].axes[0]
    assert [list(line.get_xdata()) for line in loss_panel.lines] == [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6]]
    # a one-epoch run: its panels' ticks in view are the epoch 1 alone, not fractions around it
    with open(tmp_path / "one.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, [0, 2.0, 2.2, 40, 70, 0.2, 1e-3, 3.5]])
    training_curves(tmp_path / "one.csv", tmp_path / "one.png")
    for ax in drawn[-1].axes:
        lo, hi = ax.get_xlim()
        assert [t for t in ax.get_xticks() if lo <= t <= hi] == [1], ax.get_ylabel()
    monkeypatch.undo()

    # the EMA's columns are drawn too: the same run with them gives another picture
    with open(tmp_path / "ema.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header + ["ema_eval_top1", "ema_eval_ece"])
        for e in range(6):
            w.writerow([e, 2.0 / (e + 1), 2.2 / (e + 1), 40 + 8 * e, 70 + 4 * e, 0.2 - 0.02 * e, 1e-3, 3.5,
                        30 + 5 * e, 0.3 - 0.01 * e])
    with open(tmp_path / "no_ema.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for e in range(6):
            w.writerow([e, 2.0 / (e + 1), 2.2 / (e + 1), 40 + 8 * e, 70 + 4 * e, 0.2 - 0.02 * e, 1e-3, 3.5])
    with_ema = mpimg.imread(training_curves(tmp_path / "ema.csv", tmp_path / "ema.png"))
    without = mpimg.imread(training_curves(tmp_path / "no_ema.csv", tmp_path / "no_ema.png"))
    assert with_ema.shape == without.shape and not np.array_equal(with_ema, without)

    # a header alone, or bytes that are no text: one-line errors naming the file, and no figure
    (tmp_path / "empty.csv").write_text(",".join(header) + "\n")
    with pytest.raises(DataError, match="empty.csv has no rows"):
        training_curves(tmp_path / "empty.csv", tmp_path / "none.png")
    (tmp_path / "binary.csv").write_bytes(b"epoch,eval_top1\n0,\xff\n")
    with pytest.raises(DataError, match="binary.csv: not UTF-8 text"):
        training_curves(tmp_path / "binary.csv", tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_token_tint_gives_the_patches_of_one_token_one_colour():
    """Token 0 holds the two diagonal patches of a 2x2 grid, which do not touch: one colour for both."""
    from mergemix.plots import _token_tint

    tint = _token_tint(np.full((4, 4, 1), 0.5), np.array([[0, 1], [1, 0]]))
    assert tint.shape == (4, 4, 3)
    assert np.array_equal(tint[0, 0], tint[3, 3]) and np.array_equal(tint[0, 3], tint[3, 0])
    assert not np.array_equal(tint[0, 0], tint[0, 3])
    assert np.array_equal(tint[:2, :2], np.broadcast_to(tint[0, 0], (2, 2, 3)))  # constant over a patch


def test_cluster_boundaries_on_hand_example():
    # 2 x 3 patch grid over a 4 x 6 image (2 px patches): top row token 0, bottom row tokens 1, 1, 2
    index = np.array([[0, 0, 0], [1, 1, 2]])
    seg = {tuple(map(tuple, s)) for s in _cluster_boundaries(index, 4, 6).tolist()}
    horizontal = {((j * 2 - 0.5, 1.5), ((j + 1) * 2 - 0.5, 1.5)) for j in range(3)}
    vertical = {((3.5, 1.5), (3.5, 3.5))}
    assert seg == horizontal | vertical
    assert _cluster_boundaries(np.zeros((3, 3), int), 6, 6).shape == (0, 2, 2)


class FakeReadout:
    def __init__(self, index: torch.Tensor, grid: tuple[int, int]):
        self.index, self.grid = index, grid


def fake_step(B: int, C: int, H: int, W: int, patch: int, attention: bool) -> tuple[torch.Tensor, StepOutput]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g)
    gh, gw = H // patch, W // patch
    partner = torch.roll(torch.arange(B), 1)
    mask = torch.zeros(B, 1, H, W)
    mask[..., : H // 2, : W // 2] = 1
    out = StepOutput(loss=torch.tensor(1.0), logits=torch.zeros(B, 10), x_mixed=mask * x + (1 - mask) * x[partner],
                     mask=mask, lam=torch.rand(B, generator=g), lam_hat=torch.rand(B, generator=g), partner=partner)
    if attention:
        out.scores = torch.rand(B, gh * gw, generator=g)
        index = torch.arange(gh * gw).reshape(gh, gw) // 2  # horizontal pairs of patches merged
        out.extras["readout"] = FakeReadout(index.flatten().expand(B, -1), (gh, gw))
    return x, out


@pytest.mark.parametrize("C", [1, 3])
def test_mix_grid_with_attention_columns(tmp_path, C: int):
    x, out = fake_step(B=5, C=C, H=32, W=32, patch=4, attention=True)
    path = mix_grid(x, out, tmp_path / "grid.png", mean=[0.5] * C, std=[0.25] * C, max_samples=3)
    assert_picture(path, 3 * 200, 6 * 200)  # original, partner, attention, clusters, mask, mixed


def test_mix_grid_draws_every_attention_map_on_one_scale(tmp_path, monkeypatch):
    """A flat map must not glow as bright as a peaked one: one colour scale, 0 to the largest score shown
    (the rows past max_samples do not count), and each panel's own maximum in its title."""
    from mergemix import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    x, out = fake_step(B=3, C=1, H=32, W=32, patch=4, attention=True)
    out.scores = torch.stack([torch.full((64,), 0.02), torch.linspace(0, 0.3, 64), torch.full((64,), 0.9)])
    mix_grid(x, out, tmp_path / "grid.png", max_samples=2)
    maps = [ax for ax in drawn[0].axes if ax.get_title().startswith("attention")]
    assert [ax.images[0].get_clim() for ax in maps] == [(0.0, pytest.approx(0.3))] * 2
    assert [ax.get_title() for ax in maps] == ["attention (max 0.020)", "attention (max 0.300)"]
    out.extras["scores_of"] = "mixed"  # TransMix's and TokenMix's: the mixed images' attention
    mix_grid(x, out, tmp_path / "grid.png", max_samples=1)
    assert [ax.get_title() for ax in drawn[1].axes if ax.get_title().startswith("attention")] == [
        "attention on mixed (max 0.020)"]


def test_mix_grid_box_method_omits_attention_columns(tmp_path):
    x, out = fake_step(B=4, C=3, H=24, W=32, patch=8, attention=False)
    assert_picture(mix_grid(x, out, tmp_path / "grid.png"), 4 * 200, 4 * 200)  # original, partner, mask, mixed
    plain = StepOutput(loss=torch.tensor(0.0), logits=torch.zeros(4, 10))
    assert_picture(mix_grid(x, plain, tmp_path / "plain.png", max_samples=2), 2 * 200, 200)


def test_mix_grid_wraps_a_title_wider_than_its_columns(tmp_path, monkeypatch):
    """One 200 px column under viz's title for --mix none: the title wraps onto lines that fit the
    figure (each line after the first adds 16 px) instead of running past its edges."""
    from mergemix import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    x, _ = fake_step(B=2, C=3, H=24, W=32, patch=8, attention=False)
    plain = StepOutput(loss=torch.tensor(0.0), logits=torch.zeros(2, 10))
    mix_grid(x, plain, tmp_path / "plain.png", title="--mix none, untrained model, eval split, seed 0")
    fig = drawn[0]
    [title] = fig.texts
    lines = title.get_text().split("\n")
    assert len(lines) > 1 and " ".join(lines) == "--mix none, untrained model, eval split, seed 0"
    assert fig.get_figheight() * 100 == pytest.approx(2 * 200 + 30 + 16 * (len(lines) - 1))
    renderer = FigureCanvasAgg(fig).get_renderer()
    box = title.get_window_extent(renderer)
    assert 0 <= box.x0 and box.x1 <= fig.get_figwidth() * 100 and box.y1 <= fig.get_figheight() * 100
    # below the title, clear of the panels' titles
    assert box.y0 > max(ax.title.get_window_extent(renderer).y1 for ax in fig.axes)


def test_mix_grid_rejects_scores_that_do_not_fit_the_patch_size(tmp_path):
    x, out = fake_step(B=2, C=3, H=32, W=32, patch=4, attention=True)
    with pytest.raises(ValueError, match="patch_size"):
        mix_grid(x, out, tmp_path / "grid.png", patch_size=8)


def test_plots_draw_with_agg_and_leave_the_global_backend_alone(tmp_path):
    # drawing never goes through pyplot's current backend, so a user's (here svg) is neither needed nor changed
    matplotlib.use("svg")
    try:
        assert_picture(overlay_reliability({"a": eval_bins(4, 2.0)["bins"]}, tmp_path / "x.png"), 700, 700)
        assert matplotlib.get_backend().lower() == "svg"
    finally:
        matplotlib.use(BACKEND)


def test_reliability_diagram_gap_bars_span_their_bins_and_the_histogram_marks_the_overall_figures(tmp_path,
                                                                                                    monkeypatch):
    """The gap bars are as wide as the bins they sit on; the lines over the histogram stand at the overall
    accuracy and the count-weighted mean confidence of HAND_BINS: (10 * 0.4 + 30 * 0.45 + 50 * 0.7 + 40 * 0.8
    + 20 * 0.95) / 150 = 0.69 and (10 * 0.3 + 30 * 0.5 + 50 * 0.7 + 40 * 0.9 + 20 * 1.0) / 150 = 109 / 150."""
    drawn = drawn_figures(monkeypatch)
    reliability_diagram(HAND_BINS, tmp_path / "r.png")
    top, bottom = drawn[0].axes
    gap = {c.get_label(): c.patches for c in top.containers}["gap to mean confidence"]
    assert [p.get_width() for p in gap] == pytest.approx([0.2] * 4)
    marks = {line.get_label(): line.get_xdata() for line in bottom.lines}
    assert set(marks) == {"accuracy 69.0%", "mean confidence 72.7%"}
    assert list(marks["accuracy 69.0%"]) == pytest.approx([0.69, 0.69])
    assert list(marks["mean confidence 72.7%"]) == pytest.approx([109 / 150] * 2)


def test_training_curves_draw_each_column_under_its_name(tmp_path, monkeypatch):
    """Each curve's values are its own column of summary.csv (written here by hand)."""
    csv_path = tmp_path / "summary.csv"
    rows = [dict(epoch=e, train_loss=3.0 - e, eval_loss=2.5 - e / 2, eval_top1=40 + 8 * e, eval_top5=70 + 4 * e,
                 eval_ece=0.2 - 0.02 * e, ema_eval_top1=30 + 5 * e, ema_eval_ece=0.3 - 0.01 * e) for e in range(3)]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    drawn = drawn_figures(monkeypatch)
    training_curves(csv_path, tmp_path / "c.png")
    drawn_columns = [{line.get_label(): list(line.get_ydata()) for line in ax.lines} for ax in drawn[0].axes]
    column = {key: [row[key] for row in rows] for key in rows[0]}
    assert drawn_columns == [
        {"train (objective)": column["train_loss"], "eval (cross-entropy)": column["eval_loss"]},
        {"eval top-1": column["eval_top1"], "eval top-5": column["eval_top5"],
         "EMA eval top-1": column["ema_eval_top1"]},
        {"eval ECE": pytest.approx(column["eval_ece"]), "EMA eval ECE": pytest.approx(column["ema_eval_ece"])},
    ]


def test_mix_grid_panels_show_the_steps_tensors(tmp_path, monkeypatch):
    """Each panel's image is the tensor it names, computed here by hand: the original and its partner
    un-normalised (x * std + mean, clipped to [0, 1]), the scores on the 3 x 4 patch grid of a 24 x 32
    image (8 px patches), the mask as given (1: the sample's own pixels), the mixed image, and λ, λ̂."""
    drawn = drawn_figures(monkeypatch)
    x, out = fake_step(B=3, C=3, H=24, W=32, patch=8, attention=True)
    out.lam, out.lam_hat = torch.tensor([0.11, 0.22, 0.33]), torch.tensor([0.66, 0.77, 0.88])
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    mix_grid(x, out, tmp_path / "grid.png", mean=mean, std=std, patch_size=8)
    axes = np.asarray(drawn[0].axes).reshape(3, 6)

    def shown(images: torch.Tensor) -> np.ndarray:  # (C, H, W) normalised -> (H, W, C) in [0, 1]
        pixels = images.numpy().transpose(1, 2, 0) * np.array(std) + np.array(mean)
        return np.clip(pixels, 0, 1)

    for b, (original, partner, attention, _, mask, mixed) in enumerate(axes):
        j = (b - 1) % 3  # fake_step's partners: torch.roll(arange(3), 1)
        assert np.allclose(original.images[0].get_array(), shown(x[b]), atol=1e-6)
        assert partner.get_title() == f"partner #{j}"
        assert np.allclose(partner.images[0].get_array(), shown(x[j]), atol=1e-6)
        assert attention.images[0].get_array().shape == (3, 4)
        assert np.allclose(attention.images[0].get_array(), out.scores[b].numpy().reshape(3, 4))
        top_left = np.zeros((24, 32))
        top_left[:12, :16] = 1
        assert np.array_equal(mask.images[0].get_array(), top_left)
        assert mask.get_title() == "mask (kept 0.25)"
        assert np.allclose(mixed.images[0].get_array(), shown(out.x_mixed[b]), atol=1e-6)
        assert not np.allclose(mixed.images[0].get_array(), shown(x[b]), atol=1e-3)
        assert mixed.get_title() == f"mixed λ={0.11 * (b + 1):.2f} λ̂={0.66 + 0.11 * b:.2f}"
