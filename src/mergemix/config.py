"""Command-line flags for ``mergemix train``, after timm's ``train.py``, with YAML recipes.

Precedence, lowest first: the built-in defaults (which are the digits recipe, ``configs/digits.yaml``),
the arguments saved in the checkpoint given to ``--resume``, the YAML recipe given to ``-c`` (a file,
or the name of one of the bundled recipes of ``configs/``), and the flags on the command line. A
recipe's keys are the flags' names with ``_`` or ``-`` (``batch_size: 64``); an unknown key is an
error. ``args.yaml`` of a run is itself a recipe: it leaves out the run's folder name, so using it
starts a new run.
"""
from __future__ import annotations

import argparse
import collections
import copy
import difflib
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Sequence

import yaml

from .errors import ConfigError

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
ECE_BINS = 15  # the reported ECE's bins, as in most calibration papers (10-bin ECE is reported too)

# Named flags that become options of the mixing method (``mergemix.mix.create(name, **options)``).
# Only the options the chosen method's ``__init__`` accepts are passed; ``--mix-opt`` adds any other.
METHOD_OPTION_FLAGS = {
    "mix_alpha": "alpha",
    "mixup": "mixup_alpha",
    "cutmix": "cutmix_alpha",
    "mixup_prob": "prob",
    "mixup_switch_prob": "switch_prob",
    "smoothing": "smoothing",
    "merge_num": "merge_num",
    "merge_every": "merge_every",
    "readout_block": "readout_block",
    "lam_policy": "lam_policy",
    "aux_loss": "aux_loss",
    "score": "score",
    "merge_train": "merge_train",
}

# The default model is a small ViT for 8x8 digits; these kwargs belong to it and are dropped as soon
# as --model is set anywhere (flag, recipe, checkpoint), so they never leak into another model.
DEFAULT_MODEL = "vit_tiny_patch16_224"
DEFAULT_MODEL_KWARGS = {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}

# Keys of a saved run that describe where it ran, not what it trains: not inherited on --resume.
_NOT_INHERITED = ("config", "resume")
# Keys left out of a run's args.yaml, so that `-c RUN/args.yaml` starts a new run (in a new folder,
# next to RUN when its --output is kept) instead of pointing at RUN itself.
_NOT_IN_RECIPE = ("config", "resume", "experiment")


@dataclass(frozen=True)
class Limit:
    """The values a numeric flag admits: ``low`` <= value (< if ``low_open``), value <= ``high`` (< if ``high_open``)."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""  # what a boundary value means, e.g. "0: never"

    def admits(self, value: float) -> bool:
        """Whether ``value`` lies within the limit."""
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low_open:
            text = "positive" if self.low == 0 else f"above {self.low}"
        else:
            text = f"at least {self.low}"
        return f"{text} ({self.note})" if self.note else text


# Ranges of the numeric flags of `mergemix train`, `eval` and `viz` (a flag means the same in each);
# ``check_limits`` checks whichever of them a parsed namespace holds. Method options (--mix-alpha,
# --smoothing, --merge-num, ...) are checked by the method when it is created.
LIMITS = {
    "epochs": Limit(1), "batch_size": Limit(1), "eval_batch_size": Limit(1), "eval_interval": Limit(1),
    "ece_bins": Limit(1), "log_interval": Limit(1), "num_classes": Limit(1), "img_size": Limit(1), "train_subset": Limit(1),
    "recount": Limit(1), "workers": Limit(0, note="0: load in the main process"), "warmup_epochs": Limit(0),
    "mixup_off_epoch": Limit(0, note="0: never"), "save_mix_samples": Limit(0, note="0: never"),
    "lr": Limit(0, low_open=True), "clip_grad": Limit(0, low_open=True), "crop_pct": Limit(0, low_open=True),
    "warmup_lr": Limit(0), "min_lr": Limit(0), "weight_decay": Limit(0), "momentum": Limit(0, 1, high_open=True),
    "color_jitter": Limit(0), "reprob": Limit(0, 1), "drop": Limit(0, 1, high_open=True),
    "drop_path": Limit(0, 1, high_open=True), "decay_epochs": Limit(0, low_open=True), "decay_rate": Limit(0),
    "patience_epochs": Limit(0), "opt_eps": Limit(0, low_open=True), "model_ema_decay": Limit(0, 1),
    "num_samples": Limit(2, note="each image needs a partner"),
    # torch seeds are 64-bit (the bound once left room for the steps a resume added to the seed)
    "seed": Limit(0, 2**63 - 1 - 2**31),
}


def parse_value(text: str) -> Any:
    """'4' -> 4, '0.5' / '1e-3' -> float, 'true' -> True, '[1, 2]' -> list, 'null' -> None, else the string.

    'none' stays a string, as in YAML: it is a value of some options (``aux_loss=none``).
    """
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def key_value(text: str) -> tuple[str, Any]:
    """argparse type for ``key=value`` items."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.replace("-", "_"), parse_value(value)


