"""``mergemix`` command line: train, eval, methods, viz, compare.

Input errors (``mergemix.errors``) print one ``error: ...`` line on stderr and exit with code 2
(a non-finite loss, or running out of memory: 1); ``--debug`` shows the traceback instead. A run stopped by SIGINT/SIGTERM
exits with 128 + the signal number after writing a resumable checkpoint.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable, Sequence

from .errors import ConfigError, Interrupted, MergeMixError

USAGE = """usage: mergemix {train,eval,methods,viz,compare} [flags]

  train     train a model (no flags: MergeMix on digits, the embedded default)
  eval      evaluate a checkpoint: mergemix eval --checkpoint RUN_DIR/model_best.pth.tar
  methods   list the mixing methods and their options
  viz       draw what a mixing method does to a batch
  compare   tabulate and plot several runs

`mergemix COMMAND --help` shows each command's flags; `mergemix --version` the versions."""


def _train(argv: Sequence[str]) -> int:
    from .config import parse_train_args
    from .train import train

    train(parse_train_args(argv))
    return 0


def _eval(argv: Sequence[str]) -> int:
    from .evaluate import run_eval

    run_eval(argv)
    return 0


def _methods(argv: Sequence[str]) -> int:
    from . import mix
    from .config import ArgumentParser, train_defaults

    ArgumentParser(prog="mergemix methods", description="List the mixing methods (--mix names), the cost of a "
                   "step and each method's options with their defaults.").parse_args(argv)
    for name in mix.available():
        objective = mix.create(name, num_classes=10)
        print(f"{name:<13} {objective.description}")
        print(f"{'':<14}cost per step: {objective.passes}")
        for key, value in objective.defaults().items():
            resolved = f"  (resolved per model: {objective.per_model[key]})" if key in objective.per_model else ""
            print(f"{'':<14}{key} = {value}{resolved}")
    print(f"\nThese are the library's defaults (mix.create). mergemix train passes its own --smoothing "
          f"(default {train_defaults().smoothing}).")
    return 0


def _viz(argv: Sequence[str]) -> int:
    from .viz import command

    return command(argv)


def _compare(argv: Sequence[str]) -> int:
    from .compare import command

    return command(argv)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": _train, "eval": _eval, "methods": _methods, "viz": _viz, "compare": _compare,
}
DISTRIBUTED = ("train", "eval")  # the commands that run under torchrun (PyTorch DDP)


def one_line(err: BaseException) -> str:
    """The error's message on one line (a DataLoader worker wraps it in a traceback: keep its last line)."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].removeprefix(f"{type(err).__module__}.{type(err).__name__}: ")
    return " ".join(text.split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mergemix`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)  # asked for, or an error: no command
        return 0 if argv else 2
    if argv[0] == "--version":  # with the libraries whose behaviour results depend on, as bug reports need
        import timm
        import torch

        from . import __version__
        print(f"mergemix {__version__} (torch {torch.__version__}, timm {timm.__version__}, Python "
              f"{sys.version.split()[0]})")
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)} (see `mergemix --help`)",
              file=sys.stderr)
        return 2
    return run_command(argv[0], argv[1:])


def run_command(command: str, argv: Sequence[str]) -> int:
    """Run ``mergemix COMMAND ARGV``; returns the exit code.

    Input errors print one ``error: ...`` line and return their exit code (``--debug``: raised instead).
    """
    rest = list(argv)
    rank = int(os.environ.get("RANK", "0"))
    tag = f"[rank {rank}] " if rank else ""
    # an error every process of a torchrun job raises alike is printed once per machine
    quiet = int(os.environ.get("LOCAL_RANK", "0")) != 0
    try:
        if command not in DISTRIBUTED and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"mergemix {command} runs in one process: run it without torchrun")
        return COMMANDS[command](rest)
    except MergeMixError as e:
        if "--debug" in rest:
            raise
        if not (quiet and e.every_process_alike):
            print(f"{tag}error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        if not quiet:
            print(f"{tag}{e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"{tag}interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if "--debug" in rest:
            raise
        if shortfall := _out_of_memory(e):  # too large a batch or image is the user's to fix, not a bug to trace
            print(f"{tag}error: out of memory: {shortfall}; lower {SIZE_FLAGS.get(command, '--img-size')} (--debug: "
                  f"the traceback)", file=sys.stderr)
            return 1
        # under torchrun, the ranks a failed one leaves behind lose their connection to it mid-collective:
        # a traceback from each would bury the failed rank's own one-line error
        if not _lost_a_peer(e):
            raise
        print(f"{tag}error: lost the connection to another process of this run, which stopped first: its own "
              f"error line says why (--debug: this one's traceback)", file=sys.stderr)
        return 1


# what shrinks a command's memory, for its out-of-memory error
SIZE_FLAGS = {"train": "--batch-size (--eval-batch-size for the evaluation) or --img-size",
              "eval": "--batch-size or --img-size", "viz": "--num-samples or --img-size"}


def _out_of_memory(err: RuntimeError) -> str | None:
    """What an allocation that failed asked for, in words; None for any other error. torch raises
    ``OutOfMemoryError`` on a GPU and a plain RuntimeError from its CPU allocator."""
    text = one_line(err)
    cpu = re.search(r"DefaultCPUAllocator: (?:can't allocate|not enough) memory: you tried to allocate (\d+) bytes",
                    text)
    if cpu:
        return f"the CPU could not give {int(cpu[1]) / 2**30:.2f} GiB"
    if type(err).__name__ == "OutOfMemoryError":
        asked = re.search(r"Tried to allocate ([\d.]+ (?:[KMGT]i?B|B|bytes))", text)
        return f"the GPU could not give {asked[1]}" if asked else text.split(". ")[0]
    return None


def _lost_a_peer(err: RuntimeError) -> bool:
    """Whether ``err`` is a collective failing because another process of a torchrun job went away."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(
        words in str(err) for words in ("by peer", "Connection closed", "Broken pipe"))
