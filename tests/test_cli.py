"""The CLI end to end on digits with a tiny ViT: outputs, checkpoints, eval, methods, bad input."""
from __future__ import annotations

import csv
import inspect
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from mergemix import cli, mix
from mergemix.errors import CheckpointError, ConfigError, DataError, Interrupted, TrainingError
from mergemix.mix.mergemix import MergeMix
from mergemix.mix.plain import NoMix
from mergemix.train import SUMMARY_FIELDS

TINY_KWARGS = ["patch_size=4", "embed_dim=32", "depth=2", "num_heads=2"]
TINY = ["--model-kwargs", *TINY_KWARGS, "--batch-size", "128", "--epochs", "2", "--warmup-epochs", "0"]


def train(tmp_path, name, *extra):
    return cli.main(["train", "--output", str(tmp_path), "--experiment", name, *TINY, *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One default-method (MergeMix) run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("runs")
    assert train(out, "e2e", "--save-mix-samples", "4") == 0
    return out / "e2e"


def test_train_writes_every_output(run):
    for name in ("args.yaml", "summary.csv", "last.pth.tar", "model_best.pth.tar", "results.json",
                 "reliability.png", "curves.png", "mix_samples/epoch000.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    # --save-mix-samples 4: the viz grid of epochs 0, 4, ...: 8 rows x 6 columns of 200 px for MergeMix,
    # under a 30 px title
    assert Image.open(run / "mix_samples/epoch000.png").size == (6 * 200, 8 * 200 + 30)
    assert not (run / "mix_samples/epoch001.png").exists()
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert list(rows[0])[: len(SUMMARY_FIELDS)] == SUMMARY_FIELDS
    assert all(0 <= float(r["eval_top1"]) <= 100 and 0 <= float(r["eval_ece"]) <= 1 for r in rows)
    results = json.loads((run / "results.json").read_text())
    for key in ("top1", "top5", "nll", "ece", "brier", "mce", "ece10", "train_time_s", "best_top1"):
        assert isinstance(results[key], float), key
    assert results["top1"] == pytest.approx(float(rows[-1]["eval_top1"]))
    assert results["method"] == "mergemix" and not list(run.glob(".*tmp*"))


def test_console_ends_with_the_best_epoch_as_timm_does(tmp_path, capsys):
    assert train(tmp_path, "r", "--mix", "none", "--train-subset", "256") == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    last = capsys.readouterr().out.strip().splitlines()[-1]
    epoch = results["best_epoch"]
    assert last == (f"best   top-1 {results['best_top1']:.2f} % at epoch {epoch + 1}/2 (as the epoch lines count; "
                    f"best_epoch {epoch} in results.json): model_best.pth.tar")


def test_checkpoint_is_timm_layout_and_loads_into_a_plain_timm_model(run):
    ckpt = torch.load(run / "last.pth.tar", map_location="cpu", weights_only=True)
    assert {"epoch", "arch", "state_dict", "optimizer", "scheduler", "args", "metric", "rng"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["arch"] == "vit_tiny_patch16_224"
    kwargs = dict(p.split("=") for p in TINY_KWARGS)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, in_chans=1,
                              **{k: int(v) for k, v in kwargs.items()})
    timm.models.load_checkpoint(model, str(run / "last.pth.tar"))  # strict
    assert torch.equal(model.head.weight, ckpt["state_dict"]["head.weight"])


def test_eval_reproduces_the_final_figures(run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["eval", "--checkpoint", str(run / "last.pth.tar"), "--output", str(out)]) == 0
    evaluated = json.loads((out / "results.json").read_text())
    trained = json.loads((run / "results.json").read_text())
    for key in ("top1", "top5", "ece"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-4), key
    assert (out / "reliability.png").is_file()
    assert "top-1" in capsys.readouterr().out


def test_eval_with_token_merging(run, tmp_path, capsys):
    """--merge-num N evaluates the checkpoint ToMe-merged: merge_num 0 is the plain model, N > 0 the
    accuracy of the merged model's own predictions, counted by hand."""
    from types import SimpleNamespace

    from mergemix import data
    from mergemix.tome import patch_tome
    ckpt = run / "last.pth.tar"
    results = {}
    for n in (None, 0, 8):
        out = tmp_path / f"ev{n}"
        assert cli.main(["eval", "--checkpoint", str(ckpt), "--output", str(out),
                         *([] if n is None else ["--merge-num", str(n)])]) == 0
        results[n] = json.loads((out / "results.json").read_text())
    for key in ("top1", "top5", "ece", "nll", "brier"):
        assert results[0][key] == pytest.approx(results[None][key], abs=1e-5), key
    assert "merge_num" not in results[None] and results[8]["merge_num"] == 8
    assert results[8]["tokens_per_block"] == [17, 11]  # 16 patches + CLS; decreasing schedule [6, 2]
    assert "ToMe merge_num 8" in capsys.readouterr().out
    # the same total merged in every 2nd block: all 8 tokens go in block 0 of 2
    out = tmp_path / "ev8every2"
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--output", str(out), "--merge-num", "8", "--merge-every", "2"]) == 0
    every2 = json.loads((out / "results.json").read_text())
    assert (every2["merge_every"], every2["tokens_per_block"]) == (2, [17, 9])
    assert "ToMe merge_num 8, merging every 2 blocks" in capsys.readouterr().out
    # without proportional attention, as a model trained with prop_attn=false runs
    out = tmp_path / "ev8noprop"
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--output", str(out), "--merge-num", "8", "--no-prop-attn"]) == 0
    noprop = json.loads((out / "results.json").read_text())
    assert (results[8]["prop_attn"], noprop["prop_attn"]) == (True, False)
    assert "ToMe merge_num 8, no proportional attention" in capsys.readouterr().out

    kwargs = {k: int(v) for k, v in (p.split("=") for p in TINY_KWARGS)}
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, in_chans=1, **kwargs)
    timm.models.load_checkpoint(model, str(ckpt))
    bundle = data.build(SimpleNamespace(**{**yaml.safe_load((run / "args.yaml").read_text()), "train_subset": None}))
    x, y = map(torch.stack, zip(*[(img, torch.as_tensor(label)) for img, label in bundle.eval]))
    with torch.no_grad():
        plain = model.eval()(x)
        merged = patch_tome(model, merge_num=8)(x)
        merged_every2 = patch_tome(model, r=[8, 0])(x)
        merged_noprop = patch_tome(model, merge_num=8, prop_attn=False)(x)
    assert (merged - plain).abs().max() > 1e-4  # merging changed the logits, so the check below has teeth
    assert (merged_every2 - merged).abs().max() > 1e-4
    assert (merged_noprop - merged).abs().max() > 1e-4
    # the fixture's model predicts (nearly) one class either way, so top-1 alone could not tell merged
    # from plain evaluation: the NLL of each merged variant, hand-computed to 1e-5, can (each is 1.2e-4
    # or more from the plain model's)
    for figures, logits in ((results[8], merged), (every2, merged_every2), (noprop, merged_noprop)):
        assert figures["top1"] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item(), abs=1e-4)
        assert figures["nll"] == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-5)
        assert abs(figures["nll"] - results[0]["nll"]) > 5e-5


