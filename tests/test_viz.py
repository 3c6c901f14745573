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


def recorded_steps(monkeypatch) -> list[dict]:
    """What viz hands ``draw_step`` (the batch, the step's output, the model, the title), each call; it still draws."""
    steps, draw = [], viz.draw_step

    def record(x, out, model, path, mean, std, max_samples=viz.DEFAULT_SAMPLES, title=None):
        steps.append(dict(x=x, out=out, model=model, title=title, training=[m.training for m in model.modules()]))
        return draw(x, out, model, path, mean, std, max_samples=max_samples, title=title)

    monkeypatch.setattr(viz, "draw_step", record)
    return steps


def test_viz_seed_picks_the_images_and_the_partners_and_lambda(tmp_path, monkeypatch):
    """Another --seed, other images and, for them, other partners and λ; the same seed, the same step;
    and the model is drawn in eval mode (no dropout, no drop path)."""
    steps = recorded_steps(monkeypatch)
    for seed in (5, 6, 5):
        assert main(["--mix", "cutmix", *TINY, "-n", "8", "--seed", str(seed), "--out", str(tmp_path / "g.png"),
                     "--device", "cpu"]) == 0
    first, other, again = steps
    assert torch.equal(first["x"], again["x"]) and torch.equal(first["out"].partner, again["out"].partner)
    assert not torch.equal(first["x"], other["x"])
    assert not torch.equal(first["out"].partner, other["out"].partner)
    assert not torch.equal(torch.as_tensor(first["out"].lam), torch.as_tensor(other["out"].lam))
    assert not any(t for step in steps for t in step["training"])
    assert "untrained model" in first["title"] and ", seed 5" in first["title"]


def test_viz_split_train_draws_training_images(tmp_path, monkeypatch):
    steps = recorded_steps(monkeypatch)
    for split in ("eval", "train"):
        assert main(["--mix", "none", *TINY, "-n", "4", "--split", split, "--out", str(tmp_path / "g.png"),
                     "--device", "cpu"]) == 0
    eval_x, train_x = (step["x"] for step in steps)
    assert eval_x.shape == train_x.shape and not torch.equal(eval_x, train_x)
    assert "train split" in steps[1]["title"]


def test_viz_draws_a_row_for_each_of_more_than_eight_samples(tmp_path):
    out = tmp_path / "g.png"
    assert main(["--mix", "cutmix", *TINY, "-n", "10", "--out", str(out), "--device", "cpu"]) == 0
    assert grid_shape(out) == (10 * 200 + 30, 4 * 200)


def test_viz_draws_a_run_folders_best_checkpoint_with_its_weights(tmp_path, monkeypatch):
    """A run folder means its model_best.pth.tar (not last.pth.tar): the model drawn holds its weights."""
    args = build_train_parser().parse_args([*TINY[:2], "--mix", "cutmix"])
    args.model_kwargs = dict(patch_size=4, embed_dim=32, depth=4, num_heads=2)
    run = tmp_path / "run"
    run.mkdir()
    saved = {}
    for name in ("model_best.pth.tar", "last.pth.tar"):
        torch.manual_seed(len(name))  # two different initialisations
        model = models.create(args.model, num_classes=10, img_size=16, in_chans=1, model_kwargs=args.model_kwargs)
        saved[name] = model.state_dict()
        torch.save({"epoch": 1, "arch": args.model, "state_dict": saved[name], "args": vars(args)}, run / name)
    steps = recorded_steps(monkeypatch)
    assert main(["--checkpoint", str(run), "-n", "2", "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 0
    [step] = steps
    drawn = models.unwrap(step["model"]).state_dict()
    assert all(torch.equal(drawn[k], v) for k, v in saved["model_best.pth.tar"].items())
    assert not torch.equal(drawn["head.weight"], saved["last.pth.tar"]["head.weight"])
    assert f"weights of {run}" in step["title"] and "untrained" not in step["title"]


def test_viz_another_mix_leaves_the_checkpoints_method_options_behind(tmp_path, monkeypatch):
    """The checkpoint's --mix-opt items are its method's: drawn with it, but not handed to another --mix."""
    args = build_train_parser().parse_args([*TINY[:2], "--mix", "mergemix"])
    args.model_kwargs = dict(patch_size=4, embed_dim=32, depth=4, num_heads=2)
    args.mix_opt = {"lam_policy": "gaussian"}
    model = models.create(args.model, num_classes=10, img_size=16, in_chans=1, model_kwargs=args.model_kwargs)
    ckpt = tmp_path / "ckpt.pth.tar"
    torch.save({"epoch": 1, "arch": args.model, "state_dict": model.state_dict(), "args": vars(args)}, ckpt)
    built = []
    monkeypatch.setattr(viz, "prepare_model", lambda objective, model, args: built.append(objective) or
                        prepare_model(objective, model, args))
    assert main(["--checkpoint", str(ckpt), "-n", "2", "--out", str(tmp_path / "a.png"), "--device", "cpu"]) == 0
    assert main(["--checkpoint", str(ckpt), "--mix", "cutmix", "-n", "2", "--out", str(tmp_path / "b.png"),
                 "--device", "cpu"]) == 0
    assert [type(o).__name__ for o in built] == ["MergeMix", "CutMix"] and built[0].lam_policy == "gaussian"
