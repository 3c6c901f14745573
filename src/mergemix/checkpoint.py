"""Checkpoints in timm's layout, written atomically, plus RNG state capture.

A checkpoint is a dict with timm's keys (``epoch``, ``arch``, ``state_dict``, ``optimizer``,
``version``, ``args``, ``metric``, ``state_dict_ema``, ``amp_scaler``) and ours (``scheduler``,
``step``: updates done in the epoch after ``epoch`` when a run was stopped mid-epoch, ``global_step``,
``steps_per_epoch`` (a resume mid-epoch needs the same), ``classes`` (the data set's class names),
``partial``: each process's loss sum, count and time in that epoch so far, ``rng``: each process's RNG
states, ``best``, ``rows``: the summary.csv rows so far). Everything in it is a
tensor or a plain Python value, so ``torch.load(weights_only=True)`` and timm's
``load_checkpoint`` read it, and the ``state_dict`` loads into the plain timm model.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .errors import CheckpointError, ConfigError, DataError

LAST = "last.pth.tar"
BEST = "model_best.pth.tar"
TMP_TAG = ".tmp"  # atomic writes go to ".<stem>.tmp<pid><suffix>" first


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a partial one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}{TMP_TAG}{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def clear_temporaries(folder: Path) -> None:
    """Remove what atomic writes of a killed process left in ``folder`` (never a finished file)."""
    for stale in folder.glob(f".*{TMP_TAG}*"):
        stale.unlink(missing_ok=True)


# what atomic_path adds to a file's name for its temporary twin: a dot, TMP_TAG and the process id
TMP_NAME_EXTRA = 1 + len(TMP_TAG) + 10


def check_names(path: str | Path, flag: str, spare: int = 0) -> None:
    """ConfigError naming ``flag`` if a part of ``path`` is longer than the file system takes (with ``spare``
    bytes more for the last part, e.g. ``TMP_NAME_EXTRA``): found before any work, not by a traceback after."""
    path = Path(path)
    limit = 255  # NAME_MAX of the common file systems; pathconf asks the one that holds the path
    with contextlib.suppress(OSError, ValueError):
        limit = os.pathconf(next((p for p in path.absolute().parents if p.is_dir()), Path("/")), "PC_NAME_MAX")
    for i, part in enumerate(path.parts):
        extra = spare if i == len(path.parts) - 1 else 0
        size = len(os.fsencode(part)) + extra
        if size > limit:
            raise ConfigError(f"{flag} {str(path)[:40]}...: the name {part[:20]}... is too long for the file "
                              f"system ({size} bytes{' with a temporary suffix' if extra else ''}, at most {limit})")


def make_dir(folder: Path, flag: str) -> Path | None:
    """Create ``folder`` (and its parents) and check that files can be written in it.

    Returns the outermost folder it created (``folder`` or one of its parents; None if ``folder``
    existed), for ``remove_dir``. A place that cannot be written is a ``ConfigError`` that names
    ``flag``, the option to change; it leaves no folder behind.
    """
    check_names(folder, flag)
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    made = missing[-1] if missing else None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        reason = (f"{'it' if blocker == folder else blocker} is a file, not a folder" if blocker
                  else e.strerror or str(e))
        if made is not None and folder.is_dir():
            remove_dir(folder, made)
        raise ConfigError(f"cannot write to {folder}: {reason}; choose another {flag}") from None
    return made


def remove_dir(folder: Path, made: Path) -> None:
    """Remove ``folder`` with everything in it, then its parents up to ``made`` (what ``make_dir``
    created) while they are empty: a folder something else has written to since stays."""
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if parent != made and made not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty (or gone)
            break
        if parent == made:
            break


def holds_training_run(folder: Path) -> bool:
    """Whether ``folder`` holds a training run, finished or not: the args.yaml, summary.csv or
    checkpoints (last.pth.tar, model_best.pth.tar) ``mergemix train`` writes there. A checkpoint of another
    name, kept alone as one downloads it, is no run."""
    return any((folder / name).is_file() for name in ("args.yaml", "summary.csv", LAST, BEST))


def unreadable(path: Path, err: BaseException, what: str = "checkpoint") -> CheckpointError:
    """The one-line error for a checkpoint file that ``torch.load`` cannot read."""
    if not _looks_saved_by_torch(path):
        return CheckpointError(f"cannot read {what} {path}: it is not a PyTorch checkpoint; "
                               f"give a file written by torch.save, e.g. RUN/{BEST}")
    return CheckpointError(f"cannot read {what} {path} (truncated or corrupt: {_first_line(err)}); "
                           f"use {BEST} or an earlier copy")


def _looks_saved_by_torch(path: Path) -> bool:
    """Whether ``path`` starts the way ``torch.save`` files do (a zip archive, or the legacy format's
    pickle); an empty or unreadable file counts, as it may be a truncated checkpoint."""
    if path.suffix == ".safetensors":  # timm reads these with safetensors: no torch.save header
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return True
    return not head or head.startswith((b"PK", b"\x80"))


def _first_line(err: BaseException) -> str:
    """The first sentence of an error, with its type when the text alone means nothing (a KeyError's "101")."""
    text = str(err).strip()
    line = text.splitlines()[0].split(". ")[0][:120] if text else ""
    return line if any(c.isalpha() for c in line) else f"{type(err).__name__} {line}".strip()


def save(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_text(path: Path) -> str:
    """The text of a run file; one that cannot be read as UTF-8 text is a ``DataError`` naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); is it the file a run "
                            "writes?") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None


def resolve(path: str | Path, best: bool = False) -> Path:
    """A checkpoint file, or a run folder: its last.pth.tar (to resume), or with ``best`` its
    model_best.pth.tar if there is one (to evaluate or draw); error if there is nothing to load."""
    path = Path(path)
    if path.is_dir():
        path = path / BEST if best and (path / BEST).is_file() else path / LAST
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: give a .pth.tar file or a run folder that holds "
                              + (f"{BEST} or {LAST}" if best else LAST))
    return path


def _read(path: Path, allowed: Sequence[type] = ()) -> Any:
    """``torch.load`` of ``path`` onto the CPU, unpickling only weights (and ``allowed`` classes); a
    truncated or corrupt file is a one-line error."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling a file the user named: anything can come out (a text file: KeyError)
        raise unreadable(path, e) from None


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (``resolve``: a run folder gives its last.pth.tar) onto the CPU."""
    path = resolve(path)
    ckpt = _read(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (no state_dict in it)")
    return ckpt


def load_weights_file(path: str | Path, best: bool = False) -> dict[str, Any]:
    """A checkpoint to evaluate or draw: one of ours (``load``), or any weights file as a checkpoint of
    its weights alone: timm train.py's (its ``argparse.Namespace`` args dropped, ``arch`` kept), a plain
    state_dict or ``{"model": state_dict}``; DDP's ``module.`` prefixes are taken off."""
    from timm.models import clean_state_dict

    path = resolve(path, best)
    ckpt = _read(path, [argparse.Namespace])
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and "state_dict" not in ckpt:
        ckpt = {"state_dict": ckpt["model"]}
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"state_dict": ckpt}
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} holds no weights: neither a checkpoint with a state_dict nor a state_dict")
    ckpt = dict(ckpt)
    if not isinstance(ckpt.get("args"), dict):  # another tool's (timm's train.py saves a Namespace): not ours to read
        ckpt["args"] = None
    for key in ("state_dict", "state_dict_ema"):
        if isinstance(ckpt.get(key), dict):
            ckpt[key] = clean_state_dict(ckpt[key])
    return ckpt


