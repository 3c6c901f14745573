"""Bad input that used to crash with a traceback: a file that is not a checkpoint, model options the
timm constructor rejects, a device that is not there, offline --pretrained. Each is one ``error:`` line
and exit code 2."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub.utils import logging as hub_logging

from mergemix import checkpoint, cli, models
from mergemix.distributed import resolve_device
from mergemix.errors import CheckpointError, ConfigError

TINY_KWARGS = ["patch_size=4", "embed_dim=32", "depth=2", "num_heads=2"]
NOT_A_CHECKPOINT = "it is not a PyTorch checkpoint; give a file written by torch.save"


def error_line(capsys: pytest.CaptureFixture) -> str:
    """The one line a failed command printed on stderr (and nothing else)."""
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def train(tmp_path: Path, *flags: str) -> int:
    """``mergemix train`` of a tiny ViT for one epoch, writing under ``tmp_path``."""
    return cli.main(["train", "--output", str(tmp_path), "--epochs", "1", "--model-kwargs", *TINY_KWARGS, *flags])


@pytest.fixture(params=["summary.csv", "h.txt"])
def not_a_checkpoint(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A run's summary.csv (unpickling it: IndexError) or a small text file (KeyError)."""
    path = tmp_path / request.param
    path.write_text("epoch,train_loss,eval_top1\n0,2.3,10.0\n" if request.param.endswith(".csv") else "hello\n")
    return path


@pytest.mark.parametrize("command", [["eval", "--checkpoint"], ["viz", "--device", "cpu", "--checkpoint"],
                                     ["train", "--resume"]])
def test_a_file_that_is_not_a_checkpoint_is_one_line(command, not_a_checkpoint, capsys):
    assert cli.main([*command, str(not_a_checkpoint)]) == 2
    assert f"cannot read checkpoint {not_a_checkpoint}: {NOT_A_CHECKPOINT}" in error_line(capsys)


def test_an_initial_checkpoint_that_is_not_a_checkpoint_says_so(not_a_checkpoint, tmp_path, capsys):
    assert train(tmp_path, "--initial-checkpoint", str(not_a_checkpoint)) == 2
    assert f"cannot read --initial-checkpoint {not_a_checkpoint}: {NOT_A_CHECKPOINT}" in error_line(capsys)


def test_an_empty_folder_names_the_checkpoints_each_command_reads(tmp_path, capsys):
    """eval, viz and train --initial-checkpoint read a run folder's model_best.pth.tar, else its last.pth.tar;
    train --resume the last."""
    for command, wanted in ((["eval", "--checkpoint"], "model_best.pth.tar or last.pth.tar"),
                            (["viz", "--device", "cpu", "--checkpoint"], "model_best.pth.tar or last.pth.tar"),
                            (["train", "--initial-checkpoint"], "model_best.pth.tar or last.pth.tar"),
                            (["train", "--resume"], "last.pth.tar")):
        assert cli.main([*command, str(tmp_path)]) == 2
        assert error_line(capsys).endswith(f"no checkpoint at {tmp_path / 'last.pth.tar'}: give a .pth.tar file "
                                           f"or a run folder that holds {wanted}")


def test_names_too_long_for_the_file_system_are_one_line_and_leave_nothing(tmp_path, capsys):
    """A name over 255 bytes raised from Path.exists(), inside the error handler: a traceback, and the
    --output folders it had made stayed. A figure's name needs room for its temporary twin's too."""
    long = "x" * 300
    just_fits = "y" * 250 + ".png"  # a valid name, but not with the temporary ".<stem>.tmp<pid>" around it
    for argv, flag in ((["train", "--output", str(tmp_path / "out"), "--experiment", long, "--epochs", "1"],
                        "--output/--experiment"),
                       (["train", "--output", str(tmp_path / long / "deeper"), "--epochs", "1"], "--output/--experiment"),
                       (["viz", "--device", "cpu", "-n", "2", "--out", str(tmp_path / just_fits)], "--out"),
                       (["compare", str(tmp_path), "--out", str(tmp_path / just_fits)], "--out")):
        assert cli.main(argv) == 2, argv
        line = error_line(capsys)
        assert line.startswith(f"error: {flag} ") and "is too long for the file system" in line, line
    assert list(tmp_path.iterdir()) == []


