"""``mergemix compare`` on small run directories laid out as the engine writes them."""
from __future__ import annotations

import json
import statistics

import matplotlib.image as mpimg
import pytest
import torch
import yaml

from mergemix import cli
from mergemix.errors import MergeMixError
from mergemix.metrics import EvalMetrics


def main(argv: list[str]) -> int:
    """``mergemix compare ARGV``'s exit code (bad input: one error line, as the console script)."""
    return cli.main(["compare", *argv])


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


def snapshot(*folders) -> dict:
    """Every file under ``folders`` -> its bytes, to show that a refused command changed nothing."""
    return {p: p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error(capsys, fragment: str) -> None:
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert out.out == "", "the table is printed only once --out is known to be writable"


@pytest.mark.parametrize("out, fragment", [
    ("{b}/results.json", "results.json does not end in an image format's suffix: use one of "),
    ("{b}/args.yaml", "args.yaml does not end in an image format's suffix"),
    ("{tmp}/fig.txt", "fig.txt does not end in an image format's suffix"),
    ("{tmp}/fig", "fig does not end in an image format's suffix"),
    ("{b}", "--out {b} is a folder: give the figure's file name, e.g. {b}/figure.png"),
    ("{b}/reliability.png", "--out {b}/reliability.png would replace a file of the run or evaluation in {b}"),
    ("{b}/eval/reliability.png", "would replace a file of the run or evaluation in {b}/eval"),
])
def test_compare_out_never_replaces_a_run_file(tmp_path, capsys, out, fragment):
    make_run(tmp_path, "a", "cutmix", seed=0)
    make_run(tmp_path, "b", "mergemix", seed=1)
    b = tmp_path / "b"
    (b / "reliability.png").write_bytes(b"\x89PNG the run's own figure")
    (b / "eval").mkdir()  # an evaluation's folder: results.json and its figure
    (b / "eval" / "results.json").write_text("{}")
    (b / "eval" / "reliability.png").write_bytes(b"\x89PNG the evaluation's figure")
    before = snapshot(tmp_path)
    names = dict(b=b, tmp=tmp_path)
    assert main([str(tmp_path / "a"), "--out", out.format(**names)]) == 2
    assert_one_error(capsys, fragment.format(**names))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("suffix, magic", [(".pdf", b"%PDF"), (".svg", b"<?xml"), (".PNG", b"\x89PNG"),
                                           (".jpg", b"\xff\xd8\xff")])
def test_compare_writes_the_format_its_suffix_names(tmp_path, suffix, magic):
    make_run(tmp_path, "a", "cutmix", seed=0)
    fig = tmp_path / f"fig{suffix}"
    assert main([str(tmp_path / "a"), "--out", str(fig)]) == 0
    assert fig.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [fig.name]  # no temporary file left


def test_compare_takes_debug(tmp_path):
    make_run(tmp_path, "a", "cutmix", seed=0)
    assert main([str(tmp_path / "a"), "--debug", "--out", str(tmp_path / "fig.png")]) == 0
    with pytest.raises(MergeMixError, match="no such run directory"):
        main([str(tmp_path / "nope"), "--debug"])


def _strings_in_bins(run) -> None:
    results = json.loads((run / "results.json").read_text())
    results["bins"]["count"] = [str(c) for c in results["bins"]["count"]]
    (run / "results.json").write_text(json.dumps(results))


def _bins_of_two_lengths(run) -> None:
    results = json.loads((run / "results.json").read_text())
    results["bins"]["lower"].pop()
    (run / "results.json").write_text(json.dumps(results))


def _string_top1(run) -> None:
    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**results, "top1": "97.5 %"}))


@pytest.mark.parametrize("spoil, fragment", [
    (_strings_in_bins, "results.json: 'bins' must hold lists of one length under lower, upper, count"),
    (_bins_of_two_lengths, "results.json: 'bins' must hold lists of one length"),
    (_string_top1, "results.json: top1 must be a number, got '97.5 %'"),
    (lambda run: (run / "summary.csv").write_bytes(b"epoch,epoch_time\n0,\xff\xfe\n"),
     "summary.csv: not UTF-8 text (invalid start byte at byte 19)"),
    (lambda run: (run / "args.yaml").write_bytes(b"mix: \xe9\n"), "args.yaml: not UTF-8 text"),
    (lambda run: (run / "results.json").write_bytes(b'{"top1": "\xff"}'), "results.json: not UTF-8 text"),
])
def test_compare_corrupt_run_files_are_one_line_naming_the_file(tmp_path, capsys, spoil, fragment):
    make_run(tmp_path, "ok", "cutmix", seed=0)
    make_run(tmp_path, "bad", "mergemix", seed=1)
    spoil(tmp_path / "bad")
    assert main([str(tmp_path / "ok"), str(tmp_path / "bad"), "--out", str(tmp_path / "cmp.png")]) == 2
    assert_one_error(capsys, f"{tmp_path / 'bad'}/{fragment}")
    assert not (tmp_path / "cmp.png").exists()


