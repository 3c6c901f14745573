"""Figures: reliability diagrams, training curves, and the grid of mixed samples.

Each is written in the image format its file name's suffix names (``FORMATS``: png, pdf, svg, ...).

Figures are drawn with matplotlib's object API on an Agg canvas, never through ``pyplot``, so
importing this module changes no global backend and works headless and from worker threads.
"""
from __future__ import annotations

import csv
import io
import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from .checkpoint import TMP_NAME_EXTRA, check_names, holds_training_run, read_text
from .errors import ConfigError, DataError

__all__ = ["FORMATS", "bins_ece", "figure_format", "mix_grid", "overlay_reliability", "read_summary",
           "reliability_diagram", "training_curves"]

DPI = 100
ACCURACY_COLOR = "#3b6fb6"
GAP_COLOR = "#d9534f"
# what savefig writes, by suffix; not pgf: LaTeX code that needs a TeX installation to be written at all
FORMATS = tuple(sorted(set(FigureCanvasAgg.get_supported_filetypes()) - {"pgf"}))


def figure_format(path: str | Path) -> str:
    """The format of ``path``'s suffix, lower case (``fig.PDF`` -> ``pdf``); ValueError if not in ``FORMATS``."""
    fmt = Path(path).suffix.lower().removeprefix(".")
    if fmt not in FORMATS:
        raise ValueError(f"{Path(path).name} does not end in an image format's suffix: "
                         f"use one of {', '.join('.' + f for f in FORMATS)}")
    return fmt


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` at ``path`` (parent folders created) in the format of its suffix; return the path."""
    path = Path(path)
    fmt = figure_format(path)  # before the folder: a bad name leaves nothing behind
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format=fmt, dpi=DPI)
    return path


def bins_ece(bins: Mapping[str, Sequence]) -> float:
    """ECE (fraction) of per-bin lists as ``metrics.reliability_bins`` writes them."""
    total = sum(bins["count"])
    return sum(c * abs(a - p) for c, a, p in zip(bins["count"], bins["accuracy"], bins["confidence"]) if c) / max(total, 1)


def _display_bins(bins: Mapping[str, Sequence]) -> dict[str, np.ndarray]:
    """Per-bin arrays for drawing: a zero-width bin (confidence exactly 1.0) is pooled into the bin
    that ends where it lies, so the diagram shows ``n_bins`` bars; ``metrics`` scores it separately.

    Returns float arrays ``lower``, ``width``, ``count``, ``confidence``, ``accuracy`` (NaN where a
    bin is empty).
    """
    lower, width, count, conf_sum, acc_sum = [], [], [], [], []
    for lo, hi, c, p, a in zip(bins["lower"], bins["upper"], bins["count"], bins["confidence"], bins["accuracy"]):
        p_sum, a_sum = (p * c, a * c) if c else (0.0, 0.0)
        if hi <= lo and lower:
            count[-1] += c
            conf_sum[-1] += p_sum
            acc_sum[-1] += a_sum
            continue
        lower.append(lo)
        width.append(hi - lo)
        count.append(c)
        conf_sum.append(p_sum)
        acc_sum.append(a_sum)
    n = np.asarray(count, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"lower": np.asarray(lower), "width": np.asarray(width), "count": n,
                "confidence": np.where(n > 0, np.asarray(conf_sum) / n, np.nan),
                "accuracy": np.where(n > 0, np.asarray(acc_sum) / n, np.nan)}


def _accuracy_axes(ax: Axes) -> None:
    ax.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)


def _share_axes(ax: Axes) -> None:
    """The confidence histogram under a reliability plot: share of samples per confidence."""
    ax.set_xlabel("confidence (top softmax probability)")
    ax.set_ylabel("share of samples")
    ax.grid(alpha=0.3)


def reliability_diagram(bins: Mapping[str, Sequence], path: str | Path, title: str = "") -> Path:
    """Reliability diagram of one evaluation (600 x 700 px as PNG).

    bins: per-bin lists ``lower``, ``upper``, ``count``, ``confidence``, ``accuracy`` (as in
    ``EvalMetrics.compute()['bins']``). Top: accuracy per bin as bars, the diagonal, and the gap
    between accuracy and mean confidence shaded; bottom: share of samples per confidence bin, with
    the overall accuracy and mean confidence marked. The title carries ``title`` and the ECE.
    """
    d = _display_bins(bins)
    filled = d["count"] > 0
    total = max(d["count"].sum(), 1.0)
    fig = Figure(figsize=(6, 7))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    _accuracy_axes(top)
    x, w = d["lower"][filled], d["width"][filled]
    acc, conf = d["accuracy"][filled], d["confidence"][filled]
    top.bar(x, acc, width=w, align="edge", color=ACCURACY_COLOR, edgecolor="black", lw=0.5, label="accuracy")
    # hatched but unfilled: where a bin is under-confident the gap lies inside its accuracy bar, and a
    # filled gap would make that bar seem to end at the confidence
    top.bar(x, conf - acc, bottom=acc, width=w, align="edge", facecolor="none", edgecolor=GAP_COLOR,
            hatch="//", lw=0.5, label="gap to mean confidence")
    top.legend(loc="best", fontsize=9)  # an under-confident model's tall bars fill the upper left
    ece = bins_ece(bins)
    figures = f"ECE {ece:.4f}  ({len(d['count'])} bins, n={int(total)})"
    top.set_title(f"{title}\n{figures}" if title else figures, fontsize=10)

    bottom.bar(d["lower"], d["count"] / total, width=d["width"], align="edge", color="0.6", edgecolor="black", lw=0.5)
    overall_acc = float(np.nansum(d["accuracy"] * d["count"]) / total)
    overall_conf = float(np.nansum(d["confidence"] * d["count"]) / total)
    bottom.axvline(overall_acc, color=ACCURACY_COLOR, lw=1.5, label=f"accuracy {100 * overall_acc:.1f}%")
    bottom.axvline(overall_conf, color=GAP_COLOR, lw=1.5, ls="--", label=f"mean confidence {100 * overall_conf:.1f}%")
    _share_axes(bottom)
    # headroom over the tallest bar, where the legend goes unless "best" finds a better place
    bottom.set_ylim(0, 1.6 * float((d["count"] / total).max()) or 1.0)
    bottom.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def overlay_reliability(named_bins: Mapping[str, Mapping[str, Sequence]], path: str | Path) -> Path:
    """Reliability curves of several runs on one figure (700 x 700 px as PNG).

    named_bins: run label -> per-bin lists (as for ``reliability_diagram``). Top: accuracy against
    mean confidence of each non-empty bin, one line per run, ECE in the legend; bottom: each run's
    confidence histogram as a step line.
    """
    if not named_bins:
        raise ValueError("overlay_reliability needs at least one run")
    fig = Figure(figsize=(7, 7))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    _accuracy_axes(top)
    for i, (name, bins) in enumerate(named_bins.items()):
        d = _display_bins(bins)
        filled = d["count"] > 0
        # a line style and marker per run as well as a colour: equal curves must not hide each other
        style = {"ls": ("-", "--", ":", "-.")[i % 4], "lw": 1.5}
        line, = top.plot(d["confidence"][filled], d["accuracy"][filled], marker="osD^v"[i % 5], ms=5 - i % 3,
                         label=f"{name} (ECE {bins_ece(bins):.4f})", **style)
        edges = np.append(d["lower"], d["lower"][-1] + d["width"][-1])
        bottom.stairs(d["count"] / max(d["count"].sum(), 1.0), edges, color=line.get_color(), **style)
    # where the curves leave room: under-confident runs climb through the upper left, over-confident
    # ones sag through the lower right
    top.legend(loc="best", fontsize=8)
    top.set_title("reliability")
    _share_axes(bottom)
    fig.tight_layout()
    return _save(fig, path)


def number(value: Any) -> float:
    """``float(value)``, or NaN where that fails (an empty or missing cell, a word, None)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_summary(summary_csv: str | Path) -> dict[str, np.ndarray]:
    """Columns of a run's summary.csv as float arrays, one value per epoch (NaN where a cell is empty
    or not a number); no columns if it has no rows. A file that is not UTF-8 CSV is a ``DataError``."""
    try:
        rows = list(csv.DictReader(io.StringIO(read_text(Path(summary_csv)), newline="")))
    except csv.Error as err:
        raise DataError(f"{summary_csv}: not readable as CSV ({err})") from None
    return {key: np.array([number(row.get(key)) for row in rows]) for key in rows[0]} if rows else {}


def training_curves(summary_csv: str | Path, path: str | Path) -> Path:
    """Loss, top-1 and ECE per epoch from a run's summary.csv (1500 x 450 px as PNG).

    summary_csv: columns epoch, train_loss, eval_loss, eval_top1, eval_top5, eval_ece, lr,
    epoch_time, with an EMA ema_eval_loss, ema_eval_top1, ema_eval_ece, and with ``--eval-merged`` merged_eval_loss,
    merged_eval_top1, merged_eval_ece (missing columns or cells are skipped).
    ECE is a fraction, as in results.json. Epochs are drawn from 1, as the console's epoch lines count
    them (summary.csv and results.json count from 0). The train loss is the method's whole objective (MergeMix's
    mixed plus clean loss), so it need not sit near the eval loss.
    """
    cols = read_summary(summary_csv)
    if not cols:
        raise DataError(f"{summary_csv} has no rows")
    epoch = cols.get("epoch", np.arange(len(next(iter(cols.values())))))
    fig = Figure(figsize=(15, 4.5))
    panels = fig.subplots(1, 3)
    spec = [("loss", [("train_loss", "train (objective)"), ("eval_loss", "eval (cross-entropy)"),
                      ("ema_eval_loss", "EMA eval (cross-entropy)"),
                      ("merged_eval_loss", "merged eval (cross-entropy)")]),
            ("accuracy (%)", [("eval_top1", "eval top-1"), ("eval_top5", "eval top-5"),
                              ("ema_eval_top1", "EMA eval top-1"), ("merged_eval_top1", "merged eval top-1")]),
            ("ECE", [("eval_ece", "eval ECE"), ("ema_eval_ece", "EMA eval ECE"),
                     ("merged_eval_ece", "merged eval ECE")])]
    for ax, (label, series) in zip(panels, spec):
        for key, name in series:
            if key in cols and np.isfinite(cols[key]).any():
                ok = np.isfinite(cols[key])
                ax.plot(epoch[ok] + 1, cols[key][ok], marker="o", ms=3, label=name)
        ax.set_xlabel("epoch (as the console counts them: 1 is the first)")
        # min_n_ticks 1: a one-epoch run gets the tick 1, not 0.945, 0.96, ... (integers need 2 in view by default)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _display_map(x: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None
                 ) -> Callable[[Tensor], np.ndarray]:
    """A function taking (N, C, H, W) images normalised like ``x`` to (N, H, W, C) floats in [0, 1].

    With ``mean``/``std`` (per channel) the normalisation is undone and the result clipped; without,
    the range of ``x`` is mapped onto [0, 1], the same map for every panel drawn with it.
    """
    if mean is not None and std is not None:
        scale, shift = torch.as_tensor(std, dtype=torch.float32), torch.as_tensor(mean, dtype=torch.float32)
    else:
        lo, hi = float(x.min()), float(x.max())
        scale = torch.tensor([1.0 / max(hi - lo, 1e-12)])
        shift = -lo * scale

    def convert(images: Tensor) -> np.ndarray:
        images = images.detach().float().cpu() * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
        return images.clamp(0, 1).permute(0, 2, 3, 1).numpy()

    return convert


def _patch_grid(num_patches: int, height: int, width: int, patch_size: int | Sequence[int] | None,
                grid: Sequence[int] | None) -> tuple[int, int]:
    """(gh, gw) grid of ``num_patches`` patches over an image of height x width pixels.

    From ``patch_size`` if given, else from ``grid`` (e.g. the read-out's), else the grid with the
    image's aspect ratio.
    """
    if patch_size is not None:
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        gh, gw = height // ph, width // pw
    elif grid is not None:
        gh, gw = grid
    else:
        gh = max(1, round(math.sqrt(num_patches * height / width)))
        gw = num_patches // gh
    if gh * gw != num_patches:
        raise ValueError(f"{num_patches} patch scores do not fill a {gh} x {gw} grid over {height} x {width} pixels; "
                         "pass patch_size")
    return gh, gw


def _cluster_boundaries(index: np.ndarray, height: int, width: int) -> np.ndarray:
    """(gh, gw) cluster id per patch -> (S, 2, 2) pixel line segments between patches of different ids."""
    gh, gw = index.shape
    ph, pw = height / gh, width / gw
    segments = []
    for i, j in zip(*np.nonzero(index[:, 1:] != index[:, :-1])):  # vertical edge right of (i, j)
        x = (j + 1) * pw - 0.5
        segments.append([[x, i * ph - 0.5], [x, (i + 1) * ph - 0.5]])
    for i, j in zip(*np.nonzero(index[1:, :] != index[:-1, :])):  # horizontal edge below (i, j)
        y = (i + 1) * ph - 0.5
        segments.append([[j * pw - 0.5, y], [(j + 1) * pw - 0.5, y]])
    return np.asarray(segments, dtype=float).reshape(-1, 2, 2)


def _per_sample(value: Tensor | float | None, n: int) -> list[float] | None:
    """A (B,) or scalar ratio -> n Python floats, or None."""
    if value is None:
        return None
    value = torch.as_tensor(value).detach().float().cpu().flatten()
    return (value.expand(n) if value.numel() == 1 else value[:n]).tolist()


def _show(ax: Axes, image: np.ndarray, title: str, **kwargs: Any) -> None:
    """One panel: image (H, W, C) with C in {1, 3}, or (H, W) with a colour map in kwargs."""
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
        kwargs.setdefault("cmap", "gray")
        kwargs.setdefault("vmin", 0.0)
        kwargs.setdefault("vmax", 1.0)
    ax.imshow(image, interpolation="nearest", **kwargs)
    ax.set_title(title, fontsize=8)


def _token_tint(image: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """image (H, W, C) in [0, 1] blended with one colour per token of tokens (gh, gw), so that the
    patches of one token share a colour even where they do not touch (colours repeat after 20)."""
    from matplotlib import colormaps

    H, W = image.shape[:2]
    (gh, gw), rank = tokens.shape, np.unique(tokens, return_inverse=True)[1].reshape(tokens.shape)
    colours = colormaps["tab20"](rank % 20)[..., :3]
    tint = np.repeat(np.repeat(colours, -(-H // gh), axis=0), -(-W // gw), axis=1)[:H, :W]
    grey = image.mean(axis=-1, keepdims=True)
    return 0.5 * grey + 0.5 * tint


def mix_grid(x: Tensor, step_output: Any, path: str | Path, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None, patch_size: int | Sequence[int] | None = None,
             max_samples: int = 8, title: str | None = None) -> Path:
    """Grid of what one mixing step did, one row per sample.

    x: (B, C, H, W) the clean batch, normalised with ``mean``/``std`` (per channel) if given.
    step_output: a ``mix.StepOutput``; its fields used, when present: ``partner`` (B,) long,
    ``scores`` (B, L) per-patch attention, ``extras['readout'].index`` (B, L) long token of each
    patch at the read-out block, ``mask`` (B, 1, H, W), ``x_mixed`` (B, C, H, W), ``lam`` and
    ``lam_hat`` (B,) or scalars. patch_size: pixels per patch (int or (ph, pw)); by default the
    read-out's grid, or a grid with the image's aspect ratio.

    Columns: original, partner, attention heat-map over the patch grid (one colour scale for all rows,
    from 0 to the largest score shown; each panel's maximum in its title), merge clusters (a colour per
    token and the boundaries between patches held by different tokens, over the original in grey),
    mask, mixed image. A column whose field is
    absent for this method (e.g. CutMix has no scores or read-out) is left out. Each panel is
    200 x 200 px; ``title`` (the method, the weights) goes above them, in 30 px more (16 px per further
    line where it wraps to the figure's width).
    """
    n = min(x.shape[0], max_samples)
    panels = _mix_panels(x, step_output, n, mean, std, patch_size)
    fig = Figure(figsize=(2 * len(panels), 2 * n))
    axes = np.asarray(fig.subplots(n, len(panels), squeeze=False))
    for b in range(n):
        for ax, draw in zip(axes[b], panels.values()):
            ax.set_xticks([])  # keep the frame: an all-white mask must not look like a blank panel
            ax.set_yticks([])
            draw(ax, b)
    fig.tight_layout(pad=0.3)
    if title:
        _title_strip(fig, title)
    return _save(fig, path)


def _mix_panels(x: Tensor, out: Any, n: int, mean: Sequence[float] | None, std: Sequence[float] | None,
                patch_size: int | Sequence[int] | None) -> dict[str, Callable[[Axes, int], None]]:
    """``mix_grid``'s columns, in order, each a function drawing sample ``b``'s panel on an axes;
    only the columns whose fields ``out`` has."""
    H, W = x.shape[-2:]
    readout = out.extras.get("readout") if out.extras else None
    grid = getattr(readout, "grid", None)
    lam, lam_hat = _per_sample(out.lam, n), _per_sample(out.lam_hat, n)
    display = _display_map(x, mean, std)
    images = display(x[:n])
    panels: dict[str, Callable[[Axes, int], None]] = {"original": lambda ax, b: _show(ax, images[b], f"#{b}")}

    if out.partner is not None:
        def partner(ax: Axes, b: int) -> None:
            j = int(out.partner[b])
            _show(ax, display(x[j:j + 1])[0], f"partner #{j}")
        panels["partner"] = partner
    if out.scores is not None:
        # one colour scale for every row: scaled per panel, a flat map would glow as bright as a peaked one
        top_score = float(out.scores[:n].detach().float().max()) or 1.0
        of = " on mixed" if out.extras.get("scores_of") == "mixed" else ""

        def attention(ax: Axes, b: int) -> None:
            scores = out.scores[b].detach().float().cpu()
            gh, gw = _patch_grid(scores.numel(), H, W, patch_size, grid)
            _show(ax, scores.reshape(gh, gw).numpy(), f"attention{of} (max {float(scores.max()):.3f})",
                  cmap="inferno", vmin=0.0, vmax=top_score)
        panels["attention"] = attention
    if readout is not None and getattr(readout, "index", None) is not None:
        def clusters(ax: Axes, b: int) -> None:
            index = readout.index[b].detach().cpu()
            gh, gw = _patch_grid(index.numel(), H, W, patch_size, grid)
            tokens = index.reshape(gh, gw).numpy()
            _show(ax, _token_tint(images[b], tokens), f"{index.unique().numel()} tokens")
            ax.add_collection(LineCollection(_cluster_boundaries(tokens, H, W), colors="#ff2d2d", linewidths=1.2))
        panels["clusters"] = clusters
    if out.mask is not None:
        def mask(ax: Axes, b: int) -> None:
            kept = float(out.mask[b].float().mean())
            _show(ax, out.mask[b, 0].detach().float().cpu().numpy(), f"mask (kept {kept:.2f})", cmap="gray",
                  vmin=0.0, vmax=1.0)
        panels["mask"] = mask
    if out.x_mixed is not None:
        mixed = display(out.x_mixed[:n])

        def mixed_panel(ax: Axes, b: int) -> None:
            ratios = "".join([f" λ={lam[b]:.2f}" if lam else "", f" λ̂={lam_hat[b]:.2f}" if lam_hat else ""])
            _show(ax, mixed[b], f"mixed{ratios}")
        panels["mixed"] = mixed_panel
    return panels


TITLE_LINE_IN = 0.16  # height of each title line after the first (the first takes 0.3 in), for 9-point text


def _title_strip(fig: Figure, title: str) -> None:
    """Put ``title`` in a strip added on top, wrapped to fit the figure's width: the panels keep their
    size and place in inches. One line takes 0.3 in, each further line ``TITLE_LINE_IN`` more."""
    text = fig.text(0.5, 1.0, title, ha="center", va="center", fontsize=9)
    renderer = FigureCanvasAgg(fig).get_renderer()
    chars = len(title)
    while chars > 8 and text.get_window_extent(renderer).width > 0.96 * fig.bbox.width:
        chars = int(0.9 * chars)
        text.set_text("\n".join(textwrap.wrap(title, chars)))
    height, head = fig.get_figheight(), 0.3 + TITLE_LINE_IN * text.get_text().count("\n")
    fig.set_figheight(height + head)
    shrink = height / (height + head)
    for ax in fig.axes:
        box = ax.get_position()
        ax.set_position([box.x0, box.y0 * shrink, box.width, box.height * shrink])
    text.set_y(1 - 0.5 * head / (height + head))


def check_figure_out(out: str | Path) -> Path:
    """``out`` as the file a command is to draw its figure to, checked before the work; creates nothing.

    Its suffix must name an image format (``FORMATS``, the format written), and it must be neither
    a folder nor an existing file of a run or an evaluation (a folder holding results.json or a
    training run): a figure must not replace what another command wrote.
    """
    path = Path(out)
    check_names(path, "--out", spare=TMP_NAME_EXTRA)  # the figure is written under a longer temporary name first
    if path.is_dir():
        raise ConfigError(f"--out {out} is a folder: give the figure's file name, e.g. {path / 'figure.png'}")
    try:
        figure_format(path)
    except ValueError as e:
        raise ConfigError(f"--out {out}: {e}") from None
    if path.exists() and ((path.parent / "results.json").is_file() or holds_training_run(path.parent)):
        raise ConfigError(f"--out {out} would replace a file of the run or evaluation in {path.parent}: "
                          "choose another --out")
    return path
