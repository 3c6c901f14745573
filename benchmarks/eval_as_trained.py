r"""MergeMix runs evaluated plain and merged the way they trained, per label, paired by seed.

    python benchmarks/eval_as_trained.py --name fashion-mnist_tokens-long_as-trained \
        --runs benchmarks/runs/tokens-long/fashion-mnist-mergemix_aux-none*-s?

A MergeMix run trains on merged forwards (with its merge_num, --merge-every and proportional
attention on or off) and `mergemix train` evaluates the plain, unmerged model. This evaluates each
run's final model (last.pth.tar) once more with `mergemix eval --merge-num N --merge-every K
[--no-prop-attn]`, the merging its training forwards had, and sets it beside the run's own plain
figures (its results.json); a run trained with --eval-merged has both already. Runs are grouped
by their folder name without the trailing -s<seed>; runs of one name in different folders, or two
of one seed, are refused (one row, one recipe). --baselines takes runs of methods that train
unmerged (CutMix, say) and sets each row's merged top-1 against theirs, paired by seed.
Writes benchmarks/results/<name>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from bench_common import check_outputs, one_line_errors, paired, plus_minus
from tome_eval import RESULTS, evaluate

from mergemix.errors import ConfigError

KEYS = ("top1", "ece", "nll")


def merging_of(run: Path) -> dict:
    """The merging a run's training forwards had: merge_num, merge_every, prop_attn, merge_train."""
    args = yaml.safe_load((run / "args.yaml").read_text())
    if args.get("mix") != "mergemix" or not args.get("merge_num"):
        raise ConfigError(f"{run} trained with --mix {args.get('mix')} and merge_num {args.get('merge_num')}: "
                          "it did not merge, so plain is how it trained")
    return {"merge_num": args["merge_num"], "merge_every": args.get("merge_every") or 1,
            "prop_attn": (args.get("mix_opt") or {}).get("prop_attn", True),
            "merge_train": args.get("merge_train") is not False}


def label_of(run: Path) -> str:
    return re.sub(r"-s\d+$", "", run.name)


def by_label(runs: list[Path]) -> dict[str, dict[int, Path]]:
    """label -> seed -> run, seeds read from the runs' results.json. ConfigError for two runs of
    one seed, or runs of one label in different folders (as likely as not other recipes)."""
    out: dict[str, dict[int, Path]] = {}
    for run in runs:
        label, seed = label_of(run), json.loads((run / "results.json").read_text())["seed"]
        seeds = out.setdefault(label, {})
        other = seeds.get(seed) or next(iter(seeds.values()), run)
        elsewhere = other.parent.resolve() != run.parent.resolve()
        why = f"both seed {seed}" if seed in seeds else "in different folders" if elsewhere else None
        if why:
            raise ConfigError(f"{other} and {run} are runs of one row {label!r}, {why}: give the runs of one "
                              "recipe, or evaluate each folder's runs under their own --name")
        seeds[seed] = run
    return out


def against_baselines(rows: list[dict], baselines: dict[str, dict[int, float]]) -> dict:
    """Merged top-1 minus each baseline's (plain) top-1 over the seeds both have."""
    out = {}
    for label, top1_by_seed in baselines.items():
        common = [r for r in rows if r["seed"] in top1_by_seed]
        if common:
            out[label] = {"seeds": [r["seed"] for r in common], "baseline_top1": statistics.mean(
                top1_by_seed[r["seed"]] for r in common), **paired([r["merged"]["top1"] - top1_by_seed[r["seed"]]
                                                                    for r in common])}
    return out


