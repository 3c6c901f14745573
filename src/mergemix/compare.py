"""``mergemix compare RUN_DIR... [--out FIG.png]``: several runs side by side.

Reads each run directory's ``results.json`` (``top1``, ``ece``, ``nll``, ``bins``), ``args.yaml``
(``mix``: the method) and ``summary.csv`` (mean ``epoch_time``), prints a markdown table, one row
per run, plus mean ± std per method when a method has several runs (seeds), and draws the runs'
reliability curves on one figure.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint
from .config import ArgumentParser
from .errors import MergeMixError
from .plots import overlay_reliability

__all__ = ["Run", "command", "load_run", "main", "markdown_table", "method_table"]


@dataclass
class Run:
    """What compare needs from one run directory; NaN for figures the run did not record."""

    label: str
    method: str
    top1: float
    ece: float
    nll: float
    epoch_time: float
    bins: dict[str, list] | None = field(default=None, repr=False)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _mean_epoch_time(summary_csv: Path) -> float:
    """Mean of the ``epoch_time`` column (seconds); NaN if the file or column is missing."""
    if not summary_csv.is_file():
        return math.nan
    with open(summary_csv, newline="") as f:
        times = [_number(row.get("epoch_time")) for row in csv.DictReader(f)]
    times = [t for t in times if math.isfinite(t)]
    return statistics.fmean(times) if times else math.nan


_BIN_KEYS = ("lower", "upper", "count", "confidence", "accuracy")


def _usable_bins(bins: Any) -> bool:
    """Whether ``bins`` has the per-bin lists of ``metrics.reliability_bins``, all of one length."""
    return (isinstance(bins, dict) and all(isinstance(bins.get(k), list) for k in _BIN_KEYS)
            and len({len(bins[k]) for k in _BIN_KEYS}) == 1 and sum(bins["count"]) > 0)


def load_run(run_dir: str | Path) -> Run:
    """Read one run directory; raises ``MergeMixError`` if it or its results.json is missing or unreadable."""
    path = Path(run_dir)
    if not path.is_dir():
        raise MergeMixError(f"{run_dir}: no such run directory")
    results_path = path / "results.json"
    if not results_path.is_file():
        raise MergeMixError(f"{run_dir}: no results.json (has this run finished its evaluation?)")
    try:
        results = json.loads(results_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MergeMixError(f"{results_path}: not readable as JSON ({err})") from None
    if not isinstance(results, dict):
        raise MergeMixError(f"{results_path}: expected a JSON object, got {type(results).__name__}")
    method = "?"
    args_path = path / "args.yaml"
    if args_path.is_file():
        try:
            args = yaml.safe_load(args_path.read_text())
        except yaml.YAMLError as err:
            raise MergeMixError(f"{args_path}: invalid YAML ({str(err).splitlines()[0]})") from None
        if isinstance(args, dict) and args.get("mix") is not None:
            method = str(args["mix"])
    return Run(label=str(run_dir).rstrip("/") or str(run_dir), method=method, top1=_number(results.get("top1")),
               ece=_number(results.get("ece")), nll=_number(results.get("nll")),
               epoch_time=_mean_epoch_time(path / "summary.csv"),
               bins=results["bins"] if _usable_bins(results.get("bins")) else None)


def _cell(value: float, digits: int, std: float | None = None) -> str:
    if not math.isfinite(value):
        return "–"
    text = f"{value:.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if std is not None else text


def markdown_table(runs: Sequence[Run]) -> str:
    """One row per run: run, method, top-1 (%), ECE (fraction, 15 bins), NLL, seconds per epoch."""
    lines = ["| run | method | top-1 (%) | ECE | NLL | time/epoch (s) |", "|---|---|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r.label} | {r.method} | {_cell(r.top1, 2)} | {_cell(r.ece, 4)} | {_cell(r.nll, 4)} "
                     f"| {_cell(r.epoch_time, 2)} |")
    return "\n".join(lines)


def method_table(runs: Sequence[Run]) -> str:
    """Mean ± sample std of each figure over the runs of each method (in first-seen order)."""
    by_method: dict[str, list[Run]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r)
    lines = ["| method | runs | top-1 (%) | ECE | NLL | time/epoch (s) |", "|---|---:|---:|---:|---:|---:|"]
    for method, group in by_method.items():
        cells = []
        for name, digits in (("top1", 2), ("ece", 4), ("nll", 4), ("epoch_time", 2)):
            values = [getattr(r, name) for r in group if math.isfinite(getattr(r, name))]
            if not values:
                cells.append("–")
            else:
                std = statistics.stdev(values) if len(values) > 1 else None
                cells.append(_cell(statistics.fmean(values), digits, std))
        lines.append(f"| {method} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mergemix compare", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (<output>/<experiment>)")
    p.add_argument("--out", default="compare_reliability.png", metavar="FIG.png",
                   help="where to write the overlaid reliability diagrams (default: %(default)s)")
    return p


def command(argv: Sequence[str]) -> int:
    """``mergemix compare`` without the error handling of ``cli.main`` (bad input raises ``MergeMixError``)."""
    args = build_parser().parse_args(argv)
    runs = [load_run(d) for d in args.runs]
    named_bins = {f"{r.label} ({r.method})": r.bins for r in runs if r.bins}
    if named_bins:  # a figure is to be written: check where before printing anything
        checkpoint.make_dir(Path(args.out).parent, "--out")
    print(markdown_table(runs))
    if any(len([r for r in runs if r.method == m]) > 1 for m in {r.method for r in runs}):
        print("\n" + method_table(runs))
    for r in runs:
        if not r.bins:
            print(f"note: {r.label}: results.json has no usable 'bins'; left out of the figure", file=sys.stderr)
    if not named_bins:
        print("note: no run has reliability bins; no figure written", file=sys.stderr)
        return 0
    with checkpoint.atomic_path(args.out) as tmp:
        overlay_reliability(named_bins, tmp)
    print(f"\nreliability diagrams: {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``mergemix compare ARGS``; returns the exit code (bad input: one ``error: ...`` line on stderr, 2)."""
    from .cli import run_command

    return run_command("compare", argv)
