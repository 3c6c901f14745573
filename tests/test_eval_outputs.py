"""``mergemix eval``'s outputs: where they go by default, and never over a training run's files."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from mergemix import cli, models
from mergemix.config import build_train_parser

KWARGS = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)


def save_checkpoint(path, *flags: str, epoch: int = 1) -> None:
    """An untrained tiny digits ViT's checkpoint as training saves it, with the training args of ``flags``."""
    args = build_train_parser().parse_args(["--model", "vit_tiny_patch16_224", *flags])
    args.model_kwargs = KWARGS
    model = models.create(args.model, num_classes=10, img_size=16, in_chans=1, model_kwargs=KWARGS)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "arch": args.model, "state_dict": model.state_dict(), "args": vars(args)}, path)


@pytest.fixture
def run(tmp_path):
    """A run folder as ``mergemix train`` leaves it (an untrained tiny ViT on digits as its checkpoints)."""
    run = tmp_path / "run"
    save_checkpoint(run / "last.pth.tar", "--mix", "cutmix")
    shutil.copy(run / "last.pth.tar", run / "model_best.pth.tar")
    (run / "args.yaml").write_text("mix: cutmix\n")
    (run / "summary.csv").write_text("epoch,eval_top1\n0,10.0\n1,11.0\n")
    (run / "results.json").write_text(json.dumps({"top1": 11.0, "best_top1": 11.0, "train_time_s": 5.0}))
    (run / "reliability.png").write_bytes(b"\x89PNG the run's own figure")
    return run


def files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def evaluate(*argv: str) -> int:
    return cli.main(["eval", *argv, "--device", "cpu"])


@pytest.mark.parametrize("marker", [None, "args.yaml", "summary.csv", "last.pth.tar", "model_best.pth.tar"])
def test_eval_refuses_a_training_run_folder_as_output(run, tmp_path, capsys, marker):
    # the run's own folder, or any folder holding one file of a run (args.yaml alone: killed in its first epoch)
    out = run
    if marker is not None:
        out = tmp_path / "other"
        out.mkdir()
        (out / marker).write_bytes(b"x")
    before, before_out = files(run), files(out)
    assert evaluate("--checkpoint", str(run), "--output", str(out)) == 2
    assert f"--output {out} holds a training run" in error_line(capsys)
    assert files(run) == before and files(out) == before_out


def test_eval_figure_names_the_model_as_built(run, tmp_path, monkeypatch):
    """The timm name alone says patch 16 and depth 12; the figure names the kwargs that changed them."""
    from mergemix import evaluate as evaluate_module

    titles = []
    write = evaluate_module.write_results
    monkeypatch.setattr(evaluate_module, "write_results",
                        lambda *a, title, **k: titles.append(title) or write(*a, title=title, **k))
    assert evaluate("--checkpoint", str(run), "--output", str(tmp_path / "ev")) == 0
    assert titles == ["vit_tiny_patch16_224 (patch_size=4, embed_dim=32, depth=2, num_heads=2)\non digits"]


def test_eval_replaces_its_own_results_only(run, tmp_path, capsys):
    """Evaluated again the same way, an evaluation's folder takes the new figures; another checkpoint's
    evaluation, or this one's evaluated another way, is not replaced. A lone checkpoint is no run."""
    out = tmp_path / "ev"
    assert evaluate("--checkpoint", str(run / "last.pth.tar"), "--output", str(out)) == 0
    assert evaluate("--checkpoint", str(run / "last.pth.tar"), "--output", str(out)) == 0
    before = files(out)
    assert evaluate("--checkpoint", str(run / "model_best.pth.tar"), "--output", str(out)) == 2
    assert f"--output {out} holds another evaluation (checkpoint {run / 'last.pth.tar'})" in error_line(capsys)
    assert evaluate("--checkpoint", str(run / "last.pth.tar"), "--merge-num", "2", "--output", str(out)) == 2
    assert "holds another evaluation (merge_num None, merge_every None, prop_attn None)" in error_line(capsys)
    assert files(out) == before
    # a run folder copied elsewhere keeps its evaluations: evaluated again the same way, they are replaced
    assert evaluate("--checkpoint", str(run / "last.pth.tar")) == 0
    copied = shutil.copytree(run, tmp_path / "copied" / "run")
    assert evaluate("--checkpoint", str(copied / "last.pth.tar")) == 0
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(run / "last.pth.tar", lone / "weights.pth.tar")  # a checkpoint kept alone, as one downloads it
    for _ in range(2):
        assert evaluate("--checkpoint", str(lone / "weights.pth.tar"), "--output", str(lone)) == 0
    assert set(files(lone)) == {"weights.pth.tar", "results.json", "reliability.png"}


