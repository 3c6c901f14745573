"""``mergemix viz`` end to end on digits with a tiny ViT: MergeMix, a box method, a checkpoint, bad input."""
from __future__ import annotations

import matplotlib.image as mpimg
import pytest
import torch

from mergemix import cli, mix, models, viz
from mergemix.config import build_train_parser
from mergemix.train import prepare_model
from mergemix.viz import mix_grid

TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=4", "embed_dim=32", "depth=4", "num_heads=2"]


def main(argv: list[str]) -> int:
    """``mergemix viz ARGV``'s exit code (bad input: one error line, as the console script)."""
    return cli.main(["viz", *argv])


def grid_shape(path) -> tuple[int, int]:
    image = mpimg.imread(path)
    assert image[..., :3].std() > 0.05
    return image.shape[:2]


@pytest.mark.parametrize("method, columns", [("mergemix", 6), ("cutmix", 4)])
def test_viz_draws_every_column_the_method_has(tmp_path, capsys, method: str, columns: int):
    # mergemix: original, partner, attention, clusters, mask, mixed; cutmix has no attention or read-out
    out = tmp_path / f"{method}.png"
    assert main(["--mix", method, *TINY, "--num-samples", "3", "--out", str(out), "--device", "cpu"]) == 0
    assert str(out) in capsys.readouterr().out
    assert grid_shape(out) == (3 * 200 + 30, columns * 200)  # a 30 px strip on top names the method
    title_strip = mpimg.imread(out)[:30, :, :3]
    assert title_strip.min() < 0.5  # dark text on white