def summary(rows: list[dict]) -> dict:
    """Mean ± std of each figure plain and merged, and the merged - plain top-1 paired by seed (± SE)."""
    out = {"seeds": [r["seed"] for r in rows], **rows[0]["merging"]}
    for how in ("plain", "merged"):
        for key in KEYS:
            values = [r[how][key] for r in rows]
            out[f"{how}_{key}"] = statistics.mean(values)
            out[f"{how}_{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
    diff = paired([r["merged"]["top1"] - r["plain"]["top1"] for r in rows])
    out["diff_top1"], out["diff_top1_se"], out["diffs"] = diff["mean"], diff["se"], diff["diffs"]
    return out


def markdown(table: dict[str, dict]) -> str:
    lines = ["Final models (last.pth.tar), the full evaluation set; plain: the run's own evaluation; merged: "
             "`mergemix eval` with the run's training merging (or the run's own `--eval-merged` figures). merged − plain: top-1 points paired by seed, "
             "mean ± SE.", "",
             "| run | seeds | merging in training | top-1 plain (%) | top-1 merged (%) | merged − plain | ECE plain "
             "| ECE merged |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for label, s in table.items():
        how = (f"{s['merge_num']} tokens, every {s['merge_every']} block(s), bias {'on' if s['prop_attn'] else 'off'}"
               + ("" if s["merge_train"] else ", training forward unmerged"))
        lines.append(f"| {label} | {len(s['seeds'])} | {how} | {plus_minus(s['plain_top1'], s['plain_top1_std'], 2)} | "
                     f"{plus_minus(s['merged_top1'], s['merged_top1_std'], 2)} | "
                     f"{plus_minus(s['diff_top1'], s['diff_top1_se'], 2, '+')} | {s['plain_ece']:.4f} | {s['merged_ece']:.4f} |")
    versus = [(label, base, v) for label, s in table.items() for base, v in s.get("vs", {}).items()]
    if versus:
        lines += ["", "Merged top-1 against runs that trained unmerged (their own plain evaluation), points paired "
                  "by seed, mean ± SE:", "", "| run | against | seeds | their top-1 (%) | merged − theirs | by seed |",
                  "|---|---|---:|---:|---:|---|"]
        lines += [f"| {label} | {base} | {len(v['seeds'])} | {v['baseline_top1']:.2f} | "
                  f"{plus_minus(v['mean'], v['se'], 2, '+')} | {', '.join(f'{d:+.2f}' for d in v['diffs'])} |"
                  for label, base, v in versus]
    return "\n".join(lines)


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="MergeMix training run folders")
    p.add_argument("--baselines", type=Path, nargs="+", default=[],
                   help="finished runs that trained unmerged (e.g. CutMix), compared by seed with each merged row")
    p.add_argument("--name", required=True, help="results file stem under --results-dir")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every `mergemix eval`")
    args = p.parse_args(argv)
    stem = args.results_dir / args.name
    check_outputs([stem.with_suffix(".json"), stem.with_suffix(".md")], f"--results-dir {args.results_dir}")
    for run in [*args.runs, *args.baselines]:
        if not (run / "results.json").is_file() or not (run / "last.pth.tar").is_file():
            raise ConfigError(f"{run} is not a finished training run (results.json and last.pth.tar)")
    merging = {run: merging_of(run) for run in args.runs}  # every run checked before any evaluation
    runs_by_label = by_label(sorted(args.runs))
    baselines = {label: {seed: json.loads((run / "results.json").read_text())["top1"] for seed, run in runs.items()}
                 for label, runs in by_label(args.baselines).items()}
    groups: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, runs in runs_by_label.items():
            for run in (runs[seed] for seed in sorted(runs)):
                m = merging[run]
                plain = json.loads((run / "results.json").read_text())
                # a run trained with --eval-merged evaluated its final model so already
                merged, merged_by = plain.get("merged"), "mergemix train --eval-merged"
                if merged is None:
                    merged, merged_by = evaluate(str(run / "last.pth.tar"), m["merge_num"], m["merge_every"],
                                                 m["prop_attn"], args.extra, Path(tmp) / run.name), "mergemix eval"
                if merged is None:
                    raise ConfigError(f"{run}: its merging does not fit the model it saved")
                groups.setdefault(label, []).append(
                    {"seed": plain["seed"], "merging": m, "plain": {k: plain[k] for k in KEYS},
                     "merged": {k: merged[k] for k in KEYS}, "merged_by": merged_by})
    table = {label: {**summary(rows), **({"vs": against_baselines(rows, baselines)} if baselines else {})}
             for label, rows in groups.items()}
    stem.with_suffix(".json").write_text(json.dumps({"table": table, "runs": groups}, indent=2) + "\n")
    text = markdown(table)
    stem.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