def test_another_runs_checkpoint_of_the_same_name_does_not_replace_an_evaluation(run, tmp_path, capsys):
    """Every run saves a last.pth.tar: what tells run A's from run B's is the run folder that holds
    it. Evaluated into the --output that holds A's evaluation, B's last.pth.tar (a run folder of
    another name, the same file name) is refused, naming A's checkpoint, and A's results stay."""
    out = tmp_path / "ev"
    assert evaluate("--checkpoint", str(run / "last.pth.tar"), "--output", str(out)) == 0
    before = files(out)
    other = shutil.copytree(run, tmp_path / "other-run")
    assert evaluate("--checkpoint", str(other / "last.pth.tar"), "--output", str(out)) == 2
    assert f"--output {out} holds another evaluation (checkpoint {run / 'last.pth.tar'})" in error_line(capsys)
    assert files(out) == before

def test_eval_default_folder_names_the_checkpoint(run, capsys):
    # evaluating model_best after last must not replace last's results
    assert evaluate("--checkpoint", str(run / "last.pth.tar")) == 0
    first = files(run / "eval-last-digits")
    assert set(first) == {"results.json", "reliability.png"}
    assert evaluate("--checkpoint", str(run / "model_best.pth.tar")) == 0
    assert files(run / "eval-last-digits") == first
    assert evaluate("--checkpoint", str(run / "last.pth.tar"), "--merge-num", "2", "--merge-every", "2") == 0
    assert evaluate("--checkpoint", str(run / "last.pth.tar"), "--merge-num", "2", "--no-prop-attn") == 0
    assert files(run / "eval-last-digits") == first
    out = capsys.readouterr().out
    for folder in ("eval-last-digits", "eval-model_best-digits", "eval-last-digits-merge2-every2",
                   "eval-last-digits-merge2-noprop"):
        assert f"{run}/{folder}/results.json" in out, folder
    results = {n: json.loads((run / f"eval-{n}-digits" / "results.json").read_text()) for n in ("last", "model_best")}
    assert results["last"]["checkpoint"].endswith("last.pth.tar")
    assert results["model_best"]["checkpoint"].endswith("model_best.pth.tar")
    assert json.loads((run / "results.json").read_text())["best_top1"] == 11.0  # the run's own, untouched
    # other weights or another bin count: folders of their own, not the plain evaluation's replaced
    ckpt = torch.load(run / "last.pth.tar", weights_only=False)
    torch.save({**ckpt, "state_dict_ema": ckpt["state_dict"]}, run / "last.pth.tar")
    assert evaluate("--checkpoint", str(run / "last.pth.tar"), "--use-ema") == 0
    assert evaluate("--checkpoint", str(run / "last.pth.tar"), "--use-ema", "--ece-bins", "10") == 0
    assert files(run / "eval-last-digits") == first
    assert json.loads((run / "eval-last-digits-ema" / "results.json").read_text())["weights"] == "state_dict_ema"
    assert json.loads((run / "eval-last-digits-ema-bins10" / "results.json").read_text())["ece_bins"] == 10


def test_eval_model_kwargs_override_the_saved_ones_key_by_key(run, capsys):
    # depth=2 is the saved depth: the other saved kwargs (patch_size=4, embed_dim=32, ...) stay
    assert evaluate("--checkpoint", str(run), "--model-kwargs", "depth=2", "--output", str(run / "ev")) == 0
    # another depth builds another model: the weights do not fit it
    assert evaluate("--checkpoint", str(run), "--model-kwargs", "depth=3", "--output", str(run / "ev3")) == 2
    assert "weights missing (e.g. blocks.2." in error_line(capsys)
    assert not (run / "ev3").exists()


