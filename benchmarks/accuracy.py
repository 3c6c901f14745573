"""Accuracy and calibration of every mixing method, same recipe and budget, several seeds.

    python benchmarks/accuracy.py --mode quick --jobs 2  # digits, every method, 3 seeds, 8 epochs (~8 min, 2-core CPU)
    python benchmarks/accuracy.py --mode full      # digits + Fashion-MNIST, 3 seeds, MergeMix ablations on digits
    python benchmarks/accuracy.py --mode gpu       # Fashion-MNIST at a longer budget, on CUDA
    python benchmarks/accuracy.py --mode long --methods none mixup cutmix mergemix --jobs 2
                                                   # digits at 100 epochs, Fashion-MNIST (full mode's recipe)
                                                   # at 60: does mixing pay off once the model over-fits?
                                                   # (MergeMix's ablations run there on Fashion-MNIST)
    python benchmarks/accuracy.py --mode small-data --methods none mixup cutmix mergemix --jobs 2
                                                   # Fashion-MNIST, full mode's model on 1k images, batch 32,
                                                   # 100 epochs (3100 steps): the same question on less data
    python benchmarks/accuracy.py --mode tokens --methods none cutmix mergemix "mergemix[merge_num=0]" "mergemix[merge_train=off]" --jobs 2
                                                   # Fashion-MNIST, the recipe's 49-token model on 5k images,
                                                   # 10 epochs: does merging help MergeMix with more tokens?
                                                   # (--mode tokens-long: the same at 20 epochs; --mode
                                                   # tokens196: tokens-long with 196 tokens, 98 merged, on CUDA)

Each run is a plain `mergemix train` in a subprocess with the dataset's recipe; only --mix, its
options and --seed change. Finished runs (results.json present) are reused, so an interrupted
benchmark continues where it stopped; a run records its command in its folder (command.json), and
a finished run made with other settings (another --extra, say) stops the benchmark before any run
starts. A failed run is reported at once and no further run starts; the tables keep the labels
whose runs all finished. Writes benchmarks/results/<dataset>[_<mode>].{json,md,png} (full mode:
<dataset>), each row with the device, host, versions and commit that made it; rows of an earlier
table with the same recipe are kept, so `--methods` adds or redoes a few rows. --replot redraws the
PNGs from the JSON alone.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402
from bench_common import (at_least, check_outputs, one_line_errors, output_folder, paired, plus_minus,  # noqa: E402
                          provenance, save_figure)

from mergemix.config import parse_train_args, recipe as saved_settings  # noqa: E402
from mergemix.distributed import resolve_device  # noqa: E402
from mergemix.errors import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

BASELINES = ["none", "mixup", "cutmix", "deit", "resizemix", "fmix", "saliencymix", "gridmix", "smoothmix",
             "transmix", "tokenmix", "smmix", "mergemix"]
# MergeMix ablations: one option changed from the defaults (lam area, aux clean, cls row, default block)
ABLATIONS = {
    "mergemix[lam=gaussian]": ["--lam-policy", "gaussian"],
    "mergemix[aux=mixup]": ["--aux-loss", "mixup"],
    "mergemix[aux=none]": ["--aux-loss", "none"],
    "mergemix[score=cls_col]": ["--score", "cls_col"],
    "mergemix[readout=last]": ["--readout-block", "-1"],
    "mergemix[merge_num=0]": ["--merge-num", "0"],
    "mergemix[merge_train=off]": ["--no-merge-train"],  # the clean pass (mask and clean loss) merges, the mixed pass does not
    "mergemix[merge_every=2]": ["--merge-every", "2"],  # the same total merged in every 2nd block only
    "mergemix[merge_every=3]": ["--merge-every", "3"],
    # ToMe's log(size) attention bias off: on a GPU the bias is what slows a merged attention call
    "mergemix[prop_attn=off]": ["--mix-opt", "prop_attn=false"],
}
# The README's fast GPU recipe (`none` <= 1.0x CutMix compiled), three options at once, and its parts:
# without the every-2nd-block switch, without the bias switch, and with its masks but an unmerged
# training forward (merge_train=off: do its masks or its merged forward cost the accuracy?). Only in
# the modes with many tokens, so that full mode stays within its 2 hours.
FAST_FLAGS = ["--aux-loss", "none", "--mix-opt", "prop_attn=false", "--merge-every", "2"]
FAST_RECIPE = {"mergemix[aux=none,prop_attn=off,merge_every=2]": FAST_FLAGS,
               "mergemix[aux=none,merge_every=2]": ["--aux-loss", "none", "--merge-every", "2"],
               "mergemix[aux=none,prop_attn=off]": ["--aux-loss", "none", "--mix-opt", "prop_attn=false"],
               "mergemix[aux=none,prop_attn=off,merge_every=2,merge_train=off]": [*FAST_FLAGS, "--no-merge-train"]}

# Per dataset: the recipe and the budget of each mode (flags appended to `mergemix train`).
# digits: the built-in default recipe (16x16, 4x4 patches, 16 tokens, 8 merged). Fashion-MNIST: its
# recipe with a smaller model (7x7 patches: 16 tokens, 8 merged) and a 5k-image training subset, so
# that 13 methods and MergeMix at equal time, x 3 seeds, fit the 2-core CPU; the test set is the full 10k images.
FASHION_SMALL = ["-c", "configs/fashion_mnist.yaml", "--model-kwargs", "patch_size=7", "embed_dim=64", "depth=4",
                 "num_heads=2", "--merge-num", "8"]
RECIPES = {
    "digits": {"quick": ["--epochs", "8"], "full": ["--epochs", "30"], "long": ["--epochs", "100"]},
    "fashion-mnist": {"full": [*FASHION_SMALL, "--train-subset", "5000", "--epochs", "10"],
                      "long": [*FASHION_SMALL, "--train-subset", "5000", "--epochs", "60"],
                      "small-data": [*FASHION_SMALL, "--train-subset", "1000", "--batch-size", "32", "--epochs", "100"],
                      "gpu": ["-c", "configs/fashion_mnist.yaml", "--epochs", "60", "--device", "cuda", "--amp"],
                      # the recipe's own model: 4x4 patches, 49 tokens, 24 merged; does merging pay with more tokens?
                      "tokens": ["-c", "configs/fashion_mnist.yaml", "--train-subset", "5000", "--epochs", "10"],
                      "tokens-long": ["-c", "configs/fashion_mnist.yaml", "--train-subset", "5000", "--epochs", "20"],
                      # tokens-long with 2x2 patches: 196 tokens and 98 merged, the token count and merge_num of
                      # the GPU speed targets (DeiT-S/224); on CUDA, in float32 like the CPU modes
                      "tokens196": ["-c", "configs/fashion_mnist.yaml", "--model-kwargs", "patch_size=2", "embed_dim=96",
                                    "depth=6", "num_heads=3", "--merge-num", "98", "--train-subset", "5000",
                                    "--epochs", "20", "--device", "cuda"]},
}
MODES = {  # ablations: the datasets on which the MergeMix ablations run too
    "quick": {"datasets": ["digits"], "seeds": 3, "ablations": []},
    "full": {"datasets": ["digits", "fashion-mnist"], "seeds": 3, "ablations": ["digits"]},
    "gpu": {"datasets": ["fashion-mnist"], "seeds": 3, "ablations": ["fashion-mnist"], "fast_recipe": True},
    # Fashion-MNIST's ablations: at 60 epochs MixUp overtook MergeMix; do merging or the clean loss explain it?
    "long": {"datasets": ["digits", "fashion-mnist"], "seeds": 3, "ablations": ["fashion-mnist"]},
    # equal_time: MergeMix's share of the epochs that costs what CutMix's whole run does, where it is not
    # EQUAL_TIME's: ~1.2x CutMix per epoch in these tables' first, loaded timings (small-data 4.8 vs 3.9 s,
    # tokens 55.3 vs 45.1 s); measured alone later, 1.21x (0.97x CutMix's run) and 1.37x (1.10x)
    "small-data": {"datasets": ["fashion-mnist"], "seeds": 3, "ablations": [], "equal_time": 0.8},
    "tokens": {"datasets": ["fashion-mnist"], "seeds": 3, "ablations": ["fashion-mnist"], "fast_recipe": True,
               "equal_time": 0.8},
    "tokens-long": {"datasets": ["fashion-mnist"], "seeds": 3, "ablations": ["fashion-mnist"], "fast_recipe": True,
                    "equal_time": 0.8},
    "tokens196": {"datasets": ["fashion-mnist"], "seeds": 3, "ablations": ["fashion-mnist"], "fast_recipe": True},
}
RECORD = "command.json"  # in a run's folder: the `mergemix train` flags it was started with
# settings of where a run reads and writes and how much it logs, not of what it trains: a run may be reused across them
NOT_TRAINING = ("output", "experiment", "data_dir", "download", "workers", "log_interval")
CAPSIZE = 3  # of the error bars, in points
PAIRED_REFERENCE = "mergemix"  # every table's rows are also set against MergeMix's defaults, seed by seed
# MergeMix (clean) costs ~1.6x CutMix per epoch: this share of the epochs is equal time (a mode may set its own)
EQUAL_TIME = 0.6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=list(MODES), default="quick")
    p.add_argument("--datasets", nargs="*", choices=list(RECIPES), default=None)
    p.add_argument("--methods", nargs="*", default=None, help="subset of methods/ablation labels")
    p.add_argument("--seeds", type=at_least(1), default=None, help="seeds 0..N-1 (default: the mode's)")
    p.add_argument("--jobs", type=at_least(1), default=1,
                   help="runs at once, each on cores/jobs threads (2 on a 2-core CPU: better throughput)")
    p.add_argument("--runs-dir", type=output_folder, default=str(ROOT / "benchmarks" / "runs"))
    p.add_argument("--replot", action="store_true",
                   help="only redraw the mode's figures from its tables' JSON, running nothing")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every run")
    return p.parse_args(argv)


def plan(mode: str, dataset: str, recipe: list[str], methods: list[str] | None) -> dict[str, list[str]]:
    """label -> mixing flags."""
    labels = {m: ["--mix", m] for m in BASELINES}
    if dataset in MODES[mode]["ablations"]:
        fast = FAST_RECIPE if MODES[mode].get("fast_recipe") else {}
        labels.update({k: ["--mix", "mergemix", *v] for k, v in {**ABLATIONS, **fast}.items()})
    # in every table, not only with the ablations: its clean pass doubles MergeMix's samples per epoch,
    # so an equal-epoch row alone flatters it (DESIGN §5 asks for both)
    share = MODES[mode].get("equal_time", EQUAL_TIME)
    labels["mergemix[equal time]"] = ["--mix", "mergemix", "--epochs", str(round(share * epochs_of(recipe)))]
    if methods:
        labels = {k: v for k, v in labels.items() if k in methods}
    return labels


def epochs_of(recipe: list[str]) -> int:
    """The epochs a recipe trains: the last --epochs given wins (every recipe gives one)."""
    return int(recipe[len(recipe) - recipe[::-1].index("--epochs")])


def mode_recipes(mode: str, datasets: list[str]) -> dict[str, list[str]]:
    """dataset -> its recipe in ``mode``; ConfigError for a dataset that has none."""
    for dataset in datasets:
        if mode not in RECIPES[dataset]:
            raise ConfigError(f"{dataset} has no {mode} recipe; its modes: {', '.join(RECIPES[dataset])}")
    return {dataset: RECIPES[dataset][mode] for dataset in datasets}


def plans(mode: str, recipes: dict[str, list[str]], methods: list[str] | None) -> dict[str, dict[str, list[str]]]:
    """dataset -> label -> mixing flags. ConfigError for a ``--methods`` label that no dataset runs in
    this mode, or a dataset that runs none of them: either would quietly leave a table empty."""
    every = [plan(mode, dataset, recipe, None) for dataset, recipe in recipes.items()]
    valid = list(dict.fromkeys(label for labels in every for label in labels))
    unknown = [m for m in methods or [] if m not in valid]
    if unknown:
        with_ablations = ", ".join(m for m, spec in MODES.items() if spec["ablations"])
        hint = f" (ablations run in modes {with_ablations})" if any(m.startswith("mergemix[") for m in unknown) else ""
        raise ConfigError(f"--methods {' '.join(unknown)}: not a label of {mode} mode on {', '.join(recipes)}{hint}; "
                          f"choose from: {', '.join(valid)}")
    chosen = {dataset: plan(mode, dataset, recipe, methods) for dataset, recipe in recipes.items()}
    for dataset, labels in chosen.items():
        if not labels:
            raise ConfigError(f"none of --methods runs on {dataset} in {mode} mode; leave it out with --datasets "
                              f"{' '.join(d for d in chosen if chosen[d])}")
    return chosen


class RunFailed(Exception):
    """A training run that exited with an error."""


def run_one(argv: list[str], run_dir: Path, threads: int) -> dict:
    """Run (or reuse) one `mergemix train ARGV` and read its figures."""
    results = run_dir / "results.json"
    if not results.exists():
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts over
        log = run_dir.parent / f"{run_dir.name}.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RECORD).write_text(json.dumps({"argv": argv}, indent=1) + "\n")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        with open(log, "w") as fh:
            proc = subprocess.run([sys.executable, "-m", "mergemix", "train", *argv], cwd=ROOT, stdout=fh,
                                  stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            raise RunFailed(f"{run_dir.name} failed (exit {proc.returncode}); see {log}")
    figures = json.loads(results.read_text())
    with open(run_dir / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    figures["epoch_time"] = statistics.mean(float(r["epoch_time"]) for r in rows)
    figures["epochs"] = len(rows)
    return figures


def settings(argv: list[str]) -> dict:
    """What `mergemix train ARGV` trains: every setting, its -c recipe's included (read from the
    repository root, where the runs start), less ``NOT_TRAINING``. ConfigError for flags it refuses."""
    argv = [str(ROOT / a) if flag in ("-c", "--config") else a for flag, a in zip(["", *argv], argv)]
    return {k: v for k, v in saved_settings(parse_train_args(argv)).items() if k not in NOT_TRAINING}


def check_reuse(argv: list[str], run_dir: Path) -> None:
    """ConfigError if ``run_dir`` holds a finished run that trained otherwise than `mergemix train
    ARGV` would: by its recorded command, or, for a run without the record, its args.yaml."""
    if not (run_dir / "results.json").exists():
        return
    if (run_dir / RECORD).exists():
        made = json.loads((run_dir / RECORD).read_text())["argv"]
        if made == argv:
            return
        made = settings(made)
    else:
        made = yaml.safe_load((run_dir / "args.yaml").read_text()) if (run_dir / "args.yaml").exists() else {}
    wanted = settings(argv)
    differ = [f"--{k.replace('_', '-')} {made[k]} there, {wanted[k]} now" for k in wanted
              if k in made and made[k] != wanted[k]]
    if differ:
        raise ConfigError(f"{run_dir} is a finished run with other settings ({'; '.join(differ)}): "
                          "remove that folder or use another --runs-dir")


def aggregate(runs: list[dict]) -> dict:
    out = {"seeds": len(runs)}
    for key in ("top1", "ece", "nll", "brier", "epoch_time"):
        values = [r[key] for r in runs]
        out[key] = statistics.mean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None  # one seed has no spread
    return out


def merge_previous(path: Path, recipe: list[str], table: dict, raw: dict) -> tuple[dict, dict]:
    """Add the rows of an earlier table with the same recipe that this run did not redo, so that
    ``--methods`` run a few methods into a published table; a table from another recipe is replaced.
    A kept row keeps its ``jobs`` (a table of an older version had one count for all its rows)."""
    if not path.exists():
        return table, raw
    previous = json.loads(path.read_text())
    if previous.get("recipe") != recipe:
        print(f"{path.name}: its recipe differs from this run's, so its table is replaced", flush=True)
        return table, raw
    kept = [label for label in previous["table"] if label not in table]
    jobs = {"jobs": previous["jobs"]} if "jobs" in previous else {}
    return ({**{k: {**jobs, **previous["table"][k]} for k in kept}, **table},
            {**{k: previous["runs"][k] for k in kept}, **raw})


def made_on(row: dict) -> str:
    """A row's provenance in words."""
    p = row["provenance"]
    versions = ", ".join(f"{k} {p['versions'][k]}" for k in ("torch", "timm", "mergemix"))
    return f"{p['device']} on {p['host']}, {versions}, commit {p['commit'] or 'unknown'}"


