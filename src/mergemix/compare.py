"""``mergemix compare RUN_DIR... [--out FIG.png]``: several runs side by side.

Reads each run directory's ``results.json`` (``top1``, ``ece``, ``nll``, ``bins``), ``args.yaml``
(``mix``: the method; the settings) and ``summary.csv`` (mean ``epoch_time``), prints a markdown
table, one row per run, plus mean ± std over the runs that differ only in their seed, when some do,
and draws the runs' reliability curves on one figure. An evaluation folder (``mergemix eval``) counts
with the training settings its results record, and never in a group with training runs.
"""
from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint
from .config import ArgumentParser, train_defaults
from .errors import DataError
from .evaluate import EVALUATION_KEYS
from .plots import check_figure_out, overlay_reliability, read_summary

__all__ = ["Run", "command", "load_run", "markdown_table", "method_table"]


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
    settings: dict[str, Any] = field(default_factory=dict, repr=False)  # what the run trained, but its seed


# args that say where, how fast or under which seed a run ran, not what it trained: runs that
# differ only in these are repeats of one setting
_NOT_SETTINGS = {"seed", "output", "experiment", "resume", "data_dir", "download", "workers", "device",
                 "deterministic", "compile", "compile_mode", "eval_batch_size", "log_interval",
                 "save_mix_samples", "debug", "eval_merged", "eval_interval"}


def _settings(args: dict[str, Any]) -> dict[str, Any]:
    """What a run trained: its args but ``_NOT_SETTINGS``; a flag added after the run was made counts
    at its default, the setting the run had, so older runs group with newer ones of the same recipe."""
    defaults = vars(train_defaults())
    return {k: v for k, v in {**defaults, **args}.items() if k not in _NOT_SETTINGS}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON true/false are no figures


def _mean_epoch_time(summary_csv: Path) -> float:
    """Mean of the ``epoch_time`` column (seconds); NaN if the file, the column or its numbers are missing."""
    if not summary_csv.is_file():
        return math.nan
    times = [t for t in read_summary(summary_csv).get("epoch_time", ()) if math.isfinite(t)]
    return statistics.fmean(times) if times else math.nan


def _figure(results: dict[str, Any], key: str, path: Path) -> float:
    """``results[key]`` as a float, NaN if absent or null; anything but a number is an error naming ``path``."""
    value = results.get(key)
    if value is None:
        return math.nan
    if not _is_number(value):
        raise DataError(f"{path}: {key} must be a number, got {value!r:.40}")
    return float(value)


_BIN_KEYS = ("lower", "upper", "count", "confidence", "accuracy")


def _well_formed(bins: Any) -> bool:
    """Whether ``bins`` has the per-bin lists of ``metrics.reliability_bins``, all of one length, of numbers."""
    if not (isinstance(bins, dict) and all(isinstance(bins.get(k), list) for k in _BIN_KEYS)
            and len({len(bins[k]) for k in _BIN_KEYS}) == 1):
        return False
    # an empty bin has no mean confidence or accuracy: reliability_bins writes null there
    return all(_is_number(lo) and _is_number(hi) and _is_number(n) and (n == 0 or _is_number(p) and _is_number(a))
               for lo, hi, n, p, a in zip(*(bins[k] for k in _BIN_KEYS)))


def _bins(results: dict[str, Any], path: Path) -> dict[str, list] | None:
    """The reliability bins in ``results``; None if absent or empty of samples, an error naming ``path`` if
    ill-formed (the figure could not be drawn from them)."""
    bins = results.get("bins")
    if bins is None:
        return None
    if not _well_formed(bins):
        raise DataError(f"{path}: 'bins' must hold lists of one length under {', '.join(_BIN_KEYS)}, "
                            "of numbers (null only for the confidence and accuracy of an empty bin)")
    return bins if sum(bins["count"]) > 0 else None


