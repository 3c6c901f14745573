r"""ToMe at inference: one trained checkpoint evaluated plain and merged at several merge_num.

    python benchmarks/tome_eval.py --checkpoint benchmarks/runs/tokens-long/fashion-mnist-mergemix-s0 \
        --merge-nums 0 8 16 24 32 40 --merge-every 1 2 3 --name fashion-mnist_tome
    # --prop-attn on off: each merged point with ToMe's proportional attention and without it

Each point is a `mergemix eval --checkpoint CKPT --merge-num N --merge-every K [--no-prop-attn]` (N
absent: the plain timm model), run
in this process one after another, after one plain warm-up pass. Accuracy, ECE and NLL come from the full evaluation set; images/s
is the wall time of the whole pass, data loading included, so it is a rough figure and its ratio
to the plain pass understates what merging saves in the model. Writes
benchmarks/results/<name>.{json,md,png}; --replot redraws <name>.png from <name>.json alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from bench_common import at_least, check_outputs, one_line_errors, save_figure  # noqa: E402

from mergemix import cli  # noqa: E402
from mergemix.errors import ConfigError  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("top1", "ece", "nll", "brier", "images_per_s")


def evaluate(checkpoint: str, merge_num: int | None, merge_every: int, prop_attn: bool, extra: list[str],
             out: Path) -> dict | None:
    """One `mergemix eval`; its results.json figures. None when the schedule does not fit the model
    (exit 2: a block would merge more than half its tokens; eval has printed why); on any other failure,
    exits with eval's code (eval has printed its one-line error)."""
    argv = ["eval", "--checkpoint", checkpoint, "--output", str(out), *extra]
    if merge_num is not None:
        argv += ["--merge-num", str(merge_num), "--merge-every", str(merge_every), *([] if prop_attn else ["--no-prop-attn"])]
    code = cli.main(argv)
    if code == 2 and merge_num:
        return None
    if code != 0:
        raise SystemExit(code)
    return json.loads((out / "results.json").read_text())


def mean_tokens(point: dict, num_tokens: int) -> float:
    """Tokens per block averaged over the blocks: the compute a point pays, whatever its schedule."""
    tokens = point["tokens_per_block"]
    return num_tokens if tokens is None else sum(tokens) / len(tokens)


def schedule_name(point: dict) -> str:
    """How a merged point merges: its blocks, and proportional attention when it is off."""
    every = "every block" if point["merge_every"] == 1 else f"every {point['merge_every']} blocks"
    return every + ("" if point.get("prop_attn", True) else ", no prop. attn")


