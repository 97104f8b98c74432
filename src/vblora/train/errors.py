"""Errors of the training pipeline: user-facing, each says what is wrong and where."""

from __future__ import annotations

try:  # the core's base class, so `except vblora.errors.VBLoRAError` catches ours too
    from vblora.errors import VBLoRAError as _Base
except ImportError:  # core not importable (only while the core is being written)
    _Base = ValueError


class TrainError(_Base):
    """Base of the pipeline's errors (a ValueError)."""


class DataError(TrainError):
    """A data file is missing or malformed, or a label is outside the training label set."""


class SetupError(TrainError):
    """A model path, target module, method or device option that cannot work."""
