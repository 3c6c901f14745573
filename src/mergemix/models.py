"""Build any timm model by name, sized for the data, with clear errors for what does not fit."""
from __future__ import annotations

import contextlib
import difflib
import os
from pathlib import Path
from typing import Any, Iterator

import timm
from huggingface_hub.utils import logging as hub_logging
from timm.models import get_pretrained_cfg_value, load_state_dict
from torch import nn

from . import checkpoint
from .errors import CheckpointError, ConfigError


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile / one-device DataParallel wrappers.

    ValueError for DataParallel over several devices: token merging and the attention read-out
    leave their state on the module, and DataParallel runs per-device copies that drop it.
    """
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, nn.DataParallel):
            if len(model.device_ids) > 1:
                raise ValueError(f"nn.DataParallel over {len(model.device_ids)} devices is not supported: its "
                                 "per-device copies drop the state merging and the read-out leave on the model; "
                                 "use DistributedDataParallel (torchrun), as mergemix train does")
            model = model.module
        else:
            return model


def check_name(name: str) -> str:
    """``name`` if timm knows the model, else a ``ConfigError`` that suggests close names."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint}; list them with: "
                          f"python -c \"import timm; print(timm.list_models('vit*'))\"")
    return name


# create()'s arguments that flags or the data set set; the same key in --model-kwargs would be a second value
SET_ELSEWHERE = {"num_classes": "--num-classes", "img_size": "--img-size", "in_chans": "the data set's channels",
                 "drop_path_rate": "--drop-path"}


def label(name: str, model_kwargs: dict[str, Any] | None) -> str:
    """The model as figures name it: timm's name, with the kwargs that changed it
    (``vit_tiny_patch16_224 (patch_size=4, depth=4)``: the name alone would say patch 16, depth 12)."""
    given = ", ".join(f"{k}={v}" for k, v in (model_kwargs or {}).items())
    return f"{name} ({given})" if given else name


def create(name: str, *, num_classes: int, img_size: int, in_chans: int, drop_rate: float = 0.0,
           drop_path_rate: float = 0.0, model_kwargs: dict[str, Any] | None = None, pretrained: bool = False,
           initial_checkpoint: str | None = None) -> nn.Module:
    """``timm.create_model`` with the data's size and class count.

    ``img_size`` is passed to models that take it (ViTs); ``initial_checkpoint`` loads a local
    weights file through timm's pretrained path, which drops a classifier of another size and
    resamples position embeddings for another image size.
    """
    check_name(name)
    model_kwargs = dict(model_kwargs or {})
    for key in model_kwargs:
        if key in SET_ELSEWHERE:
            raise ConfigError(f"--model-kwargs {key}=...: {key} is set by {SET_ELSEWHERE[key]}; use that instead")
    # runs made before --drop set dropout here, and their saved kwargs still do
    if "drop_rate" in model_kwargs:
        if drop_rate and drop_rate != model_kwargs["drop_rate"]:
            raise ConfigError(f"--drop {drop_rate} and --model-kwargs drop_rate={model_kwargs['drop_rate']} "
                              f"both set the dropout rate: give one")
        drop_rate = model_kwargs.pop("drop_rate")
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                                  drop_path_rate=drop_path_rate, img_size=img_size, **model_kwargs)
    if initial_checkpoint and pretrained:  # timm's train.py lets the file replace the hub's weights unsaid
        raise ConfigError(f"--pretrained and --initial-checkpoint {initial_checkpoint} both give the starting "
                          f"weights: keep one")
    if initial_checkpoint:
        kwargs["pretrained_cfg_overlay"] = _file_overlay(name, Path(initial_checkpoint))
        pretrained = True
    try:
        with _quiet_hub():
            model = _construct(name, pretrained, kwargs, model_kwargs)
    except Exception as e:
        if not pretrained or isinstance(e, TypeError):
            # no weights loaded: the constructor rejected an argument (a TypeError, an assert, a division by 0...)
            given = " ".join(f"{k}={v}" for k, v in model_kwargs.items())
            raise ConfigError(f"model {name} cannot be built with --model-kwargs {given} ({_reason(e)}): "
                              "check the names and values its timm constructor takes") from None
        if isinstance(e, (OSError, RuntimeError, ValueError)):
            raise _weights_error(name, e, initial_checkpoint) from None
        raise  # anything else while loading weights is a bug: keep its traceback
    for attr in ("pretrained_cfg", "default_cfg"):  # loaded: the config need not keep a second copy of the weights
        if isinstance(cfg := getattr(model, attr, None), dict):
            cfg.pop("state_dict", None)
    _check_patches(model, name)
    return model


