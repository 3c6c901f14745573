"""The training-objective contract every mixing method follows.

The training loop calls ``objective(model, x, y)`` once per step and back-propagates
``StepOutput.loss``; it never asks which method it is running.
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import numbers
import types
import typing
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import unwrap


@dataclass
class StepOutput:
    """What one training step produced.

    loss: scalar fp32 loss to back-propagate.
    logits: (B, C) logits of a training forward (MergeMix's clean pass where it runs one, else the mixed
        pass), for a caller that tracks training accuracy.
    x_mixed: (B, C, H, W) the images the mixed forward saw (None when nothing was mixed).
    mask: (B, 1, H, W) 1 where a pixel comes from the sample itself, 0 where from its partner.
    lam: (B,) the mixing ratio drawn (share of the sample kept).
    lam_hat: (B,) the label weight given to the sample's own class.
    partner: (B,) index of each sample's partner in the batch.
    scores: (B, L) per-patch attention scores, if any: of the clean images where they place the mask
        (MergeMix, SMMix), of the mixed ones where they weigh the labels (TransMix, TokenMix:
        ``extras["scores_of"]`` is then "mixed").
    extras: anything else worth logging or plotting (e.g. the read-out).
    """

    loss: Tensor
    logits: Tensor
    x_mixed: Tensor | None = None
    mask: Tensor | None = None
    lam: Tensor | None = None
    lam_hat: Tensor | None = None
    partner: Tensor | None = None
    scores: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def smooth_one_hot(y: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """(B,) class indices -> (B, C) label-smoothed targets, as timm's ``mixup_target`` does."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return torch.full((y.shape[0], num_classes), off, device=y.device).scatter_(1, y[:, None], on)


def mixed_targets(y: Tensor, partner: Tensor, lam: Tensor | float, num_classes: int, smoothing: float) -> Tensor:
    """Soft targets lam * smooth(y) + (1 - lam) * smooth(y[partner]); lam scalar or (B,). Rows sum to 1."""
    t = smooth_one_hot(y, num_classes, smoothing)
    if isinstance(lam, Tensor):  # a number stays one: made a tensor, it would be a blocking copy to the GPU
        lam = lam.to(t.dtype).reshape(-1, 1)
    return t * lam + t[partner] * (1.0 - lam)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy against (B, C) soft targets, computed in fp32 even under autocast."""
    if logits.shape != targets.shape:  # (B, 1) logits would broadcast against any targets into a zero loss
        raise ValueError(f"the model gives logits of shape {tuple(logits.shape)} but the targets are "
                         f"{tuple(targets.shape)}: build the model and the objective for the same num_classes")
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def check_batch(x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """ValueError unless x is (B, C, H, W) float images and y (B,) integer class indices below
    ``num_classes`` (the range is checked only for labels on the CPU: elsewhere it would wait for the
    device). Returns y as int64, the dtype torch's one-hot and scatter take (uint8 labels from numpy)."""
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected a batch of float images (B, C, H, W), got {x.dtype} of shape {tuple(x.shape)}")
    if y.shape != x.shape[:1] or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"expected labels as ({x.shape[0]},) integer class indices, got {y.dtype} of shape "
                         f"{tuple(y.shape)} (one-hot or soft targets: pass their argmax)")
    if y.device.type == "cpu" and y.numel() and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")
    return y.long()