def test_eval_help_says_the_model_flags_override(capsys):
    with pytest.raises(SystemExit):
        evaluate("--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "only for checkpoints without saved args" not in text
    assert "override the checkpoint's saved model kwargs key by key" in text
    assert "override the checkpoint's saved image size" in text


def test_a_run_folder_means_its_best_model_to_eval_and_viz_and_its_last_to_resume(tmp_path):
    from mergemix import checkpoint

    (tmp_path / checkpoint.LAST).write_bytes(b"")
    assert checkpoint.resolve(tmp_path) == tmp_path / checkpoint.LAST
    assert checkpoint.resolve(tmp_path, best=True) == tmp_path / checkpoint.LAST  # no best yet
    (tmp_path / checkpoint.BEST).write_bytes(b"")
    assert checkpoint.resolve(tmp_path) == tmp_path / checkpoint.LAST
    assert checkpoint.resolve(tmp_path, best=True) == tmp_path / checkpoint.BEST


def test_eval_viz_and_resume_refuse_data_whose_classes_are_named_otherwise(tmp_path, capsys):
    """Same class count, one folder renamed: the label indices of the moved classes would shift."""
    from test_data import make_imagefolder

    make_imagefolder(tmp_path / "data", classes=("ant", "bee", "cat"), per_class=2)
    assert cli.main(["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--workers", "0",
                     "--img-size", "16", "--batch-size", "2", "--epochs", "1", "--mix", "none",
                     "--model-kwargs", "patch_size=4", "embed_dim=32", "depth=2", "num_heads=2",
                     "--output", str(tmp_path), "--experiment", "run"]) == 0
    ckpt = tmp_path / "run" / "last.pth.tar"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["classes"] == ["ant", "bee", "cat"]
    shutil.copytree(tmp_path / "data", tmp_path / "renamed")
    for split in ("train", "val"):
        (tmp_path / "renamed" / split / "bee").rename(tmp_path / "renamed" / split / "zebra")
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(tmp_path / "renamed"), "--workers", "0",
                     "--output", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "was trained on the classes ant, bee, cat, but this data has ant, cat, zebra (bee, zebra differ)" in err
    assert not (tmp_path / "ev").exists()
    assert cli.main(["viz", "--checkpoint", str(ckpt), "--data-dir", str(tmp_path / "renamed"), "--num-samples", "2",
                     "--out", str(tmp_path / "v.png")]) == 2
    assert "(bee, zebra differ)" in capsys.readouterr().err
    # a resume would train the moved classes on new labels, in the run's own folder: refused, nothing written
    before = files(tmp_path / "run")
    assert cli.main(["train", "--resume", str(ckpt), "--data-dir", str(tmp_path / "renamed"), "--epochs", "2"]) == 2
    assert (f"--resume {ckpt} was trained on the classes ant, bee, cat, but this data has ant, cat, zebra (bee, zebra "
            f"differ): name the class folders as in training; to fine-tune on other data, start a new run with "
            f"--initial-checkpoint {ckpt}") in error_line(capsys)
    assert files(tmp_path / "run") == before
    # a checkpoint that names no classes (written before they were saved) still knows their count
    old = torch.load(ckpt, map_location="cpu", weights_only=True)
    del old["classes"]
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "last.pth.tar")
    make_imagefolder(tmp_path / "four", classes=("ant", "bee", "cat", "dog"), per_class=2)
    assert cli.main(["train", "--resume", str(tmp_path / "old"), "--data-dir", str(tmp_path / "four"),
                     "--epochs", "2"]) == 2
    assert "last.pth.tar trained on 3 classes, but this imagefolder has 4: to fine-tune" in error_line(capsys)
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--workers", "0", "--output", str(tmp_path / "ok")]) == 0
    # evaluation reads the val/ split alone: a folder without train/ serves eval and viz of val
    shutil.copytree(tmp_path / "data" / "val", tmp_path / "val_only" / "val")
    only = ["--checkpoint", str(ckpt), "--data-dir", str(tmp_path / "val_only")]
    assert cli.main(["eval", *only, "--workers", "0", "--output", str(tmp_path / "ev_val")]) == 0
    assert json.loads((tmp_path / "ev_val" / "results.json").read_text())["num_images"] == 6
    assert cli.main(["viz", *only, "--num-samples", "2", "--out", str(tmp_path / "v.png")]) == 0
    capsys.readouterr()
    assert cli.main(["viz", *only, "--split", "train", "--num-samples", "2", "--out", str(tmp_path / "t.png")]) == 2
    assert "has no train/ folder" in capsys.readouterr().err