def _construct(name: str, pretrained: bool, kwargs: dict[str, Any], model_kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model``, again without ``img_size`` for a model that takes none (e.g. a CNN)."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e) or "img_size" in model_kwargs:
            raise
        return timm.create_model(name, pretrained=pretrained, **{k: v for k, v in kwargs.items() if k != "img_size"})


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Hide the hub's warnings (offline: two lines per retry, about 22) for one build: a failed
    download is then reported in one line by ``_weights_error``."""
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(verbosity)


def _weights_error(name: str, err: BaseException, initial_checkpoint: str | None) -> CheckpointError:
    """The one-line error for weights that could not be loaded into a freshly built model (from the hub:
    every process downloads its own, so one may fail alone)."""
    reason = _reason(err)
    if initial_checkpoint:
        return CheckpointError(f"--initial-checkpoint {initial_checkpoint} does not fit {name} ({reason}): give the "
                               f"architecture it holds (--model, --model-kwargs); only the classifier and the "
                               f"position embeddings may differ")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):  # the hub's own reading of it
        return CheckpointError(f"could not load pretrained weights for {name} from the hub's cache ({reason}; "
                               f"HF_HUB_OFFLINE is set, so nothing is downloaded): use --initial-checkpoint FILE, "
                               f"or unset HF_HUB_OFFLINE to download them",
                               every_process_alike=False)
    return CheckpointError(f"could not load pretrained weights for {name} from the hub ({reason}): "
                           f"offline? use --initial-checkpoint FILE, or set HF_HUB_OFFLINE=1 to take weights "
                           f"from the hub's cache alone, without waiting on the network",
                           every_process_alike=False)


def _reason(err: BaseException) -> str:
    """The informative line of a build or load error: for ``load_state_dict``, its first mismatch."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    detail = next((line for line in lines[1:] if "mismatch" in line or "key(s)" in line), lines[0])
    short = detail if len(detail) <= 160 else detail[:157] + "..."
    return short + (f" (+{len(lines) - 2} more)" if detail is not lines[0] and len(lines) > 2 else "")


def _file_overlay(name: str, path: Path) -> dict[str, Any]:
    """timm pretrained-config overlay that loads the weights of ``path``: its plain ``state_dict`` (timm's
    file loading would take a ``state_dict_ema`` first, and our checkpoints pick the best epoch on the
    plain weights).

    It keeps the file's classifier when its size fits and declares the file's input channels, so
    timm adapts the first convolution only when the data has another channel count.
    """
    if not path.is_file():
        raise CheckpointError(f"--initial-checkpoint {path} does not exist")
    try:
        state_dict = load_state_dict(str(path), use_ema=False)
    except Exception as e:  # torch.load of an arbitrary file: anything can come out
        raise checkpoint.unreadable(path, e, "--initial-checkpoint") from None
    overlay: dict[str, Any] = dict(state_dict=state_dict)
    classifier = get_pretrained_cfg_value(name, "classifier")
    head = state_dict.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    if head is not None:
        overlay["num_classes"] = head.shape[0]  # timm drops the classifier only if this differs from ours
    first_conv = get_pretrained_cfg_value(name, "first_conv")
    stem = state_dict.get(f"{first_conv}.weight") if isinstance(first_conv, str) else None
    input_size = get_pretrained_cfg_value(name, "input_size")
    if stem is not None and stem.ndim == 4 and input_size:
        overlay["input_size"] = (stem.shape[1], *input_size[1:])
    return overlay


def _check_patches(model: nn.Module, name: str) -> None:
    """A ViT's image size must be a multiple of its patch size."""
    pe = getattr(model, "patch_embed", None)
    img, patch = getattr(pe, "img_size", None), getattr(pe, "patch_size", None)
    if img is None or patch is None or getattr(pe, "dynamic_img_pad", False):
        return
    if img[0] % patch[0] or img[1] % patch[1]:
        fit = max(patch[0], (img[0] // patch[0]) * patch[0])
        raise ConfigError(f"image size {img[0]}x{img[1]} is not divisible by the patch size {patch[0]}x{patch[1]} "
                          f"of {name}: use --img-size {fit} or another --model-kwargs patch_size=")


def describe(model: nn.Module) -> str:
    """One line: parameter count and, for ViTs, tokens, depth and width."""
    params = sum(p.numel() for p in model.parameters()) / 1e6
    pe, blocks = getattr(model, "patch_embed", None), getattr(model, "blocks", None)
    if pe is not None and blocks is not None and hasattr(pe, "num_patches"):
        return (f"{params:.2f}M params, {pe.num_patches} patches of {pe.patch_size[0]}x{pe.patch_size[1]}, "
                f"depth {len(blocks)}, width {getattr(model, 'embed_dim', '?')}")
    return f"{params:.2f}M params"