def markdown(report: dict) -> str:
    lines = [f"Checkpoint `{report['checkpoint']}` ({report['model']}, {report['dataset']}, "
             f"{report['num_images']} images); images/s include data loading. \"merged in\": every block, or "
             "every k-th block only (`--merge-every k`, the same total in fewer steps); \"no prop. attn\": without "
             "ToMe's proportional attention (`--no-prop-attn`).", "",
             "| merge_num | merged in | tokens per block (first → last, mean) | top-1 (%) | ECE | NLL | Brier "
             "| images/s | × plain |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    plain = report["points"][0]["images_per_s"]
    T = report["num_tokens"]
    for p in report["points"]:
        if p["merge_num"] is None:  # T is None when no merged point ran: the plain pass does not count tokens
            n, every, tokens = "–", "–", "plain" if T is None else f"plain ({T})"
        else:
            n, every = p["merge_num"], schedule_name(p)
            tokens = f"{p['tokens_per_block'][0]} → {p['tokens_per_block'][-1]}, {mean_tokens(p, T):.1f}"
        lines.append(f"| {n} | {every} | {tokens} | {p['top1']:.2f} | "
                     f"{p['ece']:.4f} | {p['nll']:.4f} | {p['brier']:.4f} | {p['images_per_s']:.0f} | "
                     f"{p['images_per_s'] / plain:.2f} |")
    if report.get("skipped"):
        lines += ["", "Not evaluated, as a block would merge more than half of its tokens: "
                  + "; ".join(f"merge_num {p['merge_num']} in {schedule_name(p)}" for p in report["skipped"]) + "."]
    return "\n".join(lines)


def figure(report: dict) -> plt.Figure:
    """Top-1 and ECE against the speed-up, and the speed-up against the mean tokens per block, one
    line per schedule, the plain model dashed: the trade-off a user picks a schedule by. The legend
    goes below the plots, where it covers no point; the title names the checkpoint."""
    points, T = report["points"], report["num_tokens"]
    plain = points[0]

    def speedup(p: dict) -> float:
        return p["images_per_s"] / plain["images_per_s"]

    fig, axes = plt.subplots(1, 3, figsize=(13, 4), layout="constrained")
    for name in dict.fromkeys(schedule_name(p) for p in points[1:]):
        merged = [p for p in points[1:] if schedule_name(p) == name]
        label = f"merged in {name}"
        for ax, key in ((axes[0], "top1"), (axes[1], "ece")):
            ax.plot([speedup(p) for p in merged], [p[key] for p in merged], "o-", label=label)
        axes[2].plot([mean_tokens(p, T) for p in merged], [speedup(p) for p in merged], "o-", label=label)
    for ax, key, ylabel in ((axes[0], "top1", "top-1 (%)"), (axes[1], "ece", "ECE")):
        ax.axhline(plain[key], ls="--", color="grey", label="plain")
        ax.set_xlabel("images/s, × plain")
        ax.set_ylabel(ylabel)
    axes[2].axhline(1.0, ls="--", color="grey", label="plain")
    axes[2].set_xlabel("mean tokens per block")
    axes[2].set_ylabel("images/s, × plain")
    axes[2].invert_xaxis()  # more merging to the right
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"ToMe at inference: {report['model']} on {report['dataset']}, checkpoint {report['checkpoint']}")
    return fig


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="a .pth.tar file or a run folder")
    what.add_argument("--replot", action="store_true", help="only redraw <name>.png from <name>.json, evaluating nothing")
    p.add_argument("--merge-nums", type=at_least(0), nargs="+", default=[0, 8, 16, 24, 32])
    p.add_argument("--merge-every", type=at_least(1), nargs="+", default=[1], metavar="K",
                   help="schedules: merging in every K-th block (each merge_num is evaluated with each K)")
    p.add_argument("--prop-attn", nargs="+", choices=("on", "off"), default=["on"],
                   help="merged points with ToMe's proportional attention, without it, or both")
    p.add_argument("--name", default="tome_eval", help="results file stem under benchmarks/results/")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every `mergemix eval`")
    args = p.parse_args(argv)
    stem = args.results_dir / args.name
    if args.replot:
        if not stem.with_suffix(".json").is_file():
            raise ConfigError(f"--replot: no {stem.with_suffix('.json')} to draw")
        check_outputs([stem.with_suffix(".png")], f"--results-dir {args.results_dir}")
        save_figure(figure(json.loads(stem.with_suffix(".json").read_text())), stem.with_suffix(".png"))
        return 0
    check_outputs([stem.with_suffix(suffix) for suffix in (".json", ".md", ".png")], f"--results-dir {args.results_dir}")
    # (merge_num, K, proportional attention); merge_num 0 is the plain model whatever K, so it is evaluated once
    props = [v == "on" for v in dict.fromkeys(args.prop_attn)]
    runs = [(None, 1, True)] + [(n, k, prop) for prop in props for k in args.merge_every for n in args.merge_nums
                                if n or (k, prop) == (args.merge_every[0], props[0])]
    points, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        evaluate(args.checkpoint, None, 1, True, args.extra, Path(tmp) / "warm-up")  # one-time costs land here, not on a point
        for n, k, prop in runs:
            r = evaluate(args.checkpoint, n, k, prop, args.extra, Path(tmp) / f"merge{n}-every{k}-prop{prop:d}")
            if r is None:
                skipped.append({"merge_num": n, "merge_every": k, "prop_attn": prop})
                continue
            points.append({"merge_num": n, "merge_every": None if n is None else k, "prop_attn": None if n is None else prop,
                           "tokens_per_block": r.get("tokens_per_block"), **{key: r[key] for key in KEYS}})
            info = r
    tokens = next((p["tokens_per_block"][0] for p in points if p["tokens_per_block"]), None)
    report = {"checkpoint": args.checkpoint, "model": info["model"], "dataset": info["dataset"],
              "num_images": info["num_images"], "num_tokens": tokens, "points": points, "skipped": skipped}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    stem.with_suffix(".md").write_text(text + "\n")
    save_figure(figure(report), stem.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
