"""Errors that mean "the input is wrong": the CLI prints them as one line and exits with ``exit_code``.

Raise these (or a subclass) for anything a user can fix: a bad flag, a missing file, a checkpoint
that does not fit. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import signal
from pathlib import Path


class MergeMixError(Exception):
    """Base class; ``str(err)`` is the one line the user sees (say what is wrong and how to fix it)."""

    exit_code = 2


class ConfigError(MergeMixError):
    """Bad flags, YAML recipe, model or method options."""


class DataError(MergeMixError):
    """A data set that is missing, empty, truncated or corrupt."""


class CheckpointError(MergeMixError):
    """A checkpoint that is missing, unreadable, or does not fit the model being built."""


class TrainingError(MergeMixError):
    """Training cannot go on (e.g. a non-finite loss); not a usage error, so exit code 1."""

    exit_code = 1


class Interrupted(Exception):
    """A run stopped by SIGINT/SIGTERM after writing a resumable checkpoint (exit code 128 + signal)."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name}; resume with: mergemix train --resume {checkpoint}")
        self.signum = signum