@pytest.mark.parametrize("n, fragment", [
    ("-1", "--merge-num must be at least 0, got -1"),
    ("15", "--merge-num 15: merge_num=15 is too large: block 0 would merge 11 of the 16 patch tokens left"),
    ("12 --merge-every 2", "--merge-num 12: merge_num=12 is too large: block 0 would merge 12 of the 16 patch tokens"),
    ("8 --merge-every 0", "--merge-every must be at least 1, got 0"),
    ("--merge-every 2", "--merge-every spreads --merge-num's tokens over the blocks: give --merge-num too"),
    ("--no-prop-attn", "--no-prop-attn drops merged tokens' attention bias: give --merge-num too"),
])
def test_eval_rejects_merge_flags_the_model_cannot_take(run, tmp_path, capsys, n, fragment):
    flags = n.split() if n.startswith("--") else ["--merge-num", *n.split()]
    assert cli.main(["eval", "--checkpoint", str(run), "--output", str(tmp_path / "ev"), *flags]) == 2
    assert fragment in error_line(capsys)
    assert not (tmp_path / "ev").exists()


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_eval_and_viz_reject_a_mismatched_model_or_data(run, tmp_path, capsys):
    assert cli.main(["eval", "--checkpoint", str(run), "--model", "vit_small_patch16_224"]) == 2
    assert "holds a vit_tiny_patch16_224" in error_line(capsys)
    from test_data import make_imagefolder

    make_imagefolder(tmp_path / "folder")
    for command in (["eval"], ["viz", "-n", "2"]):  # viz builds the model as eval does (it failed in the step)
        assert cli.main([*command, "--checkpoint", str(run), "--dataset", "imagefolder",
                         "--data-dir", str(tmp_path / "folder")]) == 2
        assert "classifies 10 classes" in error_line(capsys)


def test_eval_on_another_data_set_whose_classes_fit_says_so(run, tmp_path, capsys):
    from test_data import write_fashion

    write_fashion(tmp_path / "fashion")
    assert cli.main(["eval", "--checkpoint", str(run), "--dataset", "fashion-mnist",
                     "--data-dir", str(tmp_path / "fashion")]) == 0
    assert "note   the checkpoint was trained on digits; these figures are on fashion-mnist" in capsys.readouterr().out
    assert cli.main(["eval", "--checkpoint", str(run)]) == 0
    assert "note" not in capsys.readouterr().out


def test_corrupt_checkpoint_is_one_line(run, tmp_path, capsys):
    broken = tmp_path / "broken.pth.tar"
    broken.write_bytes((run / "last.pth.tar").read_bytes()[:5000])
    assert cli.main(["eval", "--checkpoint", str(broken)]) == 2
    assert "truncated or corrupt" in error_line(capsys)
    assert cli.main(["train", "--resume", str(broken)]) == 2
    assert "truncated or corrupt" in error_line(capsys)


def test_a_finished_run_is_not_overwritten(run, capsys):
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert cli.main(["train", "--output", str(run.parent), "--experiment", run.name, *TINY]) == 2
    assert "already holds a run" in error_line(capsys)
    # resuming it (its own recipe: 2 epochs) has nothing left to train, nor with fewer --epochs
    for fewer in ([], ["--epochs", "1"]):
        assert cli.main(["train", "--resume", str(run), *fewer]) == 2
        assert error_line(capsys).endswith(f"{run / 'last.pth.tar'} has already trained 2 epochs: to train on, "
                                           f"set --epochs above 2 (now {fewer[-1] if fewer else 2})")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_training_into_an_evaluations_folder_does_not_overwrite_it(run, tmp_path, capsys):
    """timm's train.py never writes into a folder that exists; ours continues only its own runs."""
    evaluated = tmp_path / "evaluated"
    assert cli.main(["eval", "--checkpoint", str(run), "--output", str(evaluated)]) == 0
    before = {p.name: p.read_bytes() for p in evaluated.iterdir()}
    assert cli.main(["train", "--output", str(tmp_path), "--experiment", "evaluated", *TINY]) == 2
    assert f"{evaluated} already holds results.json, reliability.png, which this run would replace" in error_line(capsys)
    assert {p.name: p.read_bytes() for p in evaluated.iterdir()} == before


def test_a_resume_into_a_new_folder_killed_before_its_first_checkpoint_may_start_again(run, tmp_path):
    """--resume into a new folder writes args.yaml and carries model_best.pth.tar over before its first
    checkpoint; a run killed then (SIGKILL: nothing cleaned up) may start again there."""
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(run / "model_best.pth.tar", again / "model_best.pth.tar")
    (again / "args.yaml").write_text("mix: cutmix\n")
    assert cli.main(["train", "--resume", str(run), "--epochs", "3", "--output", str(tmp_path),
                     "--experiment", "again"]) == 0
    assert (again / "results.json").is_file()