def test_compare_groups_only_runs_that_differ_in_their_seed(tmp_path, capsys):
    """Same method on another data set, or with another option, is another group; a folder given
    twice counts once; ECEs over different bin counts get a note."""
    def run(name, seed, **args):
        make_run(tmp_path, name, "cutmix", seed)
        full = {"mix": "cutmix", "seed": seed, "model": "vit_tiny", "dataset": "digits", "ece_bins": 15,
                "output": str(tmp_path), "experiment": name, **args}
        (tmp_path / name / "args.yaml").write_text(yaml.safe_dump(full))
        return str(tmp_path / name)

    dirs = [run("a0", 0), run("a1", 1, workers=4), run("f0", 0, dataset="fashion-mnist"),
            run("e0", 0, epochs=9, ece_bins=10)]
    assert main([*dirs, dirs[0] + "/", "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr()
    groups = table_rows(out.out[out.out.index("| method | runs |"):])
    # a key the args lack counts at its default (epochs: 40), as for a run made before its flag existed
    assert groups['cutmix [dataset="digits", ece_bins=15, epochs=40]'][0] == "2"  # workers is no setting
    assert groups['cutmix [dataset="fashion-mnist", ece_bins=15, epochs=40]'][0] == "1"
    assert groups['cutmix [dataset="digits", ece_bins=10, epochs=9]'][0] == "1"
    assert "is given twice; counted once" in out.err and "different bin counts (10, 15)" in out.err
    # a number written as 90 by one run and 90.0 by another (a recipe read back) is one setting
    dirs = [run("d0", 0, decay_epochs=90), run("d1", 1, decay_epochs=90.0), run("d2", 2, decay_epochs=[90]),
            run("d3", 3, decay_epochs=[90.0])]
    assert main([*dirs, "--out", str(tmp_path / "d.png")]) == 0
    out = capsys.readouterr().out
    groups = table_rows(out[out.index("| method | runs |"):])
    assert {name: row[0] for name, row in groups.items()} == {"cutmix [decay_epochs=90]": "2",
                                                              "cutmix [decay_epochs=[90]]": "2"}
    # --batch-size is per process: 2 processes x 16 is not 1 x 16 (a results.json without world_size: one process)
    dirs = [run("w0", 0, batch_size=16), run("w1", 1, batch_size=16), run("w2", 2, batch_size=16)]
    results = json.loads((tmp_path / "w2" / "results.json").read_text())
    (tmp_path / "w2" / "results.json").write_text(json.dumps({**results, "world_size": 2}))
    (tmp_path / "w1" / "results.json").write_text(json.dumps({**results, "world_size": 1}))
    assert main([*dirs, "--out", str(tmp_path / "w.png")]) == 0
    out = capsys.readouterr().out
    groups = table_rows(out[out.index("| method | runs |"):])
    assert {name: row[0] for name, row in groups.items()} == {"cutmix [world_size=1]": "2", "cutmix [world_size=2]": "1"}


def test_an_evaluation_from_before_eval_recorded_the_model_groups_with_a_newer_one(tmp_path, capsys):
    """results.json gained model, model_kwargs and img_size (the model as built): an older one lacks
    them and stands for the checkpoint's own, so two seeds evaluated the same way are one group."""
    trained = {"mix": "mergemix", "model": "vit_tiny", "model_kwargs": {"depth": 2}, "img_size": 8}
    dirs = []
    for name, seed, new in (("old", 0, {}), ("new", 1, {"model": "vit_tiny", "model_kwargs": {"depth": 2},
                                                        "img_size": 8, "data_dir": None})):
        make_run(tmp_path, name, "mergemix", seed)
        (tmp_path / name / "args.yaml").unlink()
        results = json.loads((tmp_path / name / "results.json").read_text())
        results.update(method="mergemix", seed=seed, weights="state_dict", dataset="digits", ece_bins=15,
                       checkpoint=f"/x/run{seed}/model_best.pth.tar", train_args={**trained, "seed": seed}, **new)
        (tmp_path / name / "results.json").write_text(json.dumps(results))
        dirs.append(str(tmp_path / name))
    assert main([*dirs, "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert [row[0] for row in table_rows(out[out.index("| method | runs |"):]).values()] == ["2"]


def test_an_evaluation_folder_counts_with_its_training_settings_apart_from_training_runs(tmp_path, capsys):
    dirs = []
    for name, seed in (("e0", 0), ("e1", 1)):  # what `mergemix eval` writes: no args.yaml, the run's args inside
        make_run(tmp_path, name, "mergemix", seed)
        (tmp_path / name / "args.yaml").unlink()
        results = json.loads((tmp_path / name / "results.json").read_text())
        results.update(method="mergemix", seed=seed, weights="state_dict", dataset="digits", ece_bins=15,
                       checkpoint=f"/x/run{seed}/model_best.pth.tar",
                       train_args={"mix": "mergemix", "seed": seed, "model": "vit_tiny", "experiment": f"run{seed}"})
        (tmp_path / name / "results.json").write_text(json.dumps(results))
        dirs.append(str(tmp_path / name))
    make_run(tmp_path, "t0", "mergemix", 0)
    assert main([*dirs, str(tmp_path / "t0"), "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert table_rows(out)[dirs[0]][0] == "mergemix"  # the method, not "?"
    groups = table_rows(out[out.index("| method | runs |"):])
    assert [row[0] for row in groups.values()] == ["2", "1"]  # the two evaluations; the training run alone
    # named by their kind alone, not by a null for each key the other kind lacks (world_size=null, ...)
    assert list(groups) == ["mergemix [evaluated]", "mergemix [training run]"]
    assert "different bin counts" not in capsys.readouterr().err
    # seed 0's checkpoint evaluated other ways: in fp16, merged with and without the bias, over 10 bins,
    # on another data folder, at another image size; each a group of its own, and the 10 bins noted
    # although the training that made it used 15
    base = json.loads((tmp_path / "e0" / "results.json").read_text())
    base["train_args"]["ece_bins"] = 15
    ways = {"fp16": {"amp_dtype": "float16"}, "bias": {"merge_num": 8, "prop_attn": True},
            "nobias": {"merge_num": 8, "prop_attn": False}, "bins10": {"ece_bins": 10},
            "v2": {"data_dir": "/data/imagenet-v2"}, "img32": {"img_size": 32}}
    for name, way in ways.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({**base, **way}))
    assert main([*dirs, *(str(tmp_path / name) for name in ways), "--out", str(tmp_path / "ways.png")]) == 0
    out = capsys.readouterr()
    groups = table_rows(out.out[out.out.index("| method | runs |"):])
    assert [row[0] for row in groups.values()] == ["2", "1", "1", "1", "1", "1", "1"]  # seeds 0 and 1 the one way
    # each named by the evaluation settings that set groups apart, not by a dump of all of them
    names = list(groups)[1:]
    assert not any("{" in name for name in names)
    assert [n for n in ('evaluated.amp_dtype="float16"', "evaluated.prop_attn=true", "evaluated.prop_attn=false",
                        "evaluated.ece_bins=10", 'evaluated.data_dir="/data/imagenet-v2"', "evaluated.img_size=32")
            if not any(n in name for name in names)] == []
    assert "different bin counts (10, 15)" in out.err


def test_the_legend_names_runs_relative_to_the_folder_that_holds_them_all(tmp_path):
    """Absolute run paths pushed the reliability legend off the figure's left edge."""
    from mergemix.compare import legend_names

    assert legend_names(["/home/me/exp/runs/a", "/home/me/exp/runs/b/"]) == ["a", "b"]
    assert legend_names(["/home/me/exp/r/a", "/home/me/exp/s/a"]) == ["r/a", "s/a"]
    assert legend_names([str(tmp_path / "only")]) == ["only"]


def test_compare_epoch_time_is_the_mean_and_a_group_skips_figures_a_run_lacks(tmp_path, capsys):
    """Epochs of 1, 2 and 6 s: 3.00 s per epoch (the median would be 2). Two seeds of one setting, one without
    summary.csv: the group's time is the other run's alone (3.00, no spread), not a dash."""
    a = make_run(tmp_path, "mm-s0", "mergemix", seed=0, epoch_times=(1.0, 2.0, 6.0))
    b = make_run(tmp_path, "mm-s1", "mergemix", seed=1)
    (tmp_path / "mm-s1" / "summary.csv").unlink()
    assert main([str(tmp_path / "mm-s0"), str(tmp_path / "mm-s1"), "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert table_rows(out)[str(tmp_path / "mm-s0")][-1] == "3.00" and table_rows(out)[str(tmp_path / "mm-s1")][-1] == "–"
    group = table_rows(out[out.index("| method | runs |"):])["mergemix"]
    top1 = [a["top1"], b["top1"]]
    assert group == ["2", f"{statistics.fmean(top1):.2f} ± {statistics.stdev(top1):.2f}",
                     f"{statistics.fmean([a['ece'], b['ece']]):.4f} ± {statistics.stdev([a['ece'], b['ece']]):.4f}",
                     f"{statistics.fmean([a['nll'], b['nll']]):.4f} ± {statistics.stdev([a['nll'], b['nll']]):.4f}", "3.00"]
