"""Exceptions. All derive from `VBLoRAError` (a ValueError), so callers can catch one type."""


class VBLoRAError(ValueError):
    """Base class of every error vblora raises on bad input."""


class ConfigError(VBLoRAError):
    """A `VBLoRAConfig` field is invalid or inconsistent with the model (e.g. topk > num_vectors)."""


class TargetError(VBLoRAError):
    """Target matching failed: no module matched, a layer type cannot be adapted, or the model is already adapted."""


class NonFiniteError(VBLoRAError):
    """The bank or the logits hold NaN or infinite values."""


class AdapterFormatError(VBLoRAError):
    """An adapter file is truncated, corrupt, hand-edited or does not fit the base model."""


class QuantizedBaseError(VBLoRAError):
    """An operation needs a full-precision base weight (merge in place) but the base layer is quantized."""