def derive_seed(generator: torch.Generator | None) -> int:
    """A seed for another RNG, drawn from ``generator`` (the global torch RNG when None)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def sample_lam(alpha: float, generator: torch.Generator | None = None) -> float:
    """λ ~ Beta(α, α), reproducible from ``generator`` (the global torch RNG when None).

    torch's Beta sampler takes no generator, so a numpy one is seeded from ours.
    """
    return float(np.random.default_rng(derive_seed(generator)).beta(alpha, alpha))


def check_positive(**values: float | list[float] | None) -> None:
    """Raise ValueError naming the first option that is not > 0 (e.g. ``check_positive(alpha=alpha)``);
    a list must hold only such values, None (unset) passes."""
    _check_values(values, lambda v: v > 0, "> 0")


def check_non_negative(**values: float | list[float] | None) -> None:
    """Raise ValueError naming the first option that is not >= 0 (a list: any of its values; None passes)."""
    _check_values(values, lambda v: v >= 0, ">= 0")


def check_probability(**values: float | list[float] | None) -> None:
    """Raise ValueError naming the first option that is not in [0, 1] (a list: any of its values; None passes)."""
    _check_values(values, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")


def _check_values(values: dict[str, Any], ok: Callable[[Any], bool], wanted: str) -> None:
    for key, value in values.items():
        items = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
        # inf passes "> 0" but Beta(inf, inf) draws NaN: every check asks for a finite number too
        if not all(math.isfinite(v) and ok(v) for v in items):
            raise ValueError(f"{key} must be a finite number {wanted}, got {value}")


_WORDS = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a word", "words"), type(None): ("null", "nulls")}


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as YAML or a flag gives it) has the annotated type ``hint``; unknown hints pass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin in (list, tuple):  # YAML gives lists for tuples
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if hint in (int, float):  # numpy scalars count; true/false do not
        return isinstance(value, numbers.Integral if hint is int else numbers.Real) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple) and args and len(set(args) - {Ellipsis}) == 1 and args[0] in _WORDS:
        count = f"{len(args)} " if origin is tuple and Ellipsis not in args else ""
        return f"a list of {count}{_WORDS[args[0]][1]}"
    return _WORDS[hint][0] if hint in _WORDS else getattr(hint, "__name__", str(hint))


def accepted_options(cls: type) -> list[str]:
    """Keyword names a class's ``__init__`` chain accepts: an ``__init__`` with ``**kwargs`` hands them
    on to its base's, whose names count too (every method's chain ends at ``Objective.__init__``).
    The most derived ``__init__``'s names come first, each ``__init__``'s in signature order."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name != "self" and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def method_options(cls: type) -> list[str]:
    """The options a user sets on a method: ``accepted_options`` but the class count and the generator."""
    return [k for k in accepted_options(cls) if k not in ("num_classes", "generator")]