def saved_args(path: str | Path) -> dict[str, Any]:
    """The ``args`` dict a checkpoint was written with ({} if it has none)."""
    args = load(path).get("args") or {}
    if not isinstance(args, dict):
        raise CheckpointError(f"{path}: its args are not a mapping; pass the flags explicitly")
    return args


def rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    """Every RNG this process draws from: torch (CPU and CUDA), numpy, random, the objective's generator."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
        "generator": generator.get_state() if generator is not None else None,
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` strictly, with a one-line error that names what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    problems = []
    if wrong:
        k = wrong[0]
        problems.append(f"{k} is {tuple(state_dict[k].shape)} in the checkpoint but {tuple(own[k].shape)} in the model"
                        + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    if missing:
        problems.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[0]})")
    # the input channels come from the data set, not from a flag: grey weights meet RGB images
    channels = next((k for k in wrong if k.endswith("patch_embed.proj.weight") and own[k].ndim == 4
                     and state_dict[k].shape[1] != own[k].shape[1]), None)
    fixes = []
    if channels:
        fixes.append(f"it was trained on images of {state_dict[channels].shape[1]} channel(s), this data set's have "
                     f"{own[channels].shape[1]}: use data like its training set (--dataset, --data-dir)")
    if missing or unexpected or any(k != channels for k in wrong):
        fixes.append("build the architecture it was trained with (--model, --model-kwargs, --img-size, --num-classes)")
    if problems:
        raise CheckpointError(f"{source} does not fit this model: {'; '.join(problems + fixes)}")
    model.load_state_dict(state_dict)
