"""``mergemix compare`` on small run directories laid out as the engine writes them."""
from __future__ import annotations

import json
import statistics

import matplotlib.image as mpimg
import pytest
import torch
import yaml

from mergemix.compare import main
from mergemix.metrics import EvalMetrics


def make_run(root, name: str, mix: str, seed: int, epoch_times=(2.0, 4.0), bins: bool = True) -> dict:
    """A run directory with results.json (from EvalMetrics), args.yaml and summary.csv."""
    g = torch.Generator().manual_seed(seed)
    logits, target = torch.randn(300, 10, generator=g) * 2, torch.randint(0, 10, (300,), generator=g)
    metric = EvalMetrics(10)
    metric.update(logits, target)
    results = metric.compute()
    if not bins:
        del results["bins"]
    run = root / name
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))
    (run / "args.yaml").write_text(yaml.safe_dump({"mix": mix, "seed": seed, "model": "vit_tiny"}))
    rows = ["epoch,train_loss,eval_loss,eval_top1,eval_top5,eval_ece,lr,epoch_time"]
    rows += [f"{e},1.0,1.1,50,80,0.1,0.001,{t}" for e, t in enumerate(epoch_times)]
    (run / "summary.csv").write_text("\n".join(rows) + "\n")
    return results


def table_rows(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_compare_two_runs(tmp_path, capsys):
    a = make_run(tmp_path, "cutmix-s0", "cutmix", seed=0)
    b = make_run(tmp_path, "mergemix-s0", "mergemix", seed=1, epoch_times=(3.0, 5.0, 7.0))
    fig = tmp_path / "figs" / "cmp.png"
    assert main([str(tmp_path / "cutmix-s0"), str(tmp_path / "mergemix-s0"), "--out", str(fig)]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    rows = table_rows(out.out)
    assert rows[str(tmp_path / "cutmix-s0")] == ["cutmix", f"{a['top1']:.2f}", f"{a['ece']:.4f}", f"{a['nll']:.4f}", "3.00"]
    assert rows[str(tmp_path / "mergemix-s0")] == ["mergemix", f"{b['top1']:.2f}", f"{b['ece']:.4f}",
                                                    f"{b['nll']:.4f}", "5.00"]
    assert "| method | runs |" not in out.out  # one run per method: no per-method table
    image = mpimg.imread(fig)
    assert image.shape[:2] == (700, 700) and image[..., :3].std() > 0.05


def test_compare_groups_seeds_and_skips_runs_without_bins(tmp_path, capsys):
    r = [make_run(tmp_path, f"mm-s{s}", "mergemix", seed=s) for s in range(3)]
    make_run(tmp_path, "cm-s0", "cutmix", seed=9, bins=False)
    dirs = [str(tmp_path / f"mm-s{s}") for s in range(3)] + [str(tmp_path / "cm-s0")]
    assert main(dirs + ["--out", str(tmp_path / "cmp.png")]) == 0
    out = capsys.readouterr()
    assert "cm-s0" in out.err and "bins" in out.err and len(out.err.strip().splitlines()) == 1
    by_method = table_rows(out.out[out.out.index("| method | runs |"):])
    top1 = [x["top1"] for x in r]
    assert by_method["mergemix"][:2] == ["3", f"{statistics.fmean(top1):.2f} ± {statistics.stdev(top1):.2f}"]
    assert by_method["cutmix"][0] == "1"
    assert (tmp_path / "cmp.png").is_file()


@pytest.mark.parametrize("case", ["missing_dir", "no_results", "bad_json"])
def test_compare_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    make_run(tmp_path, "ok", "cutmix", seed=0)
    bad = tmp_path / "bad"
    if case != "missing_dir":
        bad.mkdir()
    if case == "bad_json":
        (bad / "results.json").write_text("{not json")
    assert main([str(tmp_path / "ok"), str(bad), "--out", str(tmp_path / "cmp.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0], err
    assert not (tmp_path / "cmp.png").exists()


@pytest.mark.parametrize("argv, words", [
    ([], "the following arguments are required: RUN_DIR (see `mergemix compare --help`)"),
    (["{ok}", "--outt", "x.png"], "unrecognized arguments: --outt"),
    (["{ok}", "--out", "{ok}/results.json/cmp.png"],
     "cannot write to {ok}/results.json: it is a file, not a folder; choose another --out"),
])
def test_compare_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, argv, words):
    make_run(tmp_path, "ok", "cutmix", seed=0)
    ok = tmp_path / "ok"
    assert main([a.format(ok=ok) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words.format(ok=ok) in err[0], err
