"""One registry for every mixing method: ``available()`` lists names, ``create(name, ...)`` builds one.

Each method lives in a module named after it (``none`` in plain.py; ``cutmix`` and ``deit``, MixUp's
variants, in mixup.py); importing this package registers them all.
"""
from __future__ import annotations

from typing import Any, TypeVar

from .base import (Objective, StepOutput, accepted_options, check_option_names, check_option_types, method_options,
                   mixed_targets, sample_lam, smooth_one_hot, soft_cross_entropy)

_REGISTRY: dict[str, type[Objective]] = {}
T = TypeVar("T", bound=type[Objective])


def register(cls: T) -> T:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"bad or duplicate method name {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names accepted by ``create`` and by the CLI's ``--mix``."""
    return sorted(_REGISTRY)


def get_class(name: str) -> type[Objective]:
    """The class registered as ``name``; ValueError listing the available names if there is none."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown mixing method {name!r}; choose one of: {', '.join(available())}")
    return _REGISTRY[name]


def create(name: str, num_classes: int, **options: Any) -> Objective:
    """Build the training objective of method ``name``.

    Unknown or ill-typed options raise ``TypeError``, out-of-range ones ``ValueError``, each naming the option.
    """
    cls = get_class(name)
    check_option_names(cls, options)
    check_option_types(cls, options)
    return cls(num_classes=num_classes, **options)


from . import mergemix, plain  # noqa: E402,F401  (importing a method module registers it)
from . import fmix, gridmix, mixup, resizemix, saliencymix, smmix, smoothmix, tokenmix, transmix  # noqa: E402,F401,E501

__all__ = ["Objective", "StepOutput", "accepted_options", "available", "check_option_names", "create", "get_class",
           "method_options", "register", "mixed_targets", "sample_lam", "smooth_one_hot", "soft_cross_entropy"]