def test_resuming_into_another_runs_folder_does_not_overwrite_it(run, tmp_path, capsys):
    """--resume continues a run in its own folder; pointed (by --output/--experiment) at a folder
    that holds another run, it must not replace that run's files."""
    other = tmp_path / "other"
    shutil.copytree(run, other)
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    assert cli.main(["train", "--resume", str(run), "--epochs", "3", "--output", str(tmp_path),
                     "--experiment", "other"]) == 2
    said = capsys.readouterr()
    assert said.err.startswith(f"error: {other} already holds a run") and said.err.count("\n") == 1
    assert "resumed" not in said.out  # the refusal is all it says
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before


def test_a_resume_goes_on_with_its_runs_data_only(run, tmp_path, capsys):
    """Resumed onto another data set, a run would add that data's rows to its summary.csv and keep a digits
    epoch as its best: refused before anything is written, in its folder or a new one."""
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for where in ([], ["--output", str(tmp_path), "--experiment", "fork"]):
        assert cli.main(["train", "--resume", str(run), "--epochs", "3", "--dataset", "fashion-mnist", *where]) == 2
        assert (f"--resume {run / 'last.pth.tar'} trained on digits, not --dataset fashion-mnist: a resume goes on "
                f"with its run's data; to fine-tune on other data, start a new run with --initial-checkpoint "
                f"{run / 'last.pth.tar'}") in error_line(capsys)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert not (tmp_path / "fork").exists()


def test_resuming_an_older_checkpoint_in_its_folder_keeps_the_later_epochs(run, tmp_path, capsys):
    """A model_best.pth.tar behind last.pth.tar, resumed in its folder, would overwrite the epochs after it:
    refused before anything is written. Into a new folder, or with last.pth.tar unreadable, it trains on."""
    r1 = tmp_path / "r1"
    shutil.copytree(run, r1)
    older = torch.load(r1 / "last.pth.tar", map_location="cpu", weights_only=True)
    older.update(epoch=0, rows=older["rows"][:1], best={"top1": older["rows"][0]["eval_top1"], "epoch": 0})
    torch.save(older, r1 / "model_best.pth.tar")  # as a run whose best epoch was its first writes it
    before = {p.name: p.read_bytes() for p in r1.iterdir() if p.is_file()}
    resume = ["train", "--resume", str(r1 / "model_best.pth.tar"), "--epochs", "3"]
    assert cli.main(resume) == 2
    said = capsys.readouterr()
    assert said.err == (f"error: {r1 / 'last.pth.tar'} has trained 2 epochs, {r1 / 'model_best.pth.tar'} only "
                        f"1 epoch: going on from it in {r1} would overwrite the later epochs; resume the latest with "
                        f"--resume {r1}, or branch off into a new folder with --experiment NEW\n")
    assert said.out == ""  # refused before any work
    assert {p.name: p.read_bytes() for p in r1.iterdir() if p.is_file()} == before
    assert cli.main([*resume, "--output", str(tmp_path), "--experiment", "branch"]) == 0
    assert [int(r["epoch"]) for r in csv.DictReader((tmp_path / "branch" / "summary.csv").open())] == [0, 1, 2]
    (r1 / "last.pth.tar").write_bytes(before["last.pth.tar"][:5000])  # truncated: model_best is what is left
    assert cli.main(resume) == 0
    assert torch.load(r1 / "last.pth.tar", map_location="cpu", weights_only=True)["epoch"] == 2


def test_resuming_into_a_new_folder_brings_the_best_checkpoint_along(run, tmp_path):
    """The new folder is a whole run: its model_best.pth.tar is the epoch its results call best, even
    when no later epoch beats it (a learning rate of 1e-12 leaves the weights as they were)."""
    assert cli.main(["train", "--resume", str(run), "--epochs", "3", "--lr", "1e-12", "--min-lr", "0",
                     "--output", str(tmp_path), "--experiment", "fork"]) == 0
    fork = tmp_path / "fork"
    best = torch.load(fork / "model_best.pth.tar", map_location="cpu", weights_only=True)
    source = torch.load(run / "model_best.pth.tar", map_location="cpu", weights_only=True)
    results = json.loads((fork / "results.json").read_text())
    assert best["epoch"] == results["best_epoch"] == source["epoch"] < 2
    assert all(torch.equal(v, source["state_dict"][k]) for k, v in best["state_dict"].items())


