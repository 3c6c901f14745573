"""Build any timm model by name, sized for the data, with clear errors for what does not fit."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
from timm.models import get_pretrained_cfg_value, load_state_dict
from torch import nn

from . import checkpoint
from .errors import CheckpointError, ConfigError


def check_name(name: str) -> str:
    """``name`` if timm knows the model, else a ``ConfigError`` that suggests close names."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint}; list them with: "
                          f"python -c \"import timm; print(timm.list_models('vit*'))\"")
    return name


def create(name: str, *, num_classes: int, img_size: int, in_chans: int, drop_path_rate: float = 0.0,
           model_kwargs: dict[str, Any] | None = None, pretrained: bool = False,
           initial_checkpoint: str | None = None) -> nn.Module:
    """``timm.create_model`` with the data's size and class count.

    ``img_size`` is passed to models that take it (ViTs); ``initial_checkpoint`` loads a local
    weights file through timm's pretrained path, which drops a classifier of another size and
    resamples position embeddings for another image size.
    """
    check_name(name)
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate,
                                  img_size=img_size, **(model_kwargs or {}))
    if initial_checkpoint:
        kwargs["pretrained_cfg_overlay"] = _file_overlay(name, Path(initial_checkpoint))
        pretrained = True
    try:
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e) or "img_size" in (model_kwargs or {}):
                raise
            kwargs.pop("img_size")  # a model without an image size (e.g. a CNN)
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        given = " ".join(f"{k}={v}" for k, v in (model_kwargs or {}).items())
        raise ConfigError(f"model {name} cannot be built with --model-kwargs {given} ({e}): "
                          "check the names and values its timm constructor takes") from None
    except (OSError, RuntimeError, ValueError) as e:
        reason = _reason(e)
        if initial_checkpoint:
            raise CheckpointError(f"--initial-checkpoint {initial_checkpoint} does not fit {name} ({reason}): give the "
                                  f"architecture it holds (--model, --model-kwargs); only the classifier and the "
                                  f"position embeddings may differ") from None
        if pretrained:
            raise CheckpointError(f"could not load pretrained weights for {name} from the hub ({reason}): "
                                  f"offline? use --initial-checkpoint FILE") from None
        raise ConfigError(f"cannot build model {name} with {kwargs}: {reason}") from None
    _check_patches(model, name)
    return model


def _reason(err: BaseException) -> str:
    """The informative line of a build or load error: for ``load_state_dict``, its first mismatch."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    detail = next((line for line in lines[1:] if "mismatch" in line or "key(s)" in line), lines[0])
    short = detail if len(detail) <= 160 else detail[:157] + "..."
    return short + (f" (+{len(lines) - 2} more)" if detail is not lines[0] and len(lines) > 2 else "")


def _file_overlay(name: str, path: Path) -> dict[str, Any]:
    """timm pretrained-config overlay that loads ``path``.

    It keeps the file's classifier when its size fits and declares the file's input channels, so
    timm adapts the first convolution only when the data has another channel count.
    """
    if not path.is_file():
        raise CheckpointError(f"--initial-checkpoint {path} does not exist")
    try:
        state_dict = load_state_dict(str(path), use_ema=False)
    except Exception as e:  # torch.load of an arbitrary file: anything can come out
        raise checkpoint.unreadable(path, e, "--initial-checkpoint") from None
    overlay: dict[str, Any] = dict(file=str(path))
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