def markdown(dataset: str, mode: str, table: dict[str, dict], raw: dict[str, list[dict]], recipe: list[str]) -> str:
    ref = table.get("cutmix", {}).get("epoch_time")
    jobs = sorted({t["jobs"] for t in table.values() if "jobs" in t})
    sharing = f"with {' or '.join(map(str, jobs))} runs" if jobs else "with other runs"
    made: dict[str, list[str]] = {}  # where -> the labels made there
    for label, t in table.items():
        if "provenance" in t:
            made.setdefault(made_on(t), []).append(label)
    lines = [f"### {dataset} ({mode} mode)", "",
             f"Recipe: `mergemix train --dataset {dataset} {' '.join(recipe)} --mix METHOD --seed S`, "
             "mean ± sample std (n − 1) over seeds; top-1 in %, ECE (15 bins), NLL and Brier on the held-out set; "
             f"s/epoch is wall time of an epoch's training and its evaluation of the held-out set, {sharing} "
             "sharing the machine, sometimes next to other jobs: a rough figure only, and the evaluation, the same for "
             "every method, pulls × CutMix time towards 1 (benchmarks/step_time.py measures training-step ratios, "
             "interleaved in one process).", ""]
    if list(made.values()) == [list(table)]:
        lines += [f"Rows made on {next(iter(made))}.", ""]
    elif made:  # a table that --methods grew: say which rows each line is about
        where = "; on ".join(f"{place} ({', '.join(labels)})" for place, labels in made.items())
        older = sum(map(len, made.values())) < len(table)
        lines += [f"Rows made on {where}" + ("; the others before rows recorded where they were made" if older else "")
                  + ".", ""]
    lines += ["| method | seeds | top-1 (%) | ECE | NLL | Brier | s/epoch | × CutMix time |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, t in sorted(table.items(), key=lambda kv: -kv[1]["top1"]):
        rel = f"{t['epoch_time'] / ref:.2f}" if ref else "–"
        lines.append(f"| {label} | {t['seeds']} | {plus_minus(t['top1'], t['top1_std'], 2)} | "
                     f"{plus_minus(t['ece'], t['ece_std'], 4)} | "
                     f"{t['nll']:.4f} | {t['brier']:.4f} | {t['epoch_time']:.1f} | {rel} |")
    differences = paired_differences(raw, PAIRED_REFERENCE)
    if differences:
        lines += ["", f"Paired by seed against {PAIRED_REFERENCE} (method − {PAIRED_REFERENCE} over the seeds both ran; "
                  "mean ± standard error, then each seed's difference in seed order). Runs with one seed start from the "
                  "same weights and see the training images in the same order, so these differences are less noisy "
                  "than the gaps between the means.", "",
                  f"| method | seeds | top-1 − {PAIRED_REFERENCE} (points) | per seed | ECE − {PAIRED_REFERENCE} |",
                  "|---|---:|---:|---|---:|"]
        for label, d in sorted(differences.items(), key=lambda kv: -kv[1]["top1"]["mean"]):
            top1, ece = d["top1"], d["ece"]
            per_seed = ", ".join(f"{v:+.2f}" for v in top1["diffs"])
            lines.append(f"| {label} | {len(top1['diffs'])} | {plus_minus(top1['mean'], top1['se'], 2, '+')} | "
                         f"{per_seed} | {plus_minus(ece['mean'], ece['se'], 4, '+')} |")
    return "\n".join(lines)


def paired_differences(raw: dict[str, list[dict]], reference: str) -> dict[str, dict]:
    """Per label, its top-1 and ECE minus the reference's, paired by seed (``paired``: mean, standard
    error, the differences in seed order). Labels sharing no seed with the reference give nothing."""
    ref = {r["seed"]: r for r in raw.get(reference, [])}
    out = {}
    for label, runs in raw.items():
        pairs = sorted(((r, ref[r["seed"]]) for r in runs if label != reference and r["seed"] in ref),
                       key=lambda pair: pair[0]["seed"])
        if pairs:
            out[label] = {key: paired([r[key] - b[key] for r, b in pairs]) for key in ("top1", "ece")}
    return out


def label_offsets(steps: int = 12, gap: float = 9.0) -> list[tuple[float, float, str]]:
    """Where a point's label may go, nearest first: (dx, dy) in points and the text's alignment,
    up-right, down-right, up-left, down-left, then the same one text line further out each step."""
    return [(dx, dy, ha) for k in range(steps) for dx, ha in ((4, "left"), (-4, "right"))
            for dy in (3 + k * gap, -3 - (k + 1) * gap)]


def inside(box: Bbox, frame: Bbox) -> bool:
    return frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def bar_boxes(ax: plt.Axes, points: list[tuple[float, float]], errors: list[tuple[float | None, float | None]]) -> list[Bbox]:
    """The error bars of ``errorbar(..., capsize=CAPSIZE)`` at ``points`` (``errors``: x and y
    half-widths, None for none), each as a box in pixels as wide as its caps."""
    half = CAPSIZE / 2 * ax.figure.dpi / 72
    boxes = []
    for (x, y), (xerr, yerr) in zip(points, errors):
        if xerr:
            (x0, y0), (x1, _) = ax.transData.transform([(x - xerr, y), (x + xerr, y)])
            boxes.append(Bbox.from_extents(x0, y0 - half, x1, y0 + half))
        if yerr:
            (x0, y0), (_, y1) = ax.transData.transform([(x, y - yerr), (x, y + yerr)])
            boxes.append(Bbox.from_extents(x0 - half, y0, x0 + half, y1))
    return boxes


def annotate_apart(ax: plt.Axes, points: list[tuple[float, float]], labels: list[str], fontsize: float = 7,
                   errors: list[tuple[float | None, float | None]] | None = None) -> list:
    """Label each point at the first place of ``label_offsets`` where its text stays in the plot and
    overlaps no other label, no other point's marker and no error bar (``errors``: each point's x
    and y half-widths), or the nearest place if none is free. A label set off its point gets a
    leader line. Returns the annotations."""
    fig = ax.figure
    fig.canvas.draw()  # text extents need a renderer
    renderer = fig.canvas.get_renderer()
    size = 8 * fig.dpi / 72  # a marker's box, in pixels
    markers = [Bbox.from_bounds(*(ax.transData.transform(p) - size / 2), size, size) for p in points]
    bars = bar_boxes(ax, points, errors or [])
    offsets = label_offsets()
    labels_placed: list[Bbox] = []
    annotations = []
    for n, (point, label) in enumerate(zip(points, labels)):
        others = labels_placed + markers[:n] + markers[n + 1:] + bars
        style = dict(textcoords="offset points", va="bottom", fontsize=fontsize)

        def extent(dx: float, dy: float, ha: str) -> Bbox:  # the text's box there, leader line left out
            text = ax.annotate(label, point, xytext=(dx, dy), ha=ha, **style)
            box = text.get_window_extent(renderer)
            text.remove()
            return box
        boxes = (extent(*offset) for offset in offsets)
        i = next((i for i, box in enumerate(boxes)
                  if inside(box, ax.bbox) and not any(box.overlaps(b) for b in others)), 0)
        dx, dy, ha = offsets[i]
        leader = dict(arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5")) if i >= 4 else {}
        annotations.append(ax.annotate(label, point, xytext=(dx, dy), ha=ha, **style, **leader))
        labels_placed.append(extent(dx, dy, ha))
    return annotations


def figure(dataset: str, mode: str, recipe: list[str], table: dict[str, dict]) -> plt.Figure:
    """Top-1 against ECE, one point per row; MergeMix red and drawn over its orange variants."""
    fig, ax = plt.subplots(figsize=(8, 6))
    for label, t in table.items():
        color = "tab:red" if label == "mergemix" else "tab:orange" if label.startswith("mergemix") else "tab:blue"
        ax.errorbar(t["ece"], t["top1"], xerr=t["ece_std"], yerr=t["top1_std"], fmt="o", capsize=CAPSIZE, color=color,
                    zorder=2.5 if label == "mergemix" else 2)
    ax.set_xlabel("ECE (lower is better)")
    ax.set_ylabel("top-1 % (higher is better)")
    ax.set_title(f"{dataset}, {mode} mode ({epochs_of(recipe)} epochs)\naccuracy vs calibration, mean ± std over seeds")
    ax.grid(alpha=0.3)
    fig.tight_layout()  # before the labels: their places are in pixels, which the layout moves
    annotate_apart(ax, [(t["ece"], t["top1"]) for t in table.values()], list(table),
                   errors=[(t["ece_std"], t["top1_std"]) for t in table.values()])
    return fig


def commands(args: argparse.Namespace, dataset: str, recipe: list[str], labels: dict[str, list[str]],
             seeds: list[int]) -> dict[str, list[tuple[list[str], Path]]]:
    """label -> its runs, one per seed: (`mergemix train` flags, run folder)."""
    runs = {}
    for label, flags in labels.items():
        for seed in seeds:
            name = f"{dataset}-{label}-s{seed}".replace("[", "_").replace("]", "").replace("=", "-").replace(" ", "_")
            run_dir = args.runs_dir / args.mode / name
            # the label's flags last: an equal-time row's --epochs must win over an --extra one
            argv = ["--dataset", dataset, *recipe, *flags, "--seed", str(seed), "--output", str(run_dir.parent),
                    "--experiment", run_dir.name]
            runs.setdefault(label, []).append((argv, run_dir))
    return runs


def run_dataset(args: argparse.Namespace, dataset: str, runs: dict[str, list[tuple[list[str], Path]]],
                threads: int) -> tuple[dict, dict, list[str]]:
    """Run every label's runs, ``args.jobs`` at once; (label -> aggregate, label -> per-seed figures,
    the failed runs). A failure is printed as it happens, and no run starts after it: the tables
    get the labels whose runs all finished."""
    t0 = time.time()
    failed: list[str] = []

    def attempt(argv: list[str], run_dir: Path) -> dict | None:
        if failed:
            return None
        try:
            return run_one(argv, run_dir, threads)
        except RunFailed as e:
            failed.append(str(e))
            print(f"[{dataset}] {e}; no further run starts", flush=True)
            return None

    table, raw = {}, {}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {label: [pool.submit(attempt, *run) for run in label_runs] for label, label_runs in runs.items()}
        try:
            for i, (label, label_futures) in enumerate(futures.items()):
                results = [f.result() for f in label_futures]
                if None in results:
                    continue
                table[label], raw[label] = aggregate(results), results
                t = table[label]
                print(f"[{dataset} {i + 1}/{len(futures)} {time.time() - t0:.0f}s] {label}: top-1 "
                      f"{plus_minus(t['top1'], t['top1_std'], 2)}, ECE {t['ece']:.4f}", flush=True)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # after an error here or Ctrl-C, no queued run starts
    return table, raw, failed


def write_tables(stem: Path, args: argparse.Namespace, dataset: str, recipe: list[str], table: dict, raw: dict) -> str:
    """Write the table's JSON, markdown and figure, with the rows of an earlier table of the same
    recipe; return the markdown."""
    table, raw = merge_previous(stem.with_suffix(".json"), recipe, table, raw)
    stem.with_suffix(".json").write_text(json.dumps({"mode": args.mode, "recipe": recipe, "table": table, "runs": raw},
                                                    indent=2))
    text = markdown(dataset, args.mode, table, raw, recipe)
    stem.with_suffix(".md").write_text(text + "\n")
    save_figure(figure(dataset, args.mode, recipe, table), stem.with_suffix(".png"))
    return text


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = list(range(args.seeds if args.seeds is not None else MODES[args.mode]["seeds"]))
    # each recipe as its runs get it: --extra flags override the mode's
    recipes = {dataset: [*recipe, *args.extra]
               for dataset, recipe in mode_recipes(args.mode, args.datasets or MODES[args.mode]["datasets"]).items()}
    stems = {dataset: RESULTS / f"{dataset}{'' if args.mode == 'full' else '_' + args.mode}" for dataset in recipes}
    if args.replot:
        return replot(args, stems)
    labels = plans(args.mode, recipes, args.methods)
    check_outputs([stem.with_suffix(suffix) for stem in stems.values() for suffix in (".json", ".md", ".png")],
                  "result files")
    runs = {dataset: commands(args, dataset, recipe, labels[dataset], seeds) for dataset, recipe in recipes.items()}
    first = {dataset: next(iter(by_label.values()))[0][0] for dataset, by_label in runs.items()}
    for argv, run_dir in (run for by_label in runs.values() for label_runs in by_label.values() for run in label_runs):
        check_reuse(argv, run_dir)  # every run before any starts: a mismatch found later would cost the runs before it
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    # the device of a dataset's first run is its recipe's, the same for all its runs; a bad --extra fails here
    made = {dataset: provenance(resolve_device(settings(argv)["device"]), threads) for dataset, argv in first.items()}
    for i, (dataset, recipe) in enumerate(recipes.items()):
        table, raw, failed = run_dataset(args, dataset, runs[dataset], threads)
        for row in table.values():
            row.update(jobs=args.jobs, provenance=made[dataset])
        if table:
            print(write_tables(stems[dataset], args, dataset, recipe, table, raw))
        if failed:
            written = (f"{stems[dataset].name}.json/.md/.png hold the labels whose runs all finished" if table
                       else "no table written")
            not_run = "".join(f"; {later} not run" for later in list(recipes)[i + 1:])
            print(f"error: {len(failed)} run(s) of {dataset} failed ({'; '.join(failed)}); {written}{not_run}",
                  file=sys.stderr)
            return 1
    return 0


def replot(args: argparse.Namespace, stems: dict[str, Path]) -> int:
    """Redraw each stem's figure from its JSON table."""
    for dataset, stem in stems.items():
        if not stem.with_suffix(".json").is_file():
            raise ConfigError(f"--replot: no table {stem.with_suffix('.json')} to draw; run {args.mode} mode first")
        check_outputs([stem.with_suffix(".png")], "--replot")
        made = json.loads(stem.with_suffix(".json").read_text())
        save_figure(figure(dataset, args.mode, made["recipe"], made["table"]), stem.with_suffix(".png"))
        print(f"redrew {stem.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
