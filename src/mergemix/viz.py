"""``mergemix viz``: draw what a mixing method does to a batch.

One step of any registered method (``--mix``) on a few images of a data set, with a trained
checkpoint or a fresh model, drawn as a grid (``plots.mix_grid``): per sample the original, its
partner, the recovered attention, the merge clusters at the read-out block, the mask and the
mixed image, with λ and λ̂ in the titles. Methods without attention leave those columns out.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checkpoint, data
from .config import (METHOD_OPTION_FLAGS, ArgumentParser, HelpFormatter, KeyValues, add_data_flags, add_device_flag,
                     as_dict, check_limits, key_value, parse_train_args)
from .distributed import setup
from .errors import ConfigError
from .evaluate import model_for, run_args
from .mix import StepOutput
from .models import unwrap
from .plots import check_figure_out, mix_grid
from .tome import patch_size
from .train import build_objective, prepare_model

__all__ = ["build_parser", "command", "draw_step", "mix_grid", "run_viz"]

DEFAULT_SAMPLES = 8  # rows of a grid


def build_parser() -> argparse.ArgumentParser:
    """``mergemix viz``'s flags."""
    p = ArgumentParser(prog="mergemix viz", description=__doc__.split("\n\n")[1].replace("\n", " ").replace("``", "`"),
                       formatter_class=HelpFormatter)
    p.add_argument("--mix", default=None,
                   help="mixing method (default: the checkpoint's, else mergemix); see `mergemix methods`")
    p.add_argument("--mix-opt", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="method option, e.g. merge_num=8 or lam_policy=gaussian (repeatable)")
    p.add_argument("--checkpoint", default=None,
                   help="a .pth.tar file or a run folder (its model_best.pth.tar, else its last.pth.tar); "
                        "default: a fresh model")
    add_data_flags(p, None, "default: the checkpoint's, else the train default")
    p.add_argument("--split", default="eval", choices=("eval", "train"),
                   help="which images: eval (no augmentation) or train (augmented as in training)")
    p.add_argument("--model", default=None, help="timm model name (default: the checkpoint's, else the train default)")
    p.add_argument("--model-kwargs", nargs="*", type=key_value, default=None, action=KeyValues,
                   help="timm.create_model kwargs, e.g. patch_size=2 depth=4 (with --checkpoint: override its "
                        "saved ones key by key)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size (default: the checkpoint's, else the data set's native size)")
    p.add_argument("--num-samples", "-n", type=int, default=DEFAULT_SAMPLES, help="images in the batch (rows of the grid)")
    p.add_argument("--out", default="mix_grid.png",
                   help="file to draw to, in the format its suffix names (.png, .pdf, .svg, ...); not a file of a run")
    p.add_argument("--seed", type=int, default=0, help="picks the images, partners, λ")
    add_device_flag(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _fresh_args(cli: argparse.Namespace) -> argparse.Namespace:
    """Run arguments for a fresh model: what ``mergemix train`` would use with this command's data
    and model flags (so the default small ViT for digits comes with its model kwargs)."""
    flags: list[str] = []
    for name in ("dataset", "data_dir", "model", "img_size"):
        if getattr(cli, name) is not None:
            flags += [f"--{name.replace('_', '-')}", str(getattr(cli, name))]
    if cli.download:
        flags.append("--download")
    args = parse_train_args(flags)
    # as in train: on the digits ViT (no --model) they change its kwargs; a named model has none
    args.model_kwargs = {**args.model_kwargs, **as_dict(cli.model_kwargs, "--model-kwargs")}
    return args


def draw_step(x: Tensor, out: StepOutput, model: nn.Module, path: str | Path, mean: Sequence[float],
              std: Sequence[float], max_samples: int = DEFAULT_SAMPLES, title: str | None = None) -> Path:
    """Draw one step of a method (``plots.mix_grid`` on the model's patch grid) to ``path``, atomically.

    x: the (B, C, H, W) images the step mixed, normalised with ``mean`` and ``std``; out: its StepOutput.
    """
    net = unwrap(model)
    patch = patch_size(net) if hasattr(getattr(net, "patch_embed", None), "feat_ratio") else None
    path = Path(path)
    with checkpoint.atomic_path(path) as tmp:
        mix_grid(x, out, tmp, mean=mean, std=std, patch_size=patch, max_samples=max_samples, title=title)
    return path


def run_viz(cli: argparse.Namespace) -> Path:
    """Build data, model and objective from ``cli`` (see ``build_parser``), run one step, draw it."""
    check_limits(cli)
    check_figure_out(cli.out)
    ckpt = checkpoint.load_weights_file(cli.checkpoint, best=True) if cli.checkpoint else None
    args = run_args(ckpt, cli) if ckpt is not None else _fresh_args(cli)
    if cli.mix and cli.mix != args.mix:
        args.mix, args.mix_opt = cli.mix, {}  # the saved --mix-opt items belong to the saved method
    args.mix_opt = {**as_dict(args.mix_opt, "mix_opt"), **dict(cli.mix_opt)}
    for flag, option in METHOD_OPTION_FLAGS.items():  # viz's --mix-opt overrides the checkpoint's named flags
        if option in dict(cli.mix_opt):
            setattr(args, flag, None)
    device = setup(cli.device).device
    torch.manual_seed(cli.seed)

    bundle = data.build(args, with_train=cli.split == "train")
    dataset = bundle.eval if cli.split == "eval" else bundle.train
    if len(dataset) < cli.num_samples:
        raise ConfigError(f"--num-samples {cli.num_samples} is more than the {len(dataset)} images of that split")
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cli.seed))[: cli.num_samples]
    images, labels = zip(*(dataset[i] for i in picks.tolist()))
    x, y = torch.stack(images).to(device), torch.as_tensor(labels).to(device)

    model = model_for(args, bundle, ckpt, cli.checkpoint)
    objective, _ = build_objective(args, bundle.num_classes, torch.Generator().manual_seed(cli.seed))
    model = prepare_model(objective, model, args).to(device).eval()
    with torch.no_grad():
        out = objective(model, x, y)
    checkpoint.make_dir(Path(cli.out).parent, "--out")
    options = "".join(f" {k}={v}" for k, v in args.mix_opt.items())
    weights = f"weights of {cli.checkpoint}" if ckpt is not None else "untrained model"
    return draw_step(x, out, model, cli.out, bundle.mean, bundle.std, max_samples=cli.num_samples,
                     title=f"--mix {args.mix}{options}, {weights}, {cli.split} split, seed {cli.seed}")


def command(argv: Sequence[str]) -> int:
    """``mergemix viz`` without the error handling of ``cli.main`` (bad input raises ``MergeMixError``)."""
    print(f"wrote {run_viz(build_parser().parse_args(argv))}")
    return 0
