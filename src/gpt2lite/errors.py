"""The exceptions gpt2lite raises on purpose; each message names the problem and, where there is one, the fix."""

from __future__ import annotations

__all__ = ["CheckpointError", "ModelNotFoundError", "NonFiniteError"]


class ModelNotFoundError(FileNotFoundError):
    """A model or tokenizer file could not be found locally or on the hub."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, truncated, misshapen, of the wrong dtype, or unsafe to load."""


class NonFiniteError(FloatingPointError):
    """A model produced NaN or infinite values (non-finite weights, a diverged run, half-precision overflow)."""