def load_run(run_dir: str | Path) -> Run:
    """Read one run directory; raises ``DataError`` if it or its results.json is missing or unreadable."""
    path = Path(run_dir)
    if not path.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    results_path = path / "results.json"
    if not results_path.is_file():
        raise DataError(f"{run_dir}: no results.json (has this run finished its evaluation?)")
    try:
        results = json.loads(checkpoint.read_text(results_path))
    except json.JSONDecodeError as err:
        raise DataError(f"{results_path}: not readable as JSON ({err})") from None
    if not isinstance(results, dict):
        raise DataError(f"{results_path}: expected a JSON object, got {type(results).__name__}")
    args: Any = None
    args_path = path / "args.yaml"
    if args_path.is_file():
        try:
            args = yaml.safe_load(checkpoint.read_text(args_path))
        except yaml.YAMLError as err:
            raise DataError(f"{args_path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if isinstance(args, dict):  # a training run; --batch-size is per process, so the process count is a setting too
        settings = {**_settings(args), "world_size": results.get("world_size", 1)}
    elif isinstance(results.get("train_args"), dict) and results["train_args"]:  # an evaluation
        # a results.json from before eval recorded the model as built stands for the checkpoint's own
        trained_as = {k: results["train_args"].get(k) for k in ("model", "model_kwargs", "img_size")}
        evaluated = {k: results.get(k, trained_as.get(k)) for k in EVALUATION_KEYS if k != "checkpoint"}
        evaluated["checkpoint"] = Path(str(results.get("checkpoint", ""))).name  # model_best or last
        settings = {**_settings(results["train_args"]), "evaluated": evaluated}
    else:  # nothing says what it trained: a group of its own
        settings = {"run": str(path.resolve())}
    method = settings.get("mix") or results.get("method")
    return Run(label=str(run_dir).rstrip("/") or str(run_dir), method="?" if method is None else str(method),
               top1=_figure(results, "top1", results_path), ece=_figure(results, "ece", results_path),
               nll=_figure(results, "nll", results_path), epoch_time=_mean_epoch_time(path / "summary.csv"),
               bins=_bins(results, results_path), settings=settings)


def _cell(value: float, digits: int, std: float | None = None) -> str:
    if not math.isfinite(value):
        return "–"
    text = f"{value:.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if std is not None else text


def markdown_table(runs: Sequence[Run]) -> str:
    """One row per run: run, method, top-1 (%), ECE (fraction, with the run's --ece-bins), NLL, seconds per epoch."""
    lines = ["| run | method | top-1 (%) | ECE | NLL | time/epoch (s) |", "|---|---|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r.label} | {r.method} | {_cell(r.top1, 2)} | {_cell(r.ece, 4)} | {_cell(r.nll, 4)} "
                     f"| {_cell(r.epoch_time, 2)} |")
    return "\n".join(lines)


def seed_groups(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs grouped by their settings (all but the seed), in first-seen order, each group named by its
    method plus the settings that set it apart from the other groups of that method
    (``mergemix [aux_loss=none]``)."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(json.dumps(_as_floats(r.settings), sort_keys=True, default=str), []).append(r)
    named: dict[str, list[Run]] = {}
    for key, group in groups.items():
        mine = group[0].settings
        others = [g[0].settings for k, g in groups.items() if k != key and g[0].method == group[0].method]
        differ = sorted({k for o in others for k in mine.keys() | o.keys() if _sets_apart(k, mine, o)})
        detail = ", ".join(_difference(k, mine, others) for k in differ)
        named[group[0].method + (f" [{detail}]" if detail else "")] = group
    return named


def _as_floats(value: Any) -> Any:
    """``value`` with its numbers as floats, in its dicts and lists too: 90 and 90.0 (a flag's default and
    the same value read back from a recipe) are one setting, as the naming's ``!=`` finds them."""
    if isinstance(value, dict):
        return {k: _as_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_floats(v) for v in value]
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else value


def _sets_apart(key: str, mine: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether ``key`` names the difference of two groups' settings. A key only one of them has comes
    from a training run against an evaluation (world_size, say, is a training run's): of those only
    ``evaluated`` names it, once, rather than a null for every key the other kind lacks."""
    if (key in mine) != (key in other):
        return key == "evaluated"
    return mine.get(key) != other.get(key)


def _difference(key: str, mine: dict[str, Any], others: list[dict[str, Any]]) -> str:
    """How setting ``key`` sets ``mine`` apart: ``key=value``; for a mapping (an evaluation's
    settings), only its entries that differ from the other groups' (``evaluated.prop_attn=false``),
    or the bare key where no other group has such a mapping."""
    value = mine.get(key)
    if key == "evaluated" and value is None:
        return "training run"
    if not isinstance(value, dict):
        return f"{key}={json.dumps(value, default=str)}"
    peers = [o[key] for o in others if isinstance(o.get(key), dict) and o[key] != value]
    entries = sorted({k for p in peers for k in value.keys() | p.keys() if value.get(k) != p.get(k)})
    return ", ".join(f"{key}.{k}={json.dumps(value.get(k), default=str)}" for k in entries) or key


def method_table(runs: Sequence[Run]) -> str:
    """Mean ± sample std of each figure over each group of runs that differ only in their seed."""
    lines = ["| method | runs | top-1 (%) | ECE | NLL | time/epoch (s) |", "|---|---:|---:|---:|---:|---:|"]
    for method, group in seed_groups(runs).items():
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
    """The parser of ``mergemix compare``'s arguments (a bad flag raises ``ConfigError``)."""
    p = ArgumentParser(prog="mergemix compare", description=__doc__.split("\n\n")[1].replace("``", "`"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (<output>/<experiment>)")
    p.add_argument("--out", default="compare_reliability.png", metavar="FIG.png",
                   help="file to draw the overlaid reliability diagrams to, in the format its suffix names "
                        "(.png, .pdf, .svg, ...); not a file of a run (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def legend_names(folders: list[str]) -> list[str]:
    """Run folders as a figure's legend names them: relative to the deepest folder that holds them all, so
    that absolute paths (/home/me/experiments/...) do not push the legend off the figure; as given where
    the names would no longer be distinct."""
    try:
        common = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in folders]) if folders else ""
    except ValueError:  # on Windows, folders on different drives
        return folders
    names = [os.path.relpath(os.path.abspath(f), common) for f in folders]
    return names if len(set(names)) == len(names) else folders


def command(argv: Sequence[str]) -> int:
    """``mergemix compare`` without the error handling of ``cli.main`` (bad input raises a ``MergeMixError``:
    ``ConfigError`` for flags, ``DataError`` for run files)."""
    args = build_parser().parse_args(argv)
    check_figure_out(args.out)
    runs, seen = [], set()
    for d in args.runs:
        if Path(d).resolve() in seen:
            print(f"note: {d} is given twice; counted once", file=sys.stderr)
            continue
        seen.add(Path(d).resolve())
        runs.append(load_run(d))
    # an evaluation's own bin count, not that of the training run it evaluated
    bins = {(r.settings.get("evaluated") or r.settings).get("ece_bins") for r in runs} - {None}
    if len(bins) > 1:
        print(f"note: the runs' ECEs use different bin counts ({', '.join(map(str, sorted(bins)))}): "
              f"they do not compare exactly", file=sys.stderr)
    with_bins = [r for r in runs if r.bins]
    named_bins = {f"{name} ({r.method})": r.bins for name, r in zip(legend_names([r.label for r in with_bins]), with_bins)}
    if named_bins:  # a figure is to be written: check where before printing anything
        checkpoint.make_dir(Path(args.out).parent, "--out")
    print(markdown_table(runs))
    if any(len(group) > 1 for group in seed_groups(runs).values()):
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
