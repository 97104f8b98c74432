"""Errors of the training pipeline: user-facing, each says what is wrong and where."""

from __future__ import annotations

from vblora.errors import VBLoRAError


class TrainError(VBLoRAError):  # the core's base class: `except VBLoRAError` catches ours too
    """Base of the pipeline's errors (a ValueError)."""


class DataError(TrainError):
    """A data file is missing or malformed, or a label is outside the training label set."""


class SetupError(TrainError):
    """A model path, target module, method or device option that cannot work."""
