"""Errors of the training pipeline: user-facing, each says what is wrong and where."""

from __future__ import annotations

from vblora.errors import VBLoRAError


class TrainError(VBLoRAError):  # the core's base class: `except VBLoRAError` catches ours too
    """Base of the pipeline's errors (a ValueError)."""


class DataError(TrainError):
    """A data file is missing or malformed, or a label is outside the training label set."""


class SetupError(TrainError):
    """A model path, target module, method or device option that cannot work."""


class ResumeError(SetupError):
    """A checkpoint that cannot continue this run: damaged, from other settings, or without optimizer state."""


class SaveError(TrainError):
    """A checkpoint could not be written (a full disk, a quota); the earlier ones are intact."""


class DivergedError(TrainError):
    """The loss or the gradient norm stopped being finite."""
