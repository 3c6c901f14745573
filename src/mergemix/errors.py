"""Errors that mean "the input is wrong": the CLI prints them as one line and exits with ``exit_code``.

Raise these (or a subclass) for anything a user can fix: a bad flag, a missing file, a checkpoint
that does not fit. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path


class MergeMixError(Exception):
    """Base class; ``str(err)`` is the one line the user sees (say what is wrong and how to fix it).

    ``every_process_alike``: under torchrun every process raises the same error (it comes from the
    flags and files they all read alike), so one process per machine prints it; an error of such a
    class that one process may meet alone (its batch, its download) passes ``every_process_alike=False``.
    """

    exit_code = 2
    every_process_alike = False

    def __init__(self, message: str, *, every_process_alike: bool | None = None):
        super().__init__(message)
        if every_process_alike is not None:
            self.every_process_alike = every_process_alike


class ConfigError(MergeMixError):
    """Bad flags, YAML recipe, model or method options."""

    every_process_alike = True


class DataError(MergeMixError):
    """A data set that is missing, empty, truncated or corrupt."""


class CheckpointError(MergeMixError):
    """A checkpoint that is missing, unreadable, or does not fit the model being built."""

    every_process_alike = True


class TrainingError(MergeMixError):
    """Training cannot go on (e.g. a non-finite loss); not a usage error, so exit code 1."""

    exit_code = 1


class Interrupted(Exception):
    """A run stopped by SIGINT/SIGTERM after writing a resumable checkpoint (exit code 128 + signal).
    Every process of a torchrun job stops at the same step."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name}; resume with: {resume_command(checkpoint)}")
        self.signum = signum


def resume_command(checkpoint: Path) -> str:
    """The command that resumes ``checkpoint`` with as many processes as this one runs among (torchrun's
    environment): a checkpoint stopped inside an epoch resumes only with the same steps per epoch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return f"mergemix train --resume {checkpoint}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    launch = (f"torchrun --standalone --nproc_per_node {local}" if local == world else
              f"torchrun --nnodes {world // local} --nproc_per_node {local} (and this launch's rendezvous flags)")
    return f"{launch} -m mergemix train --resume {checkpoint}"
