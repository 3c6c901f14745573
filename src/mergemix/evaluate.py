"""Evaluation: one pass over the evaluation set into ``EvalMetrics``, results.json and the reliability diagram.

``mergemix eval --checkpoint PATH`` rebuilds the model a checkpoint was trained with (from the
``args`` saved in it), loads its weights and evaluates it on that run's data set or another one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm import tqdm

from . import checkpoint, data, models
from .config import (ECE_BINS, ArgumentParser, HelpFormatter, KeyValues, add_amp_flags, add_data_flags,
                     add_device_flag, add_workers_flag, as_dict, check_limits, key_value, train_defaults)
from .distributed import Context, cleanup, on_main, setup
from .errors import CheckpointError, ConfigError, DataError, TrainingError
from .tome import patch_tome, tokens_per_block

RESULT_KEYS = ("top1", "top5", "nll", "brier", "ece", "ece10", "mce")


def autocast_dtype(args: argparse.Namespace) -> torch.dtype | None:
    """The autocast dtype that ``--amp`` and ``--amp-dtype`` ask for, or None without ``--amp``."""
    return getattr(torch, args.amp_dtype) if args.amp else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision when ``dtype`` is given, else nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, num_classes: int, n_bins: int,
             device: torch.device, amp_dtype: torch.dtype | None = None, show: bool = True,
             desc: str = "eval") -> dict[str, Any]:
    """Top-1/5, NLL, Brier, ECE, MCE and reliability bins over ``loader``, synced over processes."""
    from .metrics import EvalMetrics

    was_training = model.training
    model.eval()
    # the metric sums are fp64, which Apple GPUs lack: there they are kept on the CPU
    on = torch.device("cpu") if device.type == "mps" else device
    metrics = EvalMetrics(num_classes, n_bins=n_bins).to(on)
    for x, y in tqdm(loader, desc=desc, leave=False, disable=None if show else True):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # a new CUDA-graph generation per batch (torch.compile's reduce-overhead): once training has
        # marked its steps, unmarked calls would never leave the warm-up and never replay a graph
        torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, amp_dtype):
            logits = model(x)
        metrics.update(logits.to(on), y.to(on))
    model.train(was_training)
    result = metrics.compute()
    if result["nonfinite"]:
        raise TrainingError(f"{result['nonfinite']} evaluation images got NaN or infinite logits, so the figures "
                            f"would mean nothing (fp16 overflow? try --amp-dtype bfloat16)")
    return result


def write_results(run_dir: Path, metrics: dict[str, Any], extra: dict[str, Any], title: str) -> dict[str, Any]:
    """results.json (figures, then ``extra``, then the reliability bins) and reliability.png, atomically."""
    from .plots import reliability_diagram

    results = {**{k: metrics[k] for k in RESULT_KEYS}, **extra, "bins": metrics["bins"]}
    checkpoint.write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    with checkpoint.atomic_path(run_dir / "reliability.png") as tmp:
        reliability_diagram(metrics["bins"], tmp, title=title)
    return results


def summary_line(metrics: dict[str, Any]) -> str:
    """The metrics of one evaluation on one line, as train and eval print them."""
    return (f"top-1 {metrics['top1']:.2f} %  top-5 {metrics['top5']:.2f} %  ECE {metrics['ece']:.4f}  "
            f"NLL {metrics['nll']:.4f}  Brier {metrics['brier']:.4f}")


def build_eval_parser() -> argparse.ArgumentParser:
    """``mergemix eval``'s flags."""
    p = ArgumentParser(prog="mergemix eval", formatter_class=HelpFormatter,
                       description="Evaluate a checkpoint; writes results.json and reliability.png.")
    p.add_argument("--checkpoint", required=True,
                   help="a .pth.tar file or a run folder (its model_best.pth.tar, else its last.pth.tar)")
    add_data_flags(p, None, "default: the data set the checkpoint was trained on")
    p.add_argument("--model", default=None,
                   help="timm model name: required for a weights file that names none (no saved args or "
                        "arch: a plain state_dict, {'model': ...}); otherwise it must be the one the file holds")
    p.add_argument("--model-kwargs", nargs="*", type=key_value, default=None, action=KeyValues, metavar="KEY=VALUE",
                   help="override the checkpoint's saved model kwargs key by key (the others stay as saved), "
                        "e.g. drop_rate=0; the model must still fit the saved weights")
    p.add_argument("--img-size", type=int, default=None,
                   help="override the checkpoint's saved image size (default: the saved one, else the data set's)")
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights (state_dict_ema)")
    p.add_argument("--batch-size", "-b", type=int, default=256, help="per process")
    add_workers_flag(p)
    add_device_flag(p)
    add_amp_flags(p)
    p.add_argument("--ece-bins", type=int, default=ECE_BINS,
                   help="equal-width confidence bins of ECE, MCE and the reliability diagram")
    p.add_argument("--merge-num", type=int, default=None,
                   help="evaluate with token merging (ToMe): this many tokens merged in all, spread as a "
                        "decreasing schedule over the blocks, proportional attention on (default: no merging)")
    p.add_argument("--no-prop-attn", dest="prop_attn", action="store_false",
                   help="with --merge-num: without ToMe's proportional attention (the log-size attention bias), "
                        "as a model trained with --mix-opt prop_attn=false was; on a GPU a merged attention call "
                        "without the bias can use the fastest kernels")
    p.add_argument("--merge-every", type=int, default=None,
                   help="with --merge-num: merge in every k-th block only, the same total in fewer steps "
                        "(default: 1, every block)")
    p.add_argument("--output", default=None,
                   help="folder for results; not a training run's folder (default: <checkpoint folder>/"
                        "eval-<checkpoint>-<dataset>[-merge<N>[-every<k>][-noprop]][-ema][-<amp dtype>][-bins<N>]"
                        "[-img<N>], <checkpoint>: its file name without .pth.tar, e.g. model_best)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run_args(ckpt: dict[str, Any], cli: argparse.Namespace) -> argparse.Namespace:
    """The training arguments of the checkpoint, with this command's data and model flags on top."""
    args = train_defaults()
    saved = ckpt.get("args") or {}
    vars(args).update({k: v for k, v in saved.items() if k in vars(args)})
    if not saved:  # a weights file, or another tool's checkpoint: its arch (timm's) or --model says what to build
        if cli.model is None and not ckpt.get("arch"):
            raise CheckpointError("this checkpoint holds no training args: pass --model (and --model-kwargs, --img-size)")
        args.model, args.num_classes = ckpt.get("arch") or args.model, None
    for key in ("dataset", "data_dir", "model", "img_size"):
        if getattr(cli, key) is not None:
            setattr(args, key, getattr(cli, key))
    if cli.data_dir is None and args.data_dir and not Path(args.data_dir).exists() and not cli.download:
        raise DataError(f"the checkpoint's --data-dir {args.data_dir} does not exist here (a relative path counts "
                        f"from where training ran): pass --data-dir")
    # key by key, as `mergemix train --model-kwargs` does on the digits ViT's: replacing all of them
    # would build another architecture than the weights' from a flag meant to change one setting
    args.model_kwargs = {**as_dict(args.model_kwargs, "model_kwargs"),
                         **as_dict(cli.model_kwargs, "--model-kwargs")}
    args.download = cli.download
    args.train_subset = None
    arch = ckpt.get("arch")
    if arch and cli.model and cli.model != arch:
        raise CheckpointError(f"the checkpoint holds a {arch}, not a {cli.model}: drop --model or pick its checkpoint")
    return args


def check_classes(ckpt: dict[str, Any], bundle: data.DataBundle, path: str | Path,
                  fix: str = "name the class folders as in training") -> None:
    """``CheckpointError`` (ending in ``fix``) when the data names its classes otherwise than the data the
    checkpoint was trained on: the same count in another order (a renamed class folder) would score every
    image of a moved class against the wrong label, silently."""
    saved, now = ckpt.get("classes"), bundle.classes
    if saved and now and list(saved) != list(now):
        differ = sorted(set(saved) ^ set(now)) or ["their order"]
        raise CheckpointError(f"{path} was trained on the classes {', '.join(saved)}, but this data has "
                              f"{', '.join(now)} ({', '.join(differ)} differ): {fix}")


def model_for(args: argparse.Namespace, bundle: data.DataBundle, ckpt: dict[str, Any] | None, path: str | Path,
              key: str = "state_dict") -> nn.Module:
    """The model ``args`` describe, built for ``bundle``'s images, with the weights ``ckpt[key]`` (None: as
    initialised); ``CheckpointError`` when the checkpoint classifies other classes than the data has."""
    num_classes = args.num_classes or bundle.num_classes
    if num_classes != bundle.num_classes:
        raise CheckpointError(f"the checkpoint classifies {num_classes} classes but {args.dataset} has "
                              f"{bundle.num_classes}: use it on the data set it was trained for")
    if ckpt is not None:
        check_classes(ckpt, bundle, path)
    model = models.create(args.model, num_classes=num_classes, img_size=args.img_size or bundle.img_size,
                          in_chans=bundle.in_chans, model_kwargs=args.model_kwargs)
    if ckpt is not None:
        if ckpt.get(key) is None:
            raise CheckpointError(f"{path} holds no {key}" + (" (trained without --model-ema)" if key == "state_dict_ema"
                                                              else ""))
        checkpoint.load_weights(model, ckpt[key], str(path))
    return model


def run_eval(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``mergemix eval``: rebuild, load, evaluate, write results."""
    cli = build_eval_parser().parse_args(argv)
    check_limits(cli)
    if cli.merge_every is not None and cli.merge_num is None:
        raise ConfigError("--merge-every spreads --merge-num's tokens over the blocks: give --merge-num too")
    if not cli.prop_attn and cli.merge_num is None:
        raise ConfigError("--no-prop-attn drops merged tokens' attention bias: give --merge-num too")
    cli.merge_every = 1 if cli.merge_every is None else cli.merge_every
    path = checkpoint.resolve(cli.checkpoint, best=True)
    ckpt = checkpoint.load_weights_file(path)
    if cli.img_size is not None and cli.img_size == (ckpt.get("args") or {}).get("img_size"):
        cli.img_size = None  # the checkpoint's own size: the evaluation without the flag, in its folder
    args = run_args(ckpt, cli)
    out = eval_folder(cli, path, args)
    ctx = setup(cli.device)
    made = None
    try:
        # rank 0 makes the folder and checks it can write there before the pass, not after it
        made = on_main(lambda: checkpoint.make_dir(out, "--output"), ctx, f"write to {out}")
        return _evaluate_checkpoint(cli, ckpt, path, args, out, ctx)
    except BaseException:
        # a failed evaluation leaves no folder it made; one whose results are written keeps them
        if made is not None and not (out / "results.json").exists():
            checkpoint.remove_dir(out, made)
        raise
    finally:
        cleanup()


def _evaluate_checkpoint(cli: argparse.Namespace, ckpt: dict[str, Any], path: Path, args: argparse.Namespace,
                         out: Path, ctx: Context) -> dict[str, Any]:
    """Build the model of ``ckpt``, evaluate it on this process's shard (metrics synced over the
    processes under torchrun) and, on rank 0, write and print the results."""
    bundle = data.build(args, with_train=False)
    model = model_for(args, bundle, ckpt, path, "state_dict_ema" if cli.use_ema else "state_dict")
    num_classes = bundle.num_classes
    merging = merge_for_eval(model, cli.merge_num, cli.merge_every, cli.prop_attn) if cli.merge_num is not None else {}
    model.to(ctx.device)
    workers = data.loader_workers(bundle, cli.workers)
    loader = data.eval_loader(bundle, cli.batch_size, workers, ctx.rank, ctx.world_size, ctx.device)
    amp_dtype = autocast_dtype(cli)
    start = time.perf_counter()
    metrics = evaluate(model, loader, num_classes, cli.ece_bins, ctx.device, amp_dtype)
    seconds = time.perf_counter() - start
    if not ctx.is_main:
        return {}
    n = len(bundle.eval)
    # the training run's method, seed and args let `mergemix compare` group evaluations as it groups runs;
    # eval_seconds is the wall time of the whole pass, data loading included: a rough figure
    # (step_time.py times forwards alone)
    settings = _evaluation_settings(cli, path, args)  # its merge keys come with ``merging``, where it merges
    extra = {**{k: v for k, v in settings.items() if k not in _MERGE_KEYS}, "epoch": ckpt.get("epoch"),
             "method": args.mix, "seed": args.seed, "num_images": n, **merging,
             "eval_seconds": seconds, "images_per_s": n / seconds, "train_args": ckpt.get("args") or {}}
    every = f", merging every {cli.merge_every} blocks" if cli.merge_every != 1 else ""
    noprop = ", no proportional attention" if not cli.prop_attn else ""
    tome = f", ToMe merge_num {cli.merge_num}{every}{noprop}" if merging else ""
    weights = models.label(args.model, args.model_kwargs) + (", EMA weights" if cli.use_ema else "")
    results = write_results(out, metrics, extra, title=f"{weights}\non {args.dataset}{tome}")
    if merging:
        tokens = merging["tokens_per_block"]
        tome += f": {tokens[0]} tokens into the first block, {tokens[-1]} into the last"
    print(f"{summary_line(metrics)}  ({n} images, {n / seconds:.0f} img/s{tome}) -> {out}/results.json")
    trained_on = (ckpt.get("args") or {}).get("dataset")
    if trained_on and trained_on != args.dataset:  # allowed (the classes fit), but rarely meant
        print(f"note   the checkpoint was trained on {trained_on}; these figures are on {args.dataset} (--dataset)")
    return results


def eval_folder(cli: argparse.Namespace, path: Path, args: argparse.Namespace) -> Path:
    """Where ``mergemix eval`` of checkpoint ``path`` writes: ``--output``, else a folder next to the
    checkpoint named after it, the data set, the merging and any of EMA weights, AMP, a bin count
    other than 15 and an ``--img-size`` other than the checkpoint's, so that evaluations of one checkpoint in other ways keep their
    own results; never a training run's folder, nor one that holds another evaluation (other data,
    ``--model-kwargs``: choose ``--output``)."""
    if cli.output:
        out = Path(cli.output)
    else:
        # the checkpoint's name: evaluating model_best.pth.tar must not replace last.pth.tar's results
        name = path.name.removesuffix(".pth.tar") if path.name.endswith(".pth.tar") else path.stem
        merge = f"-merge{cli.merge_num}" if cli.merge_num is not None else ""
        merge += f"-every{cli.merge_every}" if merge and cli.merge_every != 1 else ""
        merge += "-noprop" if merge and not cli.prop_attn else ""
        how = ("-ema" if cli.use_ema else "") + (f"-{cli.amp_dtype}" if cli.amp else "")
        how += f"-bins{cli.ece_bins}" if cli.ece_bins != ECE_BINS else ""
        how += f"-img{cli.img_size}" if cli.img_size is not None else ""
        out = path.parent / f"eval-{name}-{args.dataset}{merge}{how}"
    checkpoint.check_names(out, "--output")
    if checkpoint.holds_training_run(out):
        raise ConfigError(f"--output {out} holds a training run: its results.json and reliability.png are not "
                          "eval's to replace; choose another --output (by default eval writes next to the checkpoint)")
    differ = _other_evaluation(out / "results.json", _evaluation_settings(cli, path, args))
    if differ:
        raise ConfigError(f"--output {out} holds another evaluation ({differ}): choose another --output, "
                          f"or evaluate that way to replace it")
    return out


# what makes an evaluation what it is: one evaluated again these ways may replace its own results only
_MERGE_KEYS = ("merge_num", "merge_every", "prop_attn")  # written only by an evaluation that merges
EVALUATION_KEYS = ("checkpoint", "weights", "model", "model_kwargs", "img_size", "dataset", "data_dir", "ece_bins",
                    "amp_dtype", *_MERGE_KEYS)


def _evaluation_settings(cli: argparse.Namespace, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The ``EVALUATION_KEYS`` this evaluation writes into results.json (None where it writes none):
    the model as built (its kwargs, saved and overridden, and image size: the saved or ``--img-size`` one,
    None only for a weights file that records none, which runs at the data set's),
    and the data folder read, absolute (None for digits, or without one: the data set's own place)."""
    merged = cli.merge_num is not None
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir and data.reads_data_dir(args.dataset) else None
    return {"checkpoint": str(path.resolve()), "weights": "state_dict_ema" if cli.use_ema else "state_dict",
            "model": args.model, "model_kwargs": json.loads(json.dumps(args.model_kwargs)),  # as results.json holds it
            "img_size": args.img_size, "dataset": args.dataset, "data_dir": data_dir, "ece_bins": cli.ece_bins,
            "amp_dtype": cli.amp_dtype if cli.amp else None, "merge_num": cli.merge_num,
            "merge_every": cli.merge_every if merged else None, "prop_attn": cli.prop_attn if merged else None}