def test_a_saved_relative_data_dir_that_is_not_here_says_so(tmp_path, monkeypatch):
    from mergemix.errors import DataError
    from mergemix.evaluate import build_eval_parser, run_args

    monkeypatch.chdir(tmp_path)
    ckpt = {"args": {"dataset": "imagefolder", "data_dir": "data/flowers"}, "arch": "vit_tiny_patch16_224"}
    with pytest.raises(DataError, match="the checkpoint's --data-dir data/flowers does not exist here"):
        run_args(ckpt, build_eval_parser().parse_args(["--checkpoint", "x"]))
    (tmp_path / "data" / "flowers").mkdir(parents=True)
    assert run_args(ckpt, build_eval_parser().parse_args(["--checkpoint", "x"])).data_dir == "data/flowers"


def test_eval_reads_timm_checkpoints_and_plain_state_dicts(run, tmp_path, capsys):
    """timm train.py's checkpoint (args an argparse.Namespace, arch named), a plain state_dict, DeiT's
    {"model": ...} and a DDP-prefixed state_dict evaluate to the figures of our own checkpoint; only a
    file without an arch needs --model."""
    import argparse

    ours = torch.load(run / "last.pth.tar", weights_only=False)
    weights = ours["state_dict"]
    files = {"timm": {"epoch": 3, "arch": ours["arch"], "state_dict": weights,
                      "args": argparse.Namespace(model=ours["arch"], dataset="torch/cifar10", lr=0.1)},
             "plain": weights, "deit": {"model": weights}, "ddp": {f"module.{k}": v for k, v in weights.items()}}
    tiny = ["--model-kwargs", *(f"{k}={v}" for k, v in KWARGS.items()), "--dataset", "digits"]
    assert evaluate("--checkpoint", str(run / "last.pth.tar"), "--output", str(tmp_path / "ours")) == 0
    expected = json.loads((tmp_path / "ours" / "results.json").read_text())
    for name, content in files.items():
        torch.save(content, tmp_path / f"{name}.pth")
        model = [] if name == "timm" else ["--model", ours["arch"]]
        assert evaluate("--checkpoint", str(tmp_path / f"{name}.pth"), *model, *tiny,
                        "--output", str(tmp_path / name)) == 0, capsys.readouterr().err
        got = json.loads((tmp_path / name / "results.json").read_text())
        assert (got["top1"], got["nll"]) == (expected["top1"], expected["nll"]), name
    assert evaluate("--checkpoint", str(tmp_path / "plain.pth"), *tiny, "--output", str(tmp_path / "x")) == 2
    assert "holds no training args: pass --model" in error_line(capsys)
    torch.save({"epoch": 1}, tmp_path / "empty.pth")
    assert evaluate("--checkpoint", str(tmp_path / "empty.pth"), *tiny, "--output", str(tmp_path / "x")) == 2
    assert "holds no weights" in error_line(capsys)


def test_eval_on_other_data_or_another_build_of_the_model_keeps_the_first_results(run, tmp_path, capsys, monkeypatch):
    """The default folder of an imagefolder checkpoint is named by the data set alone: evaluated on another
    folder of the same classes, it keeps the first figures; so does a folder given another image size or
    model kwargs. The same data named another way is the same evaluation; an --img-size has its own default
    folder; a results.json written before eval recorded these settings counts as the same."""
    from test_data import make_imagefolder

    make_imagefolder(tmp_path / "data", classes=("ant", "bee"), per_class=3)
    make_imagefolder(tmp_path / "other", classes=("ant", "bee"), per_class=2)
    args = build_train_parser().parse_args(["--model", "vit_tiny_patch16_224", "--dataset", "imagefolder",
                                            "--data-dir", str(tmp_path / "data"), "--img-size", "16"])
    args.model_kwargs = KWARGS
    model = models.create(args.model, num_classes=2, img_size=16, in_chans=3, model_kwargs=KWARGS)
    folder_run = tmp_path / "if3"
    folder_run.mkdir()
    torch.save({"epoch": 0, "arch": args.model, "state_dict": model.state_dict(), "args": vars(args),
                "classes": ["ant", "bee"]}, folder_run / "model_best.pth.tar")
    assert evaluate("--checkpoint", str(folder_run), "--workers", "0") == 0
    out = folder_run / "eval-model_best-imagefolder"
    first = files(out)
    assert json.loads(first["results.json"])["num_images"] == 6
    assert evaluate("--checkpoint", str(folder_run), "--data-dir", str(tmp_path / "other"), "--workers", "0") == 2
    assert f"--output {out} holds another evaluation (data_dir {(tmp_path / 'data').resolve()})" in error_line(capsys)
    assert files(out) == first
    other = tmp_path / "ev-other"
    assert evaluate("--checkpoint", str(folder_run), "--data-dir", str(tmp_path / "other"), "--workers", "0",
                    "--output", str(other)) == 0
    assert json.loads((other / "results.json").read_text())["num_images"] == 4
    monkeypatch.chdir(tmp_path)  # the training's data folder, by a relative path: the same evaluation
    assert evaluate("--checkpoint", str(folder_run), "--data-dir", "data", "--workers", "0") == 0

    # digits: the model built at another image size, or with other kwargs, is another evaluation
    plain = run / "eval-model_best-digits"
    assert evaluate("--checkpoint", str(run)) == 0
    assert evaluate("--checkpoint", str(run), "--img-size", "16") == 0  # the size the model has: its own folder
    assert json.loads((run / "eval-model_best-digits-img16" / "results.json").read_text())["img_size"] == 16
    before = files(plain)
    assert evaluate("--checkpoint", str(run), "--img-size", "16", "--output", str(plain)) == 2
    assert f"--output {plain} holds another evaluation (img_size None)" in error_line(capsys)
    assert evaluate("--checkpoint", str(run), "--model-kwargs", "drop_rate=0.5", "--output", str(plain)) == 2
    assert f"holds another evaluation (model_kwargs {KWARGS})" in error_line(capsys)
    assert files(plain) == before
    # written before eval recorded these: absent, they count as the same
    new_keys = ("model_kwargs", "img_size", "data_dir")
    older = {k: v for k, v in json.loads(before["results.json"]).items() if k not in new_keys}
    (plain / "results.json").write_text(json.dumps(older))
    assert evaluate("--checkpoint", str(run)) == 0
    assert json.loads((plain / "results.json").read_text())["model_kwargs"] == KWARGS