def test_viz_with_no_model_flags_uses_the_training_default(tmp_path):
    # the digits ViT `mergemix train` builds by default, and its default method, mergemix
    out = tmp_path / "default.png"
    assert main(["-n", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert grid_shape(out) == (2 * 200 + 30, 6 * 200)


def test_viz_is_reproducible_from_the_seed(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path, seed in zip(paths, (5, 5, 6)):
        assert main(["--mix", "mergemix", *TINY, "-n", "2", "--seed", str(seed), "--out", str(path), "--device", "cpu"]) == 0
    a, b, c = (mpimg.imread(p) for p in paths)
    assert (a == b).all() and not (a == c).all()


def test_viz_from_a_checkpoint_with_its_method(tmp_path):
    args = build_train_parser().parse_args([*TINY[:2], "--mix", "cutmix"])
    args.model_kwargs = dict(patch_size=4, embed_dim=32, depth=4, num_heads=2)
    model = models.create(args.model, num_classes=10, img_size=16, in_chans=1, model_kwargs=args.model_kwargs)
    ckpt = tmp_path / "run" / "last.pth.tar"
    ckpt.parent.mkdir()
    torch.save({"epoch": 1, "arch": args.model, "state_dict": model.state_dict(), "args": vars(args)}, ckpt)
    out = tmp_path / "grid.png"
    assert main(["--checkpoint", str(ckpt.parent), "-n", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert grid_shape(out) == (2 * 200 + 30, 4 * 200)  # the checkpoint's method, cutmix: 4 columns


def test_viz_mix_opt_overrides_the_checkpoints_named_options(tmp_path, monkeypatch):
    """viz's --mix-opt draws the checkpoint's method another way, even where the run set that option by
    its flag (--merge-num 4) or left --smoothing at its default (0.0)."""
    args = build_train_parser().parse_args([*TINY[:2], "--mix", "mergemix", "--merge-num", "4"])
    assert (args.merge_num, args.smoothing) == (4, 0.0)
    args.model_kwargs = dict(patch_size=4, embed_dim=32, depth=4, num_heads=2)
    model = models.create(args.model, num_classes=10, img_size=16, in_chans=1, model_kwargs=args.model_kwargs)
    ckpt = tmp_path / "run" / "last.pth.tar"
    ckpt.parent.mkdir()
    torch.save({"epoch": 1, "arch": args.model, "state_dict": model.state_dict(), "args": vars(args)}, ckpt)
    built = []

    def capture(objective, model, args):  # what viz built, as it hands it on to the step
        model = prepare_model(objective, model, args)
        built.append((objective, models.unwrap(model)))
        return model

    monkeypatch.setattr(viz, "prepare_model", capture)
    assert main(["--checkpoint", str(ckpt), "-n", "2", "--out", str(tmp_path / "g.png"), "--device", "cpu",
                 "--mix-opt", "merge_num=2", "--mix-opt", "smoothing=0.2"]) == 0
    [(objective, net)] = built
    # the checkpoint's would be 4, 0.0 and a schedule merging 4 tokens in all
    assert (objective.merge_num, objective.smoothing, sum(net.tome.r)) == (2, 0.2, 2)


@pytest.mark.parametrize("argv, words", [
    (["--mix", "nosuchmix"], "nosuchmix"),
    (["--mix", "mergemix", "--mix-opt", "lam_policy=bogus"], "lam_policy"),
    (["--mix", "mergemix", "--mix-opt", "no_such_option=1"], "no_such_option"),
    (["--num-samples", "1"], "--num-samples"),
    (["--checkpoint", "/nonexistent/run"], "/nonexistent/run"),
    (["--img-size", "-4"], "--img-size must be at least 1, got -4"),
    (["--mix-opt", "alpha=abc"], "alpha must be a number, got 'abc'"),
    (["--model-kwargs", "foo"], "expected key=value, got 'foo' (see `mergemix viz --help`)"),
    (["--split", "test"], "invalid choice: 'test'"),
])
def test_viz_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, words):
    assert main([*TINY, *argv, "--out", str(tmp_path / "new" / "x.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not (tmp_path / "new").exists()


# the columns each method's step has, from what the method is: every pairing method shows the partner,
# its mask (MixUp's a constant λ, the blend's weight) and the mixed image; those that read attention add
# the attention map; MergeMix adds the merge clusters of its read-out; `none` mixes nothing.
MIX_GRID_COLUMNS = {
    "none": 1,  # original
    **dict.fromkeys(["mixup", "cutmix", "deit", "fmix", "gridmix", "resizemix", "saliencymix", "smoothmix"], 4),
    **dict.fromkeys(["transmix", "tokenmix", "smmix"], 5),  # original, partner, attention, mask, mixed
    "mergemix": 6,  # original, partner, attention, clusters, mask, mixed
}


def test_mix_grid_draws_every_registered_method(tmp_path):
    # one step of each method on the same batch, as viz runs it, without rebuilding the data each time
    assert sorted(MIX_GRID_COLUMNS) == sorted(mix.available())  # a new method needs its count here
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    for name in mix.available():
        model = models.create("vit_tiny_patch16_224", num_classes=10, img_size=8, in_chans=1,
                              model_kwargs=dict(patch_size=2, embed_dim=32, depth=4, num_heads=2))
        objective = mix.create(name, 10, generator=torch.Generator().manual_seed(0))
        model = objective.prepare(model).eval()
        with torch.no_grad():
            out = objective(model, x, y)
        path = mix_grid(x, out, tmp_path / f"{name}.png", patch_size=2, max_samples=2)
        assert grid_shape(path) == (400, MIX_GRID_COLUMNS[name] * 200), name


@pytest.mark.parametrize("out, fragment", [
    ("{run}", "--out {run} is a folder: give the figure's file name, e.g. {run}/figure.png"),
    ("{run}/results.json", "results.json does not end in an image format's suffix: use one of "),
    ("{tmp}/grid.txt", "grid.txt does not end in an image format's suffix"),
    ("{run}/reliability.png", "--out {run}/reliability.png would replace a file of the run or evaluation in {run}"),
])
def test_viz_out_never_replaces_a_run_file(tmp_path, capsys, out, fragment):
    run = tmp_path / "run"
    run.mkdir()
    for name, content in (("args.yaml", b"mix: cutmix\n"), ("results.json", b"{}"), ("reliability.png", b"\x89PNG")):
        (run / name).write_bytes(content)
    names = dict(run=run, tmp=tmp_path)
    assert main([*TINY, "-n", "2", "--out", out.format(**names), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment.format(**names) in err[0], err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == {
        "args.yaml": b"mix: cutmix\n", "results.json": b"{}", "reliability.png": b"\x89PNG"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_viz_replaces_its_own_figure_next_to_a_lone_checkpoint(tmp_path):
    """A checkpoint alone (as one downloads it) is no run: its folder's figures are viz's to redraw."""
    (tmp_path / "weights.pth.tar").write_bytes(b"x")
    for _ in range(2):
        assert main(["--mix", "cutmix", *TINY, "-n", "2", "--out", str(tmp_path / "grid.png"), "--device", "cpu"]) == 0


def test_viz_writes_the_format_its_suffix_names(tmp_path):
    out = tmp_path / "grid.svg"
    assert main(["--mix", "cutmix", *TINY, "-n", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert out.read_bytes().startswith(b"<?xml") and b"<svg" in out.read_bytes()


def test_model_kwargs_without_a_model_change_the_digits_vits():
    """As in `mergemix train`: without --model they change the default ViT's kwargs key by key."""
    from mergemix.config import DEFAULT_MODEL_KWARGS
    from mergemix.viz import _fresh_args, build_parser

    alone = _fresh_args(build_parser().parse_args(["--model-kwargs", "depth=2"]))
    assert alone.model_kwargs == {**DEFAULT_MODEL_KWARGS, "depth": 2}
    named = _fresh_args(build_parser().parse_args(["--model", "vit_small_patch16_224", "--model-kwargs", "depth=2"]))
    assert named.model_kwargs == {"depth": 2}
