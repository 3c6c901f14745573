"""ToMe at inference: one trained checkpoint evaluated plain and merged at several merge_num.

    python benchmarks/tome_eval.py --checkpoint benchmarks/runs/tokens/fashion-mnist-mergemix-s0 \
        --merge-nums 0 8 16 24 32 --name fashion-mnist_tome

Each point is a `mergemix eval --checkpoint CKPT --merge-num N` (N absent: the plain timm model), run
in this process one after another, after one plain warm-up pass. Accuracy, ECE and NLL come from the full evaluation set; images/s
is the wall time of the whole pass, data loading included, so it is a rough figure and its ratio
to the plain pass understates what merging saves in the model. Writes
benchmarks/results/<name>.{json,md,png}.
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

from mergemix import cli  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("top1", "ece", "nll", "brier", "images_per_s")


def evaluate(checkpoint: str, merge_num: int | None, extra: list[str], out: Path) -> dict:
    """One `mergemix eval`; its results.json figures (raises if the command fails)."""
    argv = ["eval", "--checkpoint", checkpoint, "--output", str(out), *extra]
    if merge_num is not None:
        argv += ["--merge-num", str(merge_num)]
    if cli.main(argv) != 0:
        raise SystemExit(f"mergemix {' '.join(argv)} failed")
    return json.loads((out / "results.json").read_text())


def markdown(report: dict) -> str:
    lines = [f"Checkpoint `{report['checkpoint']}` ({report['model']}, {report['dataset']}, "
             f"{report['num_images']} images); images/s include data loading.", "",
             "| merge_num | tokens per block | top-1 (%) | ECE | NLL | Brier | images/s | × plain |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    plain = report["points"][0]["images_per_s"]
    for p in report["points"]:
        tokens = "plain" if p["merge_num"] is None else f"{p['tokens_per_block'][0]} → {p['tokens_per_block'][-1]}"
        lines.append(f"| {'–' if p['merge_num'] is None else p['merge_num']} | {tokens} | {p['top1']:.2f} | "
                     f"{p['ece']:.4f} | {p['nll']:.4f} | {p['brier']:.4f} | {p['images_per_s']:.0f} | "
                     f"{p['images_per_s'] / plain:.2f} |")
    return "\n".join(lines)


def figure(report: dict, path: Path) -> None:
    """Top-1, ECE and images/s (× plain) against merge_num, the plain model as dashed lines."""
    points = report["points"]
    plain, merged = points[0], points[1:]
    xs = [p["merge_num"] for p in merged]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, key, label in ((axes[0], "top1", "top-1 (%)"), (axes[1], "ece", "ECE"),
                           (axes[2], "speedup", "images/s, × plain")):
        value = (lambda p: p["images_per_s"] / plain["images_per_s"]) if key == "speedup" else (lambda p: p[key])
        ax.plot(xs, [value(p) for p in merged], "o-", label="merged")
        ax.axhline(value(plain), ls="--", color="grey", label="plain")
        ax.set_xlabel("merge_num (tokens merged in all)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"ToMe at inference: {report['model']} on {report['dataset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a .pth.tar file or a run folder")
    p.add_argument("--merge-nums", type=int, nargs="+", default=[0, 8, 16, 24, 32])
    p.add_argument("--name", default="tome_eval", help="results file stem under benchmarks/results/")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every `mergemix eval`")
    args = p.parse_args(argv)
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        evaluate(args.checkpoint, None, args.extra, Path(tmp) / "warm-up")  # one-time costs land here, not on a point
        for n in [None, *args.merge_nums]:
            r = evaluate(args.checkpoint, n, args.extra, Path(tmp) / f"merge{n}")
            points.append({"merge_num": n, "tokens_per_block": r.get("tokens_per_block"), **{k: r[k] for k in KEYS}})
    report = {"checkpoint": args.checkpoint, "model": r["model"], "dataset": r["dataset"], "num_images": r["num_images"],
              "points": points}
    stem = args.results_dir / args.name
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    stem.with_suffix(".md").write_text(text + "\n")
    figure(report, stem.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