def test_pretrained_and_an_initial_checkpoint_are_one_too_many(tmp_path, capsys):
    weights = tmp_path / "w.pth.tar"
    weights.write_bytes(b"never read")
    assert train(tmp_path, "--pretrained", "--initial-checkpoint", str(weights)) == 2
    assert f"--pretrained and --initial-checkpoint {weights} both give the starting weights" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth.tar"]


@pytest.mark.parametrize("content, fragment", [
    (b"hello\n", NOT_A_CHECKPOINT),
    (b"", "truncated or corrupt"),  # an empty file may be a checkpoint cut at 0 bytes
    (b"PK\x03\x04garbage", "truncated or corrupt"),  # a zip, as torch.save writes, but broken
])
def test_load_tells_a_corrupt_checkpoint_from_another_file(content, fragment, tmp_path):
    path = tmp_path / "x.pth.tar"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=fragment):
        checkpoint.load(path)


def test_grey_weights_for_rgb_images_point_at_the_data_not_the_architecture():
    grey = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, patch_size=4,
                             depth=1, in_chans=1)
    rgb = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, patch_size=4,
                            depth=1, in_chans=3)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_weights(rgb, grey.state_dict(), "RUN")
    assert "trained on images of 1 channel(s), this data set's have 3: use data like its training set" in str(e.value)
    assert "build the architecture" not in str(e.value)
    deeper = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, patch_size=4,
                               depth=2, in_chans=3)
    with pytest.raises(CheckpointError, match="1 channel.*; build the architecture it was trained with"):
        checkpoint.load_weights(deeper, grey.state_dict(), "RUN")


def test_a_bare_key_error_is_named(tmp_path):
    path = tmp_path / "x.pth.tar"
    path.write_bytes(b"PK\x03\x04")
    assert "(truncated or corrupt: KeyError 101)" in str(checkpoint.unreadable(path, KeyError(101)))


@pytest.mark.parametrize("kwarg, reason", [
    ("patch_size=0", "division or modulo by zero"),
    ("num_heads=5", "dim should be divisible by num_heads"),
    ("patch_size=[4]", "index out of range"),
])
def test_model_kwargs_the_constructor_rejects_are_one_line(kwarg, reason, tmp_path, capsys):
    assert train(tmp_path, kwarg) == 2
    line = error_line(capsys)
    assert "model vit_tiny_patch16_224 cannot be built with --model-kwargs " in line and kwarg in line
    assert f"{reason}): check the names and values its timm constructor takes" in line


def test_a_constructor_error_while_loading_weights_keeps_its_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise AssertionError("a bug in timm's weight loading")

    monkeypatch.setattr(timm, "create_model", broken)
    with pytest.raises(AssertionError):
        models.create("vit_tiny_patch16_224", num_classes=10, img_size=16, in_chans=1, pretrained=True)


@pytest.mark.parametrize("device, fragment", [
    ("mps", "--device mps but this machine has no MPS (Apple GPU) device: use --device cpu"),
    ("cuda:5", "--device cuda:5 but no CUDA device is visible: use --device cpu"),
])
def test_a_device_that_is_not_there_is_one_line(device, fragment, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        resolve_device(device)
    assert str(err.value) == fragment
    assert train(tmp_path, "--device", device) == 2
    assert fragment in error_line(capsys)


def test_offline_pretrained_is_one_line_without_the_hubs_retry_warnings(monkeypatch, tmp_path, capsys, caplog):
    def offline(*args, **kwargs):
        hub_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise OSError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm, "create_model", offline)
    verbosity = hub_logging.get_verbosity()
    assert train(tmp_path, "--pretrained") == 2
    line = error_line(capsys)
    assert "could not load pretrained weights for vit_tiny_patch16_224 from the hub" in line
    assert "HF_HUB_OFFLINE=1" in line
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")]
    assert hub_logging.get_verbosity() == verbosity
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # already offline: the advice is the other way round
    assert train(tmp_path, "--pretrained") == 2
    assert "from the hub's cache (cannot find" in (line := error_line(capsys)) and "unset HF_HUB_OFFLINE" in line