class KeyValues(argparse.Action):
    """A ``KEY=VALUE ...`` list flag that may be given again: every use's items count, in order (a later
    key wins, as it does over a recipe's or a checkpoint's kwargs), where argparse keeps the last use only."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        # the default object itself until this command line gives the flag (a recipe's, a checkpoint's)
        earlier = [] if current is self.default or current is None else list(current)
        setattr(namespace, self.dest, earlier + list(values))


class StoreOnce(argparse.Action):
    """A list flag (``nargs="+"``) that may be given once: argparse would keep its last use only and drop
    the first's values without a word."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        # the default object itself (the flag's, a recipe's, a checkpoint's) until this command line gives it
        if getattr(namespace, self.dest, self.default) is not self.default:
            parser.error(f"{option_string} given more than once, and only the last would count: give it once, "
                         f"with all its values")
        setattr(namespace, self.dest, values)


def as_dict(value: Any, what: str) -> dict[str, Any]:
    """A ``key=value`` list (from flags) or a mapping (from YAML) -> dict."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k).replace("-", "_"): v for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        try:
            return dict(_item(v) for v in value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise ConfigError(f"{what} must be a mapping or a list of key=value, got {value!r} ({e})") from None
    raise ConfigError(f"{what} must be a mapping or a list of key=value, got {value!r}")


def _item(value: Any) -> tuple[str, Any]:
    """One ``key=value`` text (a flag) or (key, value) pair (a parsed ``--mix-opt``)."""
    if isinstance(value, str):
        return key_value(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str):
        return value[0], value[1]
    raise ValueError(f"{value!r} is not key=value")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ``ConfigError`` (one line, exit 2) instead of printing usage and exiting,
    and takes no abbreviated flags: timm's ``--drop`` (dropout) would otherwise be read as ``--drop-path``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help with its default, as timm's is; where the text already says its default, the
    flag has none of its own (None: a method, the data set or the checkpoint gives it), or it is a
    ``store_false`` switch (whose default True would read as "given"), nothing is added."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or "default" in text or (action.nargs == 0 and action.default is True):
            return text
        return super()._get_help_string(action)


def add_data_flags(parser: argparse._ActionsContainer, default: str | None, dataset_help: str) -> None:
    """--dataset, --data-dir and --download, as every command that reads a data set takes them."""
    parser.add_argument("--dataset", default=default, choices=DATASETS, help=dataset_help)
    parser.add_argument("--data-dir", default=None, help="data root (dataset-specific layout, see README)")
    parser.add_argument("--download", action="store_true", help="let torchvision download the data set if missing")


def add_device_flag(parser: argparse._ActionsContainer) -> None:
    """--device, as every command that runs a model takes it."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")


def add_workers_flag(parser: argparse._ActionsContainer) -> None:
    """--workers, as every command that loads a data set through a DataLoader takes it."""
    parser.add_argument("--workers", type=int, default=None,
                        help="loader processes (default: 0 for in-memory data, else 4 or the CPUs, if fewer)")