@pytest.mark.parametrize("flags, fragment", [
    (["--model", "vit_tiny_patch16_2244"], "unknown model"),
    (["--mix", "mergemixx"], "--mix: unknown mixing method 'mergemixx'; choose one of"),
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--model", "resnet18", "--model-kwargs"], "need a timm VisionTransformer, not a ResNet: pick a ViT"),
    (["--mix", "transmix", "--model", "resnet18", "--model-kwargs"], "--mix transmix does not fit resnet18"),
    (["--img-size", "9"], "not divisible by the patch size"),
    (["--readout-block", "7"], "read-out block 7 is out of range for a model with 2 blocks"),
    (["--merge-num", "40"], "merge_num=40 is too large"),
    (["--mix-opt", "r=9"], "r=9 is too large"),
    (["--batch-size", "1"], "--batch-size 1: --mix mergemix pairs every image with another"),
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent"], "does not exist"),
    (["--resume", "/nonexistent/run"], "no checkpoint at"),
    (["--model-kwargs", "patch_size=4", "depthh=2"], "unexpected keyword argument 'depthh'"),
    (["--model-kwargs", "patch_size=4", "depthh=2"], "depthh=2 ("),  # the digits ViT's kwargs, changed by these
    (["--model-kwargs", "depth=abc"], "cannot be built with --model-kwargs patch_size=4 embed_dim=96 depth=abc num_heads=3"),
    (["--opt", "adamww"], "--opt adamww: Optimizer adamww not found"),
    (["--sched", "cosin"], "--sched cosin: Unknown scheduler 'cosin'"),
    # timm's step default of 90 epochs is longer than the run: said in epochs, not only timm's updates
    (["--sched", "wsd"], "(--decay-epochs 90: the decay phase, at most the epochs after warm-up, or below 1 a "
                         "fraction of them, e.g. 0.2)"),
    (["--drop-p", "0.1"], "unrecognized arguments: --drop-p 0.1"),  # no abbreviations: --drop is another flag
    (["--model-kwargs", "patch_size=4", "drop_path_rate=0.1"], "drop_path_rate is set by --drop-path; use that"),
    (["--model-kwargs", "patch_size=4", "num_classes=5"], "num_classes is set by --num-classes; use that"),
    (["--drop", "1"], "--drop must be in [0, 1), got 1.0"),
    (["--clip-mode", "max"], "argument --clip-mode: invalid choice: 'max'"),
    (["--opt-betas", "0.9"], "--opt adamw takes more --opt-betas than 0.9 (Adam and its kin: two)"),
    # timm would drop the betas SGD has no use for, and AdamW's third, without a word
    (["--opt", "sgd", "--opt-betas", "0.9", "0.99"], "--opt sgd (SGD) takes no --opt-betas, got 0.9 0.99"),
    (["--opt-betas", "0.9", "0.99", "0.5"], "--opt adamw (AdamW) takes 2 --opt-betas, got 0.9 0.99 0.5"),
    (["--drop", "0.2", "--model-kwargs", "patch_size=4", "drop_rate=0.1"], "both set the dropout rate: give one"),
    # out-of-range flags: checked with the flags, before any data or model is built
    (["--workers", "-1"], "--workers must be at least 0"),
    (["--img-size", "-4"], "--img-size must be at least 1, got -4"),
    (["--drop-path", "5"], "--drop-path must be in [0, 1), got 5.0"),
    (["--mixup-off-epoch", "-1"], "--mixup-off-epoch must be at least 0 (0: never)"),
    (["--train-subset", "0"], "--train-subset must be at least 1"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be at least 1"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be at least 0"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--warmup-lr", "nan"], "--warmup-lr must be a finite number, got nan"),
    (["--experiment", ""], "--experiment must be a folder name, got ''"),
    (["--experiment", "a/b"], "--experiment must be a folder name, got 'a/b': set the parent folder with --output"),
    (["--mix-opt", "bogus=1"], "--mix mergemix has no option bogus; its options: alpha, aux_loss, lam_policy"),
    (["--mix-opt", "merge_nums=8"], "--mix mergemix has no option merge_nums (did you mean merge_num?); its options"),
    # method options: checked when the method is created, naming the option
    (["--mix-alpha", "-1"], "--mix mergemix: alpha must be a finite number > 0, got -1.0"),
    (["--mix-opt", "alpha=-1"], "--mix mergemix: alpha must be a finite number > 0, got -1"),
    (["--mix-alpha", "inf"], "--mix mergemix: alpha must be a finite number > 0, got inf"),
    (["--mix-opt", "alpha=abc"], "--mix mergemix: alpha must be a number, got 'abc'"),
    (["--mix", "cutmix", "--mix-opt", "prob=abc"], "--mix cutmix: prob must be a number, got 'abc'"),
    (["--smoothing", "2"], "smoothing must be a finite number in [0, 1], got 2.0"),
    (["--merge-num", "8", "--mix-opt", "r=1"], "merge_num=8 and r=1 both given"),
    (["--merge-num", "-3"], "--mix mergemix: merge_num must be a finite number >= 0, got -3"),
    (["--merge-every", "0"], "--mix mergemix: merge_every must be a finite number > 0, got 0"),
    (["--merge-every", "2", "--mix-opt", "r=1"], "merge_every=2 spreads a total merge_num over the blocks"),
    (["--mix-opt", "r=-1"], "--mix mergemix: r must be a finite number >= 0, got -1"),
    (["--mix-opt", "readout_block=-9"], "read-out block -9 is out of range for a model with 2 blocks"),
    (["--mix", "transmix", "--readout-block", "-3"], "read-out block -3 is out of range"),
    (["--dataset", "imagefolder", "--data-dir", "{file}"], "{file} is a file, not a directory"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, flags, fragment):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    flags = [f.format(file=afile) for f in flags]
    out = tmp_path / "out"  # made by the run: it does not exist before
    argv = ["train", "--output", str(out), "--experiment", "bad", "--epochs", "1", *flags]
    if "--model-kwargs" not in flags:
        argv += ["--model-kwargs", *TINY_KWARGS]
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert fragment.format(file=afile) in line, line
    assert not out.exists()  # nothing half-written, no empty --output folder


@pytest.mark.parametrize("flags, fragment", [
    (["--workers", "-1"], "--workers must be at least 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--ece-bins", "0"], "--ece-bins must be at least 1, got 0"),
    (["--img-size", "-4"], "--img-size must be at least 1, got -4"),
])
def test_eval_checks_its_flags_like_train(run, tmp_path, capsys, flags, fragment):
    assert cli.main(["eval", "--checkpoint", str(run), "--output", str(tmp_path / "ev"), *flags]) == 2
    assert fragment in error_line(capsys)
    assert not (tmp_path / "ev").exists()


def test_a_runs_args_yaml_reruns_it_in_a_new_folder(run, capsys):
    """`-c RUN/args.yaml` trains with the same settings into a new run folder next to RUN."""
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    siblings = set(run.parent.iterdir())
    assert cli.main(["train", "-c", str(run / "args.yaml")]) == 0
    capsys.readouterr()
    (new,) = set(run.parent.iterdir()) - siblings
    assert (new / "results.json").is_file() and new.name.endswith("-digits-vit_tiny_patch16_224-mergemix")
    assert yaml.safe_load((new / "args.yaml").read_text()) == yaml.safe_load((run / "args.yaml").read_text())
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # RUN untouched


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path, monkeypatch, capsys):
    class FailsAtFirstStep(NoMix):
        name = "fails_test"

        def __call__(self, model, x, y):
            raise ValueError("boom")

    monkeypatch.setitem(mix._REGISTRY, FailsAtFirstStep.name, FailsAtFirstStep)
    (tmp_path / "kept").mkdir()
    for output in (tmp_path / "new" / "parent", tmp_path / "kept"):
        assert train(output, "x", "--mix", "fails_test") == 2
        assert "--mix fails_test failed at epoch 0 step 0: boom" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not list((tmp_path / "kept").iterdir())
    # a resume that fails before its first checkpoint leaves the run's files, args.yaml included, as they were
    assert train(tmp_path, "done", "--mix", "none", "--epochs", "1") == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir() if p.is_file()}
    assert train(tmp_path, "done", "--resume", str(tmp_path / "done"), "--epochs", "2", "--mix", "fails_test") == 2
    assert "--mix fails_test failed at epoch 1 step 0: boom" in error_line(capsys)
    assert {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir() if p.is_file()} == before