def test_eval_checks_its_output_before_the_pass_and_leaves_no_folder_it_made_when_it_fails(run, tmp_path, capsys,
                                                                                           monkeypatch):
    """A folder eval cannot write to stops it before the images are evaluated (the figures would be lost);
    an evaluation that fails leaves no folder it created, and a folder that held results keeps them."""
    from mergemix import evaluate as evaluate_module
    from mergemix.errors import TrainingError

    passes = []
    real = evaluate_module.evaluate
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: passes.append(1) or real(*a, **k))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert evaluate("--checkpoint", str(run), "--output", str(blocker / "ev")) == 2
    assert (f"cannot write to {blocker / 'ev'}: {blocker} is a file, not a folder; choose another --output"
            in error_line(capsys))
    assert passes == [] and blocker.read_text() == "not a folder"

    kept = tmp_path / "ev"
    assert evaluate("--checkpoint", str(run), "--output", str(kept)) == 0 and passes == [1]
    before = files(kept)

    def nan(*a, **k):
        raise TrainingError("7 evaluation images got NaN or infinite logits")

    monkeypatch.setattr(evaluate_module, "evaluate", nan)
    assert evaluate("--checkpoint", str(run), "--output", str(tmp_path / "new" / "deep" / "ev")) == 1
    assert not (tmp_path / "new").exists()
    assert evaluate("--checkpoint", str(run), "--output", str(kept)) == 1
    assert files(kept) == before
    assert evaluate("--checkpoint", str(run)) == 1  # the default folder next to the checkpoint
    assert not (run / "eval-model_best-digits").exists()
    # a failure once the results are written (here in their summary line) keeps them
    monkeypatch.setattr(evaluate_module, "evaluate", real)
    monkeypatch.setattr(evaluate_module, "summary_line", lambda metrics: nan())
    assert evaluate("--checkpoint", str(run), "--output", str(tmp_path / "late")) == 1
    assert set(files(tmp_path / "late")) == {"results.json", "reliability.png"}


def test_an_img_size_equal_to_the_checkpoints_is_the_evaluation_without_it(tmp_path):
    """--img-size N on a checkpoint trained at N builds the same model as no flag: the same default folder
    (an -img<N> one would hold a second copy of the same figures)."""
    run = tmp_path / "sized"
    save_checkpoint(run / "model_best.pth.tar", "--img-size", "16", epoch=0)
    assert evaluate("--checkpoint", str(run)) == 0
    assert evaluate("--checkpoint", str(run), "--img-size", "16") == 0
    assert sorted(p.name for p in run.iterdir()) == ["eval-model_best-digits", "model_best.pth.tar"]
    assert json.loads((run / "eval-model_best-digits" / "results.json").read_text())["img_size"] == 16