def add_amp_flags(parser: argparse._ActionsContainer) -> None:
    """--amp and --amp-dtype, as train and eval take them."""
    parser.add_argument("--amp", action="store_true", help="mixed precision")
    parser.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"), help="autocast dtype with --amp")


def _data_group(g: argparse._ArgumentGroup) -> None:
    """The data set, its subset and its augmentation."""
    add_data_flags(g, "digits", "data set (digits ships with scikit-learn)")
    g.add_argument("--train-subset", type=int, default=None, help="train on a fixed random subset of N images")
    add_workers_flag(g)
    g.add_argument("--img-size", type=int, default=None, help="input size (default: the data set's native size)")
    g.add_argument("--aa", default=None, help="RandAugment policy for RGB data, e.g. rand-m7-mstd0.5-inc1")
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability (RGB data)")
    g.add_argument("--remode", default="pixel", choices=("pixel", "rand", "const"), help="random erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random erasing count")
    g.add_argument("--color-jitter", type=float, default=0.4, help="colour jitter (RGB data without --aa)")
    g.add_argument("--interpolation", default="bicubic",
                   choices=("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos"),
                   help="resize interpolation (RGB data)")
    g.add_argument("--crop-pct", type=float, default=None, help="eval centre-crop fraction (RGB data)")


def _model_group(g: argparse._ArgumentGroup) -> None:
    """The timm model and its starting weights."""
    g.add_argument("--model", default=DEFAULT_MODEL, help="any timm model name")
    g.add_argument("--model-kwargs", nargs="*", type=key_value, default=None, action=KeyValues,
                   help="extra timm.create_model kwargs, e.g. patch_size=4 depth=6 embed_dim=96 num_heads=3 "
                        f"(default: {' '.join(f'{k}={v}' for k, v in DEFAULT_MODEL_KWARGS.items())} "
                        "with the default --model, else none)")
    g.add_argument("--num-classes", type=int, default=None, help="default: the data set's")
    g.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (needs the hub)")
    g.add_argument("--initial-checkpoint", default=None,
                   help="start from a local weights file, or a run folder's model_best.pth.tar (else its last.pth.tar); "
                        "head reset if sizes differ")
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate (timm's drop_rate)")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")


def _optimisation_group(g: argparse._ArgumentGroup) -> None:
    """Epochs, batch, optimizer, learning-rate schedule, label smoothing."""
    g.add_argument("--epochs", type=int, default=40, help="training epochs")
    g.add_argument("--batch-size", "-b", type=int, default=32, help="per process")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default: 2 x --batch-size")
    g.add_argument("--opt", default="adamw", help="timm optimizer name")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (not scaled by batch size)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="weight decay")
    g.add_argument("--momentum", type=float, default=0.9, help="for SGD-like optimizers")
    g.add_argument("--opt-eps", type=float, default=None, help="optimizer epsilon (default: the optimizer's)")
    g.add_argument("--opt-betas", type=float, nargs="+", default=None, action=StoreOnce,
                   help="optimizer betas (default: the optimizer's)")
    g.add_argument("--clip-grad", type=float, default=None, help="clip gradients at this value (see --clip-mode)")
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"),
                   help="what --clip-grad bounds: the total norm, each value, or adaptive clipping (timm's modes)")
    g.add_argument("--sched", default="cosine",
                   help="timm scheduler name: cosine, tanh, step, multistep, poly, wsd, rsqrt, constant, plateau, "
                        "or none (a constant --lr, without warm-up, as in timm)")
    g.add_argument("--decay-epochs", type=float, default=90.0, help="step: epochs between decays; wsd/rsqrt: the "
                   "decay phase, in epochs or below 1 as a fraction of the epochs after warm-up (the default, "
                   "timm's 90, suits step: for these, set it, e.g. 0.2)")
    g.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270], action=StoreOnce,
                   help="multistep: decay epochs")
    g.add_argument("--decay-rate", type=float, default=0.1, help="step/multistep/plateau: decay factor; poly: power")
    g.add_argument("--patience-epochs", type=int, default=10, help="plateau: epochs without improvement before a decay")
    g.add_argument("--warmup-epochs", type=int, default=3, help="linear warm-up from --warmup-lr")
    g.add_argument("--warmup-lr", type=float, default=1e-6, help="learning rate at the first step")
    g.add_argument("--min-lr", type=float, default=1e-5, help="floor of the schedule")
    g.add_argument("--sched-on-epochs", action="store_true",
                   help="step the schedule per epoch, not per update (plateau always does: it waits for an evaluation)")
    g.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")