@pytest.mark.parametrize("argv, fragment", [
    (["viz", "--bogus"], "unrecognized arguments: --bogus (see `mergemix viz --help`)"),
    (["viz", "--model-kwargs", "foo"], "expected key=value, got 'foo' (see `mergemix viz --help`)"),
    (["viz", "--img-size", "-4"], "--img-size must be at least 1"),
    # a list flag given twice would keep its last values only (--model-kwargs takes both uses' items)
    (["train", "--opt-betas", "0.9", "--opt-betas=0.99"],
     "--opt-betas given more than once, and only the last would count: give it once, with all its values"),
    (["train", "--decay-milestones", "30", "--decay-milestones", "60"], "--decay-milestones given more than once"),
    (["compare"], "required: RUN_DIR (see `mergemix compare --help`)"),
    (["compare", "--bogus", "x"], "unrecognized arguments: --bogus"),
    (["methods", "x"], "unrecognized arguments: x (see `mergemix methods --help`)"),
    (["frobnicate"], "unknown command 'frobnicate'; choose one of: train, eval, methods, viz, compare"),
])
def test_every_command_reports_bad_flags_in_one_line(capsys, argv, fragment):
    assert cli.main(argv) == 2
    assert fragment in error_line(capsys)


def test_version_names_the_package_and_the_libraries(capsys):
    # the [project] table's version line (tomllib is Python 3.11 on; 3.10 is supported too)
    version = re.search(r'^version = "([^"]+)"$', (Path(__file__).parents[1] / "pyproject.toml").read_text(),
                        re.M).group(1)
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == (f"mergemix {version} (torch {torch.__version__}, timm "
                                               f"{timm.__version__}, Python {sys.version.split()[0]})")


def test_usage_goes_to_stdout_when_asked_for_and_to_stderr_without_a_command(capsys):
    assert cli.main(["--help"]) == 0
    said = capsys.readouterr()
    assert said.out.startswith("usage: mergemix") and said.err == ""
    assert cli.main([]) == 2
    said = capsys.readouterr()
    assert said.err.startswith("usage: mergemix") and said.out == ""


def test_methods_help(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["methods", "--help"])
    assert done.value.code == 0 and "usage: mergemix methods" in capsys.readouterr().out


def test_train_help_shows_the_defaults(capsys):
    """The help is printed from the parser that carries the defaults (not the copy that finds
    which flags were given, whose defaults are all suppressed)."""
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert done.value.code == 0
    assert "--ece-bins ECE_BINS" in out and "(default: 15)" in out
    assert "(default: mergemix)" in out and "(default: digits)" in out


@pytest.mark.parametrize("command", ["train", "eval", "viz"])
def test_help_states_each_default_once_and_mergemix_s_as_its_constructor(command, capsys):
    """A flag whose value comes from elsewhere (None) says where in its text; one whose text names its
    default gets no second "(default: ...)"; MergeMix's option flags name the constructor's defaults."""
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out and not re.search(r"default[^()]*\) \(default: ", out)
    for flag in ("--data-dir DATA_DIR data root", "--download let torchvision download"):
        assert flag in out
    if command == "train":
        defaults = inspect.signature(MergeMix.__init__).parameters
        for flag, option in (("--lam-policy", "lam_policy"), ("--aux-loss", "aux_loss"), ("--score", "score")):
            assert re.search(rf"{flag} {{[a-z_,]+}} [^()]*\(MergeMix; default: {defaults[option].default}\)", out)
        assert defaults["merge_train"].default is True and "(MergeMix; default: on)" in out


def test_mergemix_flags_offer_the_values_the_method_accepts():
    """The parser lists its choices by hand (config imports no torch); they must not drift from the method's."""
    from mergemix.config import build_train_parser
    from mergemix.mix.mergemix import AUX_LOSSES, LAM_POLICIES
    from mergemix.tome import SCORES

    choices = {a.dest: a.choices for a in build_train_parser()._actions}
    assert set(choices["lam_policy"]) == set(LAM_POLICIES) and set(choices["aux_loss"]) == set(AUX_LOSSES)
    assert set(choices["score"]) == set(SCORES)


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert train(blocker, "x") == 2
    assert "cannot write to" in error_line(capsys)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="unknown model"):
        cli.main(["train", "--model", "nope", "--debug", "--output", str(tmp_path)])


def test_methods_lists_every_registered_method(capsys):
    from mergemix import mix

    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in mix.available():
        objective = mix.create(name, 10)
        # the name and its description on one line, the cost on the next, whatever the cost's length
        assert f"\n{name:<13} {objective.description}\n{'':<14}cost per step: {objective.passes}\n" in f"\n{out}"