def _other_evaluation(results: Path, mine: dict[str, Any]) -> str:
    """How the evaluation in ``results`` differs from ``mine`` ("checkpoint /x.pth.tar, ..."); "" where
    there is none or it is this one."""
    if not results.is_file():
        return ""
    try:
        theirs = json.loads(results.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"an unreadable {results.name}"
    if not isinstance(theirs, dict):
        return f"a {results.name} that is not an evaluation's"
    if "merge_num" not in theirs:  # an evaluation without merging writes none of its keys
        theirs = {**theirs, **dict.fromkeys(_MERGE_KEYS)}
    # a key an older version did not write (amp_dtype, prop_attn, model_kwargs, img_size, data_dir) counts as the same
    return ", ".join(f"{k} {theirs[k]}" for k in EVALUATION_KEYS if k in theirs and not _same(k, theirs[k], mine[k]))


def _same(key: str, theirs: Any, mine: Any) -> bool:
    if key == "checkpoint":  # the file's and its run folder's names: a run moved or copied keeps its evaluations
        return theirs is not None and mine is not None and Path(theirs).parts[-2:] == Path(mine).parts[-2:]
    return theirs == mine


def merge_for_eval(model: nn.Module, merge_num: int, merge_every: int = 1, prop_attn: bool = True) -> dict[str, Any]:
    """Patch ``model`` for ToMe merging of ``merge_num`` tokens in every ``merge_every``-th block, with
    proportional attention or without; returns what results.json records."""
    if merge_num < 0:
        raise ConfigError(f"--merge-num must be at least 0, got {merge_num}")
    if merge_every < 1:
        raise ConfigError(f"--merge-every must be at least 1, got {merge_every}")
    try:
        patch_tome(model, merge_num=merge_num, merge_every=merge_every, prop_attn=prop_attn)
    except ValueError as e:  # too many tokens for this model, or not a ViT
        raise ConfigError(f"--merge-num {merge_num}: {e}") from None
    return {"merge_num": merge_num, "merge_every": merge_every, "prop_attn": prop_attn,
            "tokens_per_block": tokens_per_block(model)}