def _mixing_group(g: argparse._ArgumentGroup) -> None:
    """The method and its options."""
    g.add_argument("--mix", default="mergemix", help="mixing method (see `mergemix methods`)")
    g.add_argument("--mix-alpha", type=float, default=None,
                   help="Beta(alpha, alpha) of the method (option alpha; default: the method's, see `mergemix methods`)")
    g.add_argument("--mixup", type=float, default=None,
                   help="MixUp alpha (option mixup_alpha; alpha of --mix mixup; default: the method's)")
    g.add_argument("--cutmix", type=float, default=None,
                   help="CutMix alpha (option cutmix_alpha; alpha of --mix cutmix; default: the method's)")
    g.add_argument("--mixup-prob", type=float, default=None,
                   help="probability of mixing a batch (option prob; default: the method's)")
    g.add_argument("--mixup-switch-prob", type=float, default=None,
                   help="MixUp/CutMix switch probability (option switch_prob; default: the method's)")
    g.add_argument("--mixup-off-epoch", type=int, default=0, help="stop mixing from this epoch on (0: never)")
    g.add_argument("--merge-num", type=int, default=None,
                   help="tokens merged in all (MergeMix; default: half the patches)")
    g.add_argument("--merge-every", type=int, default=None,
                   help="merge in every k-th block only, the same total in fewer steps (MergeMix; default: 1)")
    g.add_argument("--readout-block", type=int, default=None,
                   help="0-based index of the block whose CLS attention is read (MergeMix; default: floor(0.75 depth) - 1, "
                        "8 of 12; TransMix, TokenMix, SMMix: default -1, the last)")
    g.add_argument("--lam-policy", default=None, choices=("gaussian", "area"),
                   help="label ratio policy (MergeMix; default: area)")
    g.add_argument("--aux-loss", default=None, choices=("clean", "mixup", "none"),
                   help="second loss term (MergeMix; default: clean)")
    g.add_argument("--score", default=None, choices=("cls_row", "cls_col"),
                   help="attention score (MergeMix; default: cls_row)")
    g.add_argument("--merge-train", action=argparse.BooleanOptionalAction, default=None,
                   help="merge tokens in the mixed (and mixup) training forward; the clean pass, which gives the mask, "
                        "merges either way (MergeMix; default: on)")
    g.add_argument("--mix-opt", action="append", type=key_value, default=[],
                   help="any other method option, key=value (repeatable)")