def test_python_dash_m_and_usage():
    done = subprocess.run([sys.executable, "-m", "mergemix", "frobnicate"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown command 'frobnicate'" in done.stderr
    done = subprocess.run([sys.executable, "-m", "mergemix", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "train" in done.stdout


def test_fp16_amp_with_grad_scaler_clipping_and_ema(tmp_path, monkeypatch, capsys):
    """fp16 autocast + GradScaler + clipping + EMA. A run stopped by SIGINT mid-epoch and resumed ends where
    an uninterrupted run ends (the EMA weights and the scaler's state go through the checkpoint), and
    ``eval --use-ema`` reproduces the EMA figures that training recorded."""

    class CutMixSigint(mix.get_class("cutmix")):
        """CutMix that raises SIGINT in this process at its ``stop_at``-th call."""

        name, stop_at, calls = "cutmix_sigint", 0, 0

        def __call__(self, model, x, y):
            out = super().__call__(model, x, y)
            CutMixSigint.calls += 1
            if CutMixSigint.calls == CutMixSigint.stop_at:
                signal.raise_signal(signal.SIGINT)
            return out

    monkeypatch.setitem(mix._REGISTRY, CutMixSigint.name, CutMixSigint)
    flags = ["--mix", CutMixSigint.name, "--amp", "--amp-dtype", "float16", "--clip-grad", "1", "--model-ema",
             "--model-ema-decay", "0.9", "--train-subset", "512", "--log-interval", "1"]  # 2 epochs x 4 steps
    assert train(tmp_path, "full", *flags) == 0
    CutMixSigint.calls, CutMixSigint.stop_at = 0, 6  # epoch 1, step 2 of 4
    assert train(tmp_path, "amp", *flags) == 128 + signal.SIGINT
    assert "stopped by SIGINT" in capsys.readouterr().err
    full, run = tmp_path / "full", tmp_path / "amp"
    stopped = torch.load(run / "last.pth.tar", map_location="cpu", weights_only=True)
    assert (stopped["epoch"], stopped["step"]) == (0, 2)
    assert stopped["amp_scaler"]["_growth_tracker"] == 6  # 6 scaled steps, none skipped for an overflow
    assert cli.main(["train", "--resume", str(run)]) == 0

    def rows(r):
        return [{k: v for k, v in row.items() if k != "epoch_time"} for row in csv.DictReader((r / "summary.csv").open())]

    assert rows(run) == rows(full) and "ema_eval_ece" in rows(run)[0]
    resumed, uninterrupted = (json.loads((r / "results.json").read_text()) for r in (run, full))
    for key in ("top1", "nll", "ece", "ema"):
        assert resumed[key] == uninterrupted[key], key
    ckpt, ckpt_full = (torch.load(r / "last.pth.tar", map_location="cpu", weights_only=True) for r in (run, full))
    assert ckpt["amp_scaler"] == ckpt_full["amp_scaler"] and ckpt["amp_scaler"]["_growth_tracker"] == 8
    assert all(torch.equal(v, ckpt_full["state_dict_ema"][k]) for k, v in ckpt["state_dict_ema"].items())
    # the EMA weights evaluated on their own give the EMA figures training wrote, not the model's
    assert cli.main(["eval", "--checkpoint", str(run / "last.pth.tar"), "--use-ema", "--amp", "--amp-dtype",
                     "float16", "--output", str(tmp_path / "ema")]) == 0
    ema = json.loads((tmp_path / "ema" / "results.json").read_text())
    for key in ("top1", "nll", "ece", "brier"):
        assert ema[key] == pytest.approx(resumed["ema"][key], abs=1e-6), key
    assert abs(ema["nll"] - resumed["nll"]) > 1e-4 and ema["weights"] == "state_dict_ema"


def test_mixup_off_epoch_trains_the_last_epochs_unmixed(tmp_path, monkeypatch):
    """--mixup-off-epoch 1: the 4 steps of epoch 0 mix, the 4 of epoch 1 train on clean images with
    plain cross-entropy (the digits recipe has no label smoothing)."""
    seen = []

    class CutMixRecorder(mix.get_class("cutmix")):
        name = "cutmix_recorder"

        def __call__(self, model, x, y):
            out = super().__call__(model, x, y)
            seen.append(out.x_mixed is not None)
            if out.x_mixed is None:  # switched off: the loss is torch's CE on the clean batch
                with torch.no_grad():
                    expected = torch.nn.functional.cross_entropy(model(x).float(), y)
                assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
            return out

    monkeypatch.setitem(mix._REGISTRY, CutMixRecorder.name, CutMixRecorder)
    assert train(tmp_path, "off", "--mix", CutMixRecorder.name, "--train-subset", "512", "--mixup-off-epoch", "1") == 0
    assert seen == [True] * 4 + [False] * 4


def test_error_raised_in_a_loader_worker_is_still_one_line(tmp_path, capsys):
    from test_data import make_imagefolder

    make_imagefolder(tmp_path / "folder", per_class=4)
    bad = tmp_path / "folder" / "train" / "cat" / "0.png"
    bad.write_bytes(bad.read_bytes()[:60])
    assert train(tmp_path, "w", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "folder"), "--img-size", "8",
                 "--workers", "1", "--batch-size", "4", "--mix", "none") == 2
    assert "cannot read image" in error_line(capsys) and not (tmp_path / "w").exists()


def test_initial_checkpoint_keeps_a_fitting_head_and_resets_another_and_takes_the_plain_weights(run, tmp_path):
    from mergemix import models

    state = torch.load(run / "last.pth.tar", map_location="cpu", weights_only=True)["state_dict"]
    kwargs = {k: int(v) for k, v in (p.split("=") for p in TINY_KWARGS)}
    same = models.create("vit_tiny_patch16_224", num_classes=10, img_size=16, in_chans=1, model_kwargs=kwargs,
                         initial_checkpoint=str(run / "last.pth.tar"))
    assert all(torch.equal(v, state[k]) for k, v in same.state_dict().items())
    other = models.create("vit_tiny_patch16_224", num_classes=5, img_size=32, in_chans=1, model_kwargs=kwargs,
                          initial_checkpoint=str(run / "last.pth.tar"))
    assert other.head.weight.shape == (5, 32)  # new head; position embeddings resampled for 16 px
    assert torch.equal(other.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    # the plain weights, as the best epoch was picked on them: timm's file loading took an EMA first
    with_ema = {**torch.load(run / "last.pth.tar", map_location="cpu", weights_only=True),
                "state_dict_ema": {k: v + 1 for k, v in state.items()}}
    torch.save(with_ema, tmp_path / "ema.pth.tar")
    plain = models.create("vit_tiny_patch16_224", num_classes=10, img_size=16, in_chans=1, model_kwargs=kwargs,
                          initial_checkpoint=str(tmp_path / "ema.pth.tar"))
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())
    assert "state_dict" not in plain.pretrained_cfg  # no second copy of the weights kept


def test_initial_checkpoint_takes_a_run_folder_as_eval_does(run, tmp_path):
    """A run folder means its model_best.pth.tar, else its last.pth.tar; args.yaml records the file it meant."""
    from mergemix.config import parse_train_args

    assert train(tmp_path, "ft", "--epochs", "1", "--initial-checkpoint", str(run)) == 0
    recipe = yaml.safe_load((tmp_path / "ft" / "args.yaml").read_text())
    assert recipe["initial_checkpoint"] == str(run / "model_best.pth.tar")
    # a resume goes on from its own weights: the starting file is not read again, and may be gone
    start = tmp_path / "start.pth.tar"
    shutil.copy(run / "model_best.pth.tar", start)
    assert train(tmp_path, "gone", "--epochs", "1", "--initial-checkpoint", str(start)) == 0
    start.unlink()
    assert train(tmp_path, "gone", "--resume", str(tmp_path / "gone"), "--epochs", "2") == 0
    (tmp_path / "no_best").mkdir()
    shutil.copy(run / "last.pth.tar", tmp_path / "no_best")
    assert parse_train_args(["--initial-checkpoint", str(tmp_path / "no_best")]).initial_checkpoint == str(
        tmp_path / "no_best" / "last.pth.tar")


def test_dropout_set_by_drop_or_by_model_kwargs_as_older_runs_did():
    """--drop is timm's drop_rate; runs made before it existed saved drop_rate in their model kwargs,
    which still builds the same model (resume, eval, viz)."""
    from mergemix import models

    def dropout(**kw):
        model = models.create("vit_tiny_patch16_224", num_classes=10, img_size=16, in_chans=1, **kw)
        return model.head_drop.p  # timm's ViT applies drop_rate before its head

    small = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    assert dropout(model_kwargs=small) == 0.0
    assert dropout(drop_rate=0.1, model_kwargs=small) == 0.1
    assert dropout(model_kwargs={**small, "drop_rate": 0.1}) == 0.1
    assert dropout(drop_rate=0.1, model_kwargs={**small, "drop_rate": 0.1}) == 0.1


def test_a_rank_that_lost_its_peer_prints_one_line_not_a_traceback(monkeypatch, capsys):
    """Under torchrun, the ranks left behind by a failed one fail in their next collective (gloo:
    'Connection reset by peer'); one line each, so that the failed rank's own error stands out."""
    def lost(argv):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:62129: Connection reset by peer.")

    monkeypatch.setitem(cli.COMMANDS, "train", lost)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train"]) == 1
    assert capsys.readouterr().err == ("[rank 1] error: lost the connection to another process of this run, which "
                                       "stopped first: its own error line says why (--debug: this one's traceback)\n")
    with pytest.raises(RuntimeError, match="by peer"):  # --debug, or a job of one process: the traceback
        cli.main(["train", "--debug"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="by peer"):
        cli.main(["train"])


def test_running_out_of_memory_prints_one_line_with_what_to_lower(monkeypatch, capsys):
    """A batch or image size too large for the machine is the user's to fix: one line with the size the
    allocation asked for and the flags that shrink it, exit 1; --debug and other errors keep the traceback."""
    def huge(argv):  # a real failure of torch's CPU allocator: 2**50 floats (4 PiB) fit no address space
        torch.empty(2 ** 50)

    monkeypatch.setitem(cli.COMMANDS, "train", huge)
    assert cli.main(["train"]) == 1
    assert capsys.readouterr().err == ("error: out of memory: the CPU could not give 4194304.00 GiB; lower "
                                       "--batch-size (--eval-batch-size for the evaluation) or --img-size (--debug: "
                                       "the traceback)\n")
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):
        cli.main(["train", "--debug"])

    def raising(err):
        def command(argv):
            raise err
        return command

    # CUDA's caching allocator's message; below 1 KiB it counts in bytes; viz has no --batch-size
    for command, asked, flags in (("eval", "20.00 GiB", "--batch-size or --img-size"),
                                  ("viz", "512 bytes", "--num-samples or --img-size")):
        monkeypatch.setitem(cli.COMMANDS, command, raising(torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate {asked}. GPU 0 has a total capacity of 139.80 GiB of which 0 "
            "bytes is free.")))
        assert cli.main([command]) == 1
        assert capsys.readouterr().err.startswith(f"error: out of memory: the GPU could not give {asked}; lower {flags}")

    monkeypatch.setitem(cli.COMMANDS, "train", raising(RuntimeError("mat1 and mat2 shapes cannot be multiplied")))
    with pytest.raises(RuntimeError, match="shapes"):  # a bug, not a size: its traceback stays
        cli.main(["train"])


@pytest.mark.parametrize("error, every_rank", [
    (lambda: ConfigError("bad flag"), False), (lambda: CheckpointError("no such file"), False),
    (lambda: Interrupted(signal.SIGINT, Path("run/last.pth.tar")), False),
    # one process's own trouble (its shard's corrupt image, its non-finite loss): every process says it
    (lambda: DataError("corrupt image"), True), (lambda: TrainingError("loss is nan"), True),
])
def test_under_torchrun_an_error_every_process_raises_alike_is_printed_once_per_machine(
        monkeypatch, capsys, error, every_rank):
    def fail(argv):
        raise error()

    monkeypatch.setitem(cli.COMMANDS, "train", fail)
    printed = {}
    for rank, local_rank in [(0, 0), (1, 1), (8, 0)]:  # rank 8: the first of a second machine
        monkeypatch.setenv("WORLD_SIZE", "16"), monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
        monkeypatch.setenv("RANK", str(rank)), monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        assert cli.main(["train"]) == (130 if error().__class__ is Interrupted else error().exit_code)
        printed[rank] = capsys.readouterr().err
    assert printed[0] and printed[8].startswith("[rank 8] ") and bool(printed[1]) == every_rank


def test_the_stop_line_under_torchrun_resumes_with_as_many_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4"), monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert str(Interrupted(signal.SIGTERM, Path("r/last.pth.tar"))) == (
        "stopped by SIGTERM; resume with: torchrun --standalone --nproc_per_node 4 -m mergemix train --resume "
        "r/last.pth.tar")
    monkeypatch.setenv("WORLD_SIZE", "16"), monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert "torchrun --nnodes 2 --nproc_per_node 8 (and this launch's rendezvous flags) -m mergemix train" in str(
        Interrupted(signal.SIGTERM, Path("r/last.pth.tar")))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert str(Interrupted(signal.SIGINT, Path("r"))) == "stopped by SIGINT; resume with: mergemix train --resume r"


@pytest.mark.parametrize("command", ["viz", "compare", "methods"])
def test_one_process_commands_refuse_torchrun(monkeypatch, capsys, command):
    """Each process would do the whole job (viz wrote its figure twice under 2 processes)."""
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli.main([command]) == 2
    assert capsys.readouterr().err == f"error: mergemix {command} runs in one process: run it without torchrun\n"


def test_under_torchrun_a_flag_class_error_one_process_may_meet_alone_is_printed_by_it(tmp_path, monkeypatch,
                                                                                        capsys):
    """A step that fails on this process's batch (a ConfigError) or its own hub download (a
    CheckpointError): the process that meets it says so, local rank 0 or not; a flag error it does not."""
    class FailsAtFirstStep(NoMix):
        name = "fails_test"

        def __call__(self, model, x, y):
            raise ValueError("boom")

    monkeypatch.setitem(mix._REGISTRY, FailsAtFirstStep.name, FailsAtFirstStep)
    monkeypatch.setenv("LOCAL_RANK", "1")  # as the second process of a machine prints (one process runs)
    assert train(tmp_path, "x", "--mix", "fails_test") == 2
    assert "--mix fails_test failed at epoch 0 step 0: boom" in capsys.readouterr().err
    assert train(tmp_path, "x", "--lr", "inf") == 2
    assert capsys.readouterr().err == ""
    from mergemix.models import _weights_error

    assert not _weights_error("vit_tiny_patch16_224", OSError("timed out"), None).every_process_alike


def test_drop_path_and_the_class_count_build_the_model_timm_builds():
    """models.create hands --drop-path and the class count to timm: the same blocks' drop-path rates, the
    same parameters and, with timm's weights loaded, the same outputs as timm.create_model's own model."""
    from mergemix import models

    small = {"patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2}
    ours = models.create("vit_tiny_patch16_224", num_classes=7, img_size=16, in_chans=1, drop_path_rate=0.3,
                         model_kwargs=small)
    theirs = timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=16, in_chans=1, drop_path_rate=0.3,
                               **small)

    def drop_path(model):
        return [getattr(block.drop_path1, "drop_prob", 0.0) for block in model.blocks]

    assert drop_path(ours) == pytest.approx(drop_path(theirs)) and max(drop_path(ours)) == pytest.approx(0.3)
    ours.load_state_dict(theirs.state_dict())  # strict: the same parameters, the head's 7 classes too
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs.eval()(x))