def check_option_names(cls: type, names: Iterable[str]) -> None:
    """TypeError naming the options among ``names`` that method ``cls`` does not take, with the
    closest option for a misspelt one and every option it takes."""
    unknown = sorted(set(names) - set(accepted_options(cls)))
    if unknown:
        options = sorted(method_options(cls))
        close = difflib.get_close_matches(unknown[0], options, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TypeError(f"{getattr(cls, 'name', cls.__name__)} has no option {', '.join(unknown)}{hint}; "
                        f"its options: {', '.join(options)}")


def check_option_types(cls: type, options: dict[str, Any]) -> None:
    """TypeError naming the first option whose value does not have the type ``cls.__init__`` annotates.

    Options the constructor does not annotate (or does not take: its own TypeError says so) pass.
    """
    try:
        hints = typing.get_type_hints(cls.__init__)
    except (NameError, TypeError):  # an annotation that does not resolve: nothing to check against
        return
    for key, value in options.items():
        if key in hints and not _fits(value, hints[key]):
            raise TypeError(f"{key} must be {_describe(hints[key])}, got {value!r}")


class Objective:
    """Base class: one instance per run, called once per training step.

    Subclasses set ``name`` and ``description``, ``passes`` (the cost of a step) where it is more
    than the default "1 fwd + 1 bwd", and implement ``mixed_step``. ``prepare(model)`` is called once, before the
    model is wrapped in DDP or compiled; attention-based methods patch the model in ``patch_model``.
    ``mixup_enabled`` switches mixing off: a call then takes ``clean_step``, plain label-smoothed CE.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    passes: ClassVar[str] = "1 fwd + 1 bwd"
    pairs_images: ClassVar[bool] = True  # mixes each image with a partner from its batch (needs at least 2)
    per_model: ClassVar[dict[str, str]] = {}  # options whose default prepare() resolves per model, and to what

    def __init__(self, num_classes: int, smoothing: float = 0.1, generator: torch.Generator | None = None):
        if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a whole number >= 1, got {num_classes!r}")
        check_probability(smoothing=smoothing)
        self.num_classes = num_classes
        self.smoothing = smoothing
        self.generator = generator
        self.mixup_enabled = True
        self._prepared: weakref.ref[nn.Module] | None = None  # the model prepare() patched, if any
        self._patch: Any = None

    def prepare(self, model: nn.Module) -> nn.Module:
        """Check ``model`` and patch it (``patch_model``) once before training; returns it.

        An objective serves one model: the settings it resolves while patching (read-out block,
        merges per block, patch grid) are that model's, so preparing a second model is refused.
        """
        net = unwrap(model)
        if self.prepared_model not in (None, net):
            raise ValueError(f"this {self.name} objective is already prepared for another model, whose "
                             f"settings it keeps: create one objective per model")
        if getattr(net, "distilled_training", False):
            # timm's distilled DeiT then returns (logits, distillation logits): two heads for two losses
            raise ValueError("the model is a distilled DeiT in distillation training (set_distilled_training(True)), "
                             "whose forward returns two heads' logits; these objectives train one: call "
                             "model.set_distilled_training(False) (its forward then averages the heads)")
        before = getattr(net, "tome", None)
        self.patch_model(net)
        self._prepared = weakref.ref(net)  # only once patched: a model that failed leaves the objective free
        # the settings patch_model left (ToMe's), checked at each step; None for a method that patches nothing
        after = getattr(net, "tome", None)
        self._patch = after if after is not before else None
        return model

    @property
    def prepared_model(self) -> nn.Module | None:
        """The model (unwrapped) that ``prepare`` patched; None before."""
        return None if self._prepared is None else self._prepared()

    def patch_model(self, net: nn.Module) -> None:
        """``prepare``'s method-specific part: patch the unwrapped model ``net`` in place (here: nothing)."""

    def clean_step(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        """Plain label-smoothed CE: the step when mixing is switched off.

        x: (B, C, H, W) images; y: (B,) class indices. Returns the loss and the (B, num_classes) logits.
        """
        logits = model(x)
        return StepOutput(soft_cross_entropy(logits, smooth_one_hot(y, self.num_classes, self.smoothing)), logits)

    def mixed_step(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:  # pragma: no cover - abstract
        """The method's training step: x (B, C, H, W) images, y (B,) class indices -> loss, logits and what it mixed."""
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        """A copy or a pickle is prepared for no model (a weak reference neither copies nor pickles)."""
        return {**self.__dict__, "_prepared": None, "_patch": None}

    def _check_patch(self, model: nn.Module) -> None:
        """ValueError when ``model`` is not the one ``prepare`` patched, or its merging settings are no
        longer those ``prepare`` set (another objective prepared it, or ``patch_tome`` re-patched it,
        since): the step would run with settings that are not this objective's."""
        if self._prepared is None or self._patch is None:  # a method that patched nothing: any model will do
            return
        net = unwrap(model)
        if net is not self.prepared_model:
            raise ValueError(f"this {self.name} objective was prepared for another model: call it with that "
                             f"model (or its DDP / compiled wrapper), or create one objective per model")
        if getattr(net, "tome", None) is not self._patch:
            raise ValueError(f"the model was patched again after this {self.name} objective prepared it (by another "
                             f"objective's prepare() or by patch_tome()) and would train with those settings: "
                             f"prepare it again, or patch a copy (copy.deepcopy(model)) for merged evaluation")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        """One training step's loss: ``mixed_step``, or ``clean_step`` while ``mixup_enabled`` is False."""
        y = check_batch(x, y, self.num_classes)
        self._check_patch(model)
        return self.mixed_step(model, x, y) if self.mixup_enabled else self.clean_step(model, x, y)

    def defaults(self) -> dict[str, Any]:
        """This instance's options and their values (``mergemix methods`` prints them): every keyword its
        ``__init__`` chain takes, kept as an attribute of the same name, but the class count and generator."""
        return {k: getattr(self, k) for k in method_options(type(self))}

    def notes(self) -> list[str]:
        """After ``prepare``: settings that run but likely not as the user means (printed by ``train``)."""
        return []

    def trained_forward(self, model: nn.Module) -> contextlib.AbstractContextManager | None:
        """After ``prepare``: a context in which ``model`` computes the forward this method trains
        it with, where that is not the plain one (MergeMix: merged); None where it is."""
        return None