def _run_group(g: argparse._ArgumentGroup) -> None:
    """Where the run goes and how it is seeded, computed (AMP, compile, EMA), evaluated and logged."""
    g.add_argument("--output", default="output", help="parent folder of the run folder")
    g.add_argument("--experiment", default=None, help="run folder name (default: DATE-TIME-dataset-model-mix)")
    g.add_argument("--resume", default=None, help="checkpoint (or run folder) to continue from")
    g.add_argument("--seed", type=int, default=42, help="seed (of rank 0; under torchrun, rank r > 0 uses one derived from seed and r)")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms only")
    add_device_flag(g)
    add_amp_flags(g)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode (implies --compile); reduce-overhead replays CUDA graphs, "
                        "for GPU runs bound by kernel launches, as a merged model's many small kernels are")
    g.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (timm ModelEmaV3)")
    g.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay per update")
    g.add_argument("--eval-interval", type=int, default=1, metavar="N",
                   help="evaluate after every N-th epoch and after the last (the best checkpoint is picked "
                        "among those evaluated)")
    g.add_argument("--eval-merged", action="store_true",
                   help="evaluate each epoch also as the model trained, token-merged (MergeMix with merging "
                        "in its training forward): merged_eval_* columns, 'merged' in results.json")
    g.add_argument("--ece-bins", type=int, default=ECE_BINS, help="bins of the reported ECE (10-bin ECE is reported too)")
    g.add_argument("--log-interval", type=int, default=10, help="steps between loss checks and progress updates")
    g.add_argument("--save-mix-samples", type=int, default=0, metavar="N",
                   help="every N epochs, draw the first step's mixing as a `mergemix viz` grid "
                        "(mix_samples/epochNNN.png; 0: never)")
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def build_train_parser() -> argparse.ArgumentParser:
    """The ``mergemix train`` parser; defaults are the digits recipe."""
    p = ArgumentParser(
        prog="mergemix train", description="Train a timm ViT with a mixing method (default: MergeMix on digits).",
        formatter_class=HelpFormatter)
    p.add_argument("-c", "--config", default=None,
                   help="YAML recipe whose keys are these flags' names: a file, or a bundled recipe's name "
                        f"({', '.join(bundled_recipes()) or 'none installed'})")
    for title, add_flags in (("data", _data_group), ("model", _model_group), ("optimisation", _optimisation_group),
                             ("mixing", _mixing_group), ("run", _run_group)):
        add_flags(p.add_argument_group(title))
    return p


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def _coerce(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """Check and convert one recipe value the way argparse would convert the flag's text."""
    if value is None:
        return value
    if key == "model_kwargs":  # as a dict: argparse would run a text default through key_value
        if isinstance(value, str):
            raise ConfigError(f"{source}: model_kwargs must be a mapping, e.g. {{depth: 6, embed_dim: 96}}, "
                              f"got {value!r}")
        return as_dict(value, f"{source}: model_kwargs")
    if key == "mix_opt":  # (key, value) items, which the flag's "append" action can add to
        return list(as_dict(value, f"{source}: mix_opt").items())
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if action.type is not None and action.nargs in ("+", "*"):  # a list, e.g. decay_milestones: [30, 60]
        values = value if isinstance(value, (list, tuple)) else [value]
        if action.nargs == "+" and not values:
            raise ConfigError(f"{source}: {key} needs at least one value, got []")
        return [_convert(action, key, v, source) for v in values]
    if action.type is not None:
        value = _convert(action, key, value, source)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):  # a name YAML read as a number
        value = str(value)
    elif not isinstance(value, str):
        raise ConfigError(f"{source}: {key} must be a word, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def _convert(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """One value through the flag's ``type``, refusing what argparse would not read as it (True as 1, 2.5 as int)."""
    bad_int = action.type is int and isinstance(value, float) and not value.is_integer()
    try:
        if isinstance(value, bool) or bad_int:
            raise ValueError
        return action.type(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} must be of type {action.type.__name__}, got {value!r}") from None


# The recipes of configs/: installed inside the package (a wheel maps configs/ to mergemix/configs), or
# at the top of a source checkout (an editable install, or src/ on PYTHONPATH)
RECIPE_FOLDERS = (Path(__file__).resolve().parent / "configs", Path(__file__).resolve().parents[2] / "configs")


def bundled_recipes() -> dict[str, Path]:
    """The recipes that come with mergemix (``configs/`` of the repository), by name."""
    folder = next((f for f in RECIPE_FOLDERS if f.is_dir()), None)
    return {} if folder is None else {f.stem: f for f in sorted(folder.glob("*.yaml"))}


def recipe_path(name: str | Path) -> Path:
    """The file ``-c`` names. A path (it holds a folder separator or starts with ``.``) as given; a bare
    name is a file of the working folder (``name``, else ``name.yaml``), else a bundled recipe's name
    (``fashion_mnist``, with or without ``.yaml``), so that recipes work after a pip install too."""
    text = str(name)
    if any(sep and sep in text for sep in (os.sep, os.altsep, "/")) or text.startswith("."):
        return Path(text)
    stem = text.removesuffix(".yaml")
    for local in (Path(text), Path(f"{stem}.yaml")):
        if local.is_file():
            return local
    return bundled_recipes().get(stem, Path(text))


def load_recipe(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML recipe (a file, or a bundled recipe's name) into flag defaults; unknown keys and
    ill-typed values are errors."""
    path = recipe_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"cannot read config {path}: no such file; the bundled recipes are "
                          f"{', '.join(bundled_recipes()) or 'not installed'} (e.g. -c fashion_mnist)") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not a UTF-8 text file: give a YAML recipe") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML in {path}{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of flag names to values, got {type(data).__name__}")
    names = collections.Counter(str(k).replace("-", "_") for k in data)
    twice = sorted(k for k, n in names.items() if n > 1)
    if twice:  # batch_size and batch-size: one would win silently
        raise ConfigError(f"{path}: {', '.join(twice)} given twice (with - and with _): keep one")
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    if values.pop("config", None) is not None:  # an args.yaml of an older version holds `config: null`
        raise ConfigError(f"{path}: a recipe cannot load another recipe (key config); remove that key")
    if values.pop("resume", None) is not None:
        # a recipe is a layer above the checkpoint's args, so it cannot choose that checkpoint
        raise ConfigError(f"{path}: a recipe cannot resume a run (key resume); pass --resume on the command line")
    # null: as if the key were left out (the layers below, or the flag's default, give the value)
    return _check_keys({k: v for k, v in values.items() if v is not None}, parser, str(path))


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    """What a run writes to its args.yaml: every argument but where it was started from and its folder
    name, so that ``mergemix train -c RUN/args.yaml`` trains the same again into a new run folder."""
    return {k: v for k, v in vars(args).items() if k not in _NOT_IN_RECIPE}


def _check_keys(values: dict[str, Any], parser: argparse.ArgumentParser, source: str) -> dict[str, Any]:
    actions = _actions(parser)
    unknown = [k for k in values if k not in actions]
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, actions, 1)) else k for k in unknown]
        raise ConfigError(f"unknown key(s) in {source}: {', '.join(hints)}; keys are `mergemix train` flag names")
    return {k: _coerce(actions[k], k, v, source) for k, v in values.items()}


def _explicit(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Names of the flags given on the command line."""
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def train_defaults() -> argparse.Namespace:
    """``mergemix train``'s settings when no flag is given (a copy of its own: callers change theirs)."""
    return copy.deepcopy(_train_defaults())


@functools.lru_cache(maxsize=1)
def _train_defaults() -> argparse.Namespace:
    return build_train_parser().parse_args([])


def parse_train_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``mergemix train`` flags with recipe and checkpoint layers (see module docstring)."""
    from . import checkpoint  # torch import deferred until needed

    parser = build_train_parser()
    argv = list(argv) if argv is not None else None
    pre = parser.parse_args(argv)  # first, so that --help prints from the parser with its defaults
    explicit = _explicit(parser, argv)
    resume_path, resumed = None, {}
    if pre.resume:
        resume_path = checkpoint.resolve(pre.resume)
        saved = checkpoint.saved_args(resume_path)
        resumed = _check_keys({k: v for k, v in saved.items() if k not in _NOT_INHERITED},
                              parser, f"checkpoint {resume_path}")
    recipe = load_recipe(pre.config, parser) if pre.config else {}
    parser.set_defaults(**{**resumed, **recipe})
    args = parser.parse_args(argv)
    args.model_kwargs = as_dict(args.model_kwargs, "model_kwargs")
    if "model" not in explicit:
        # the model stays the recipe's, else the resumed run's, else the digits ViT: --model-kwargs given
        # alone change its kwargs key by key rather than replace them all, as they do for eval and viz
        given = as_dict(recipe.get("model_kwargs"), "model_kwargs")
        same = "model" in resumed and recipe.get("model", resumed["model"]) == resumed["model"]
        if "model" not in recipe or (same and "model_kwargs" not in recipe):
            base = as_dict(resumed.get("model_kwargs"), "model_kwargs") if "model" in resumed else DEFAULT_MODEL_KWARGS
            given = {**base, **given}
        args.model_kwargs = {**given, **(args.model_kwargs if "model_kwargs" in explicit else {})}
    args.mix_opt = as_dict(args.mix_opt, "mix_opt")
    args.compile = args.compile or args.compile_mode is not None
    # timm's plateau schedule reacts to the evaluation top-1, so it can only step per epoch
    args.sched_on_epochs = args.sched_on_epochs or args.sched == "plateau"
    if args.initial_checkpoint and Path(args.initial_checkpoint).is_dir():  # a run folder: the file it means, saved
        args.initial_checkpoint = str(checkpoint.resolve(args.initial_checkpoint, best=True))
    if resume_path is not None:
        args.resume = str(resume_path)
        if not ({"output", "experiment"} & (explicit | set(recipe))):
            # continue in the folder the checkpoint lives in
            args.output, args.experiment = str(resume_path.parent.parent), resume_path.parent.name
    if args.experiment is None:
        args.experiment = f"{time.strftime('%Y%m%d-%H%M%S')}-{args.dataset}-{args.model}-{args.mix}"
    elif args.experiment in ("", ".", "..") or Path(args.experiment).name != args.experiment:
        raise ConfigError(f"--experiment must be a folder name, got {args.experiment!r}: "
                          "set the parent folder with --output")
    check_limits(args)
    return args


def check_limits(args: argparse.Namespace) -> None:
    """``ConfigError`` naming the first flag of ``args`` outside its range in ``LIMITS`` (None: unset, not checked)."""
    for name, limit in LIMITS.items():
        value, flag = getattr(args, name, None), f"--{name.replace('_', '-')}"
        if value is None:
            continue
        if not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}")
        if not limit.admits(value):
            raise ConfigError(f"{flag} must be {limit}, got {value}")


def method_options(args: argparse.Namespace, accepted: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options to pass, named-flag options the method does not take).

    ``accepted`` is the set of keyword names of the method's ``__init__`` chain.
    Named flags left at None mean "the method's default" and are not passed. ``--mix-opt`` items
    are always passed, so a misspelt one fails loudly.
    """
    named = {opt: getattr(args, flag) for flag, opt in METHOD_OPTION_FLAGS.items() if getattr(args, flag) is not None}
    flag_of = {opt: flag for flag, opt in METHOD_OPTION_FLAGS.items()}
    # timm's --mixup / --cutmix (mixup_alpha, cutmix_alpha) set the α of the method of that name, which
    # calls it plain `alpha`
    own = f"{args.mix}_alpha"
    if own in named:
        if named.get("alpha", named[own]) != named[own]:
            raise ConfigError(f"--mix-alpha {named['alpha']} and --{args.mix} {named[own]} both set {args.mix}'s "
                              f"alpha: give one")
        named["alpha"], flag_of["alpha"] = named.pop(own), args.mix
    used = {k: v for k, v in named.items() if k in accepted}
    unused = {k: v for k, v in named.items() if k not in used}
    # neither may win silently: a recipe's mix_opt would otherwise beat a flag typed now (a flag left at
    # its default, --smoothing's 0.0, sets nothing)
    defaults = vars(train_defaults())
    for key in (k for k in used if k in args.mix_opt and args.mix_opt[k] != used[k]):
        if used[key] != defaults.get(flag_of[key]):
            raise ConfigError(f"--{flag_of[key].replace('_', '-')} {used[key]} and --mix-opt {key}={args.mix_opt[key]} "
                              f"both set {key}: give one")
    return {**used, **args.mix_opt}, unused