def test_a_stopped_or_interrupted_command_exits_with_128_plus_the_signal(monkeypatch, capsys):
    """The shell's convention: SIGTERM 143, SIGINT (Ctrl-C, a KeyboardInterrupt) 130; one line on stderr."""
    monkeypatch.delenv("WORLD_SIZE", raising=False), monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for error, code, line in ((Interrupted(signal.SIGTERM, Path("r/last.pth.tar")), 128 + signal.SIGTERM,
                               "stopped by SIGTERM; resume with: mergemix train --resume r/last.pth.tar\n"),
                              (KeyboardInterrupt(), 128 + signal.SIGINT, "interrupted\n")):
        def stop(argv, error=error):
            raise error

        monkeypatch.setitem(cli.COMMANDS, "train", stop)
        assert cli.main(["train"]) == code
        said = capsys.readouterr()
        assert (said.out, said.err) == ("", line)


def test_pretrained_weights_keep_the_class_count(monkeypatch):
    """--pretrained builds the model for the data's classes (timm then drops the hub's 1000-class head);
    timm's weight loading is stubbed here: no network in tests."""
    from timm.models import _builder

    from mergemix import models

    monkeypatch.setattr(_builder, "load_pretrained", lambda *args, **kwargs: None)
    model = models.create("vit_tiny_patch16_224", num_classes=7, img_size=16, in_chans=1, pretrained=True,
                          model_kwargs={"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2})
    assert model.head.out_features == 7 and model.num_classes == 7


def test_grey_initial_checkpoint_starts_an_rgb_model_that_sees_grey_images_alike(tmp_path):
    """A 1-channel file for 3-channel data: timm adapts the stem from the channels the file holds, so an
    RGB image whose three channels are one grey image gives the grey model's output."""
    from mergemix import models

    small = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    grey = models.create("vit_tiny_patch16_224", num_classes=10, img_size=16, in_chans=1, model_kwargs=small)
    torch.save({"state_dict": grey.state_dict()}, tmp_path / "grey.pth")
    rgb = models.create("vit_tiny_patch16_224", num_classes=10, img_size=16, in_chans=3, model_kwargs=small,
                        initial_checkpoint=str(tmp_path / "grey.pth"))
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(rgb.eval()(x.expand(-1, 3, -1, -1)), grey.eval()(x), atol=1e-5)


def test_an_error_a_loader_worker_reraises_is_its_own_last_line():
    """torch re-raises a worker's error with the worker's traceback in its message: keep the error's own words."""
    from torch._utils import ExceptionWrapper

    try:
        raise DataError("cannot read image a.png (truncated)")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as raised:
        wrapped.reraise()
    assert "Original Traceback" in str(raised.value)
    assert cli.one_line(raised.value) == "cannot read image a.png (truncated)"
