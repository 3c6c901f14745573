"""Issue 6 cases not covered elsewhere: reproducible runs, SIGTERM mid-epoch, per-rank seeding,
bad --initial-checkpoint / --resume weights, unwritable eval and viz outputs, no batch of one.

Covered in other files: unknown names, non-ViT, patch size, read-out / merge_num / r, batch size 1,
missing data folder, unwritable --output, --resume with nothing to resume (test_cli's
``test_bad_input_is_one_line_and_exit_2``, ``test_unwritable_output``); empty data folders,
truncated IDX files and images (test_data, test_cli); corrupt checkpoints for --resume and eval,
another architecture or class count for eval (test_cli); bad YAML (test_config); NaN loss, SIGKILL
and SIGINT resume (test_train); DDP end to end (test_train_ddp).
"""
from __future__ import annotations

import copy
import csv
import os
import signal
from pathlib import Path

import pytest
import torch

from mergemix import checkpoint, cli, config, data, mix, models
from mergemix.mix.mergemix import MergeMix
from mergemix.train import build_objective, prepare_model, seed_process

TINY_KWARGS = ["patch_size=4", "embed_dim=32", "depth=2", "num_heads=2"]
WIDER_KWARGS = ["patch_size=4", "embed_dim=48", "depth=2", "num_heads=2"]
SHORT = ["--model-kwargs", *TINY_KWARGS, "--epochs", "2", "--batch-size", "32", "--train-subset", "96",
         "--warmup-epochs", "0", "--log-interval", "1"]  # 3 steps an epoch


def train(out: Path, name: str, *extra: str) -> int:
    return cli.main(["train", "--output", str(out), "--experiment", name, *SHORT, *extra])


def summary(run: Path) -> list[dict[str, str]]:
    """summary.csv rows without the wall-clock column."""
    return [{k: v for k, v in row.items() if k != "epoch_time"} for row in csv.DictReader((run / "summary.csv").open())]


def error_line(capsys: pytest.CaptureFixture) -> str:
    """The one line a failed command printed on stderr."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "error: " in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-epoch MergeMix run (in-process, seed 42)."""
    out = tmp_path_factory.mktemp("reference")
    assert train(out, "ref") == 0
    return out / "ref"


def test_same_seed_same_summary(reference: Path, tmp_path: Path) -> None:
    assert train(tmp_path, "again") == 0
    assert summary(tmp_path / "again") == summary(reference)


class TermAt(MergeMix):
    """MergeMix that sends this process SIGTERM during its ``at``-th call (once)."""

    name = "sigterm_test"
    at, calls = 5, 0  # call 5: epoch 1, step 1 of 3

    def __call__(self, model, x, y):
        TermAt.calls += 1
        if TermAt.calls == TermAt.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__call__(model, x, y)


def test_sigterm_mid_epoch_writes_a_checkpoint_that_resumes_to_the_same_end(reference, tmp_path, monkeypatch,
                                                                            capsys) -> None:
    monkeypatch.setitem(mix._REGISTRY, TermAt.name, TermAt)
    run = tmp_path / "term"
    assert train(tmp_path, "term", "--mix", TermAt.name) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM; resume with: mergemix train --resume {run / checkpoint.LAST}" in err
    ckpt = checkpoint.load(run / checkpoint.LAST)
    assert (ckpt["epoch"], ckpt["step"]) == (0, 2)  # mid-epoch: resumes at epoch 1's third batch
    assert not (run / "results.json").exists()
    stale = run / f".last{checkpoint.TMP_TAG}99999.pth.tar"  # what a kill during a write leaves
    stale.write_bytes(b"partial")
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert summary(run) == summary(reference)
    assert (run / "results.json").is_file() and not stale.exists()


def test_each_rank_draws_its_own_partners_and_masks() -> None:
    # what Trainer does on process `rank` of a torchrun job (its process_seed), without launching one
    args = config.parse_train_args(["--experiment", "x", "--model-kwargs", *TINY_KWARGS])
    model = models.create(args.model, num_classes=10, img_size=16, in_chans=1, model_kwargs=args.model_kwargs)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 16, 16, generator=g), torch.arange(16) % 10

    def draw(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        objective, _ = build_objective(args, 10, seed_process(args.seed, rank))
        with torch.no_grad():
            out = objective(prepare_model(objective, copy.deepcopy(model), args), x, y)
        return out.partner, out.mask

    (partner0, mask0), (again0, again_mask0), (partner1, mask1) = draw(0), draw(0), draw(1)
    assert torch.equal(partner0, again0) and torch.equal(mask0, again_mask0)
    assert not torch.equal(partner0, partner1) and not torch.equal(mask0, mask1)


def test_initial_checkpoint_that_is_corrupt_or_of_another_architecture(tmp_path, capsys) -> None:
    kwargs = dict(config.key_value(kv) for kv in TINY_KWARGS)
    weights = tmp_path / "weights.pth"
    torch.save({"state_dict": models.create("vit_tiny_patch16_224", num_classes=10, img_size=16, in_chans=1,
                                            model_kwargs=kwargs).state_dict()}, weights)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(weights.read_bytes()[:3000])
    for path, words in ((cut, "cannot read --initial-checkpoint"), (weights, "size mismatch for cls_token")):
        assert train(tmp_path, "init", "--model-kwargs", *WIDER_KWARGS, "--initial-checkpoint", str(path)) == 2
        assert words in error_line(capsys)
        assert not (tmp_path / "init").exists()


def test_resume_with_another_architecture_leaves_the_run_intact(reference, capsys) -> None:
    before = (reference / checkpoint.LAST).read_bytes(), (reference / "args.yaml").read_text()
    assert cli.main(["train", "--resume", str(reference), "--epochs", "3", "--model-kwargs", *WIDER_KWARGS]) == 2
    assert "cls_token is (1, 1, 32) in the checkpoint but (1, 1, 48) in the model" in error_line(capsys)
    assert ((reference / checkpoint.LAST).read_bytes(), (reference / "args.yaml").read_text()) == before


def test_eval_and_viz_refuse_an_output_they_cannot_write(reference, tmp_path, capsys) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    assert cli.main(["eval", "--checkpoint", str(reference), "--output", str(blocker / "sub")]) == 2
    assert f"cannot write to {blocker / 'sub'}: {blocker} is a file, not a folder; choose another --output" in error_line(capsys)
    assert cli.main(["viz", "--checkpoint", str(reference), "-n", "2", "--out", str(blocker / "x.png"),
                     "--device", "cpu"]) == 2
    assert "it is a file, not a folder; choose another --out" in error_line(capsys)


def test_training_never_gets_a_batch_of_one() -> None:
    # 65 images: a last batch of 1 would break pairing; it is dropped (per process under DDP too)
    args = config.build_train_parser().parse_args(["--train-subset", "65"])
    bundle = data.build(args)
    for world_size in (1, 2):
        for rank in range(world_size):
            loader = data.train_loader(bundle, 32, 0, rank, world_size, seed=0, device=torch.device("cpu"))
            sizes = [len(y) for _, y in loader]
            assert sizes and set(sizes) == {32}, (world_size, rank, sizes)
