"""The exceptions gpt2lite raises on purpose; each message names the problem and, where there is one, the fix."""

from __future__ import annotations

__all__ = ["CheckpointError", "ContextLengthError", "ModelNotFoundError", "NonFiniteError", "OptionError"]


class ModelNotFoundError(FileNotFoundError):
    """A model or tokenizer file could not be found locally or on the hub."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, truncated, misshapen, of the wrong dtype, or unsafe to load."""


class NonFiniteError(FloatingPointError):
    """A model produced NaN or infinite values (non-finite weights, a diverged run, half-precision overflow)."""


class OptionError(ValueError):
    """An option's value is refused; ``param`` names the option (a ``GenerationOptions`` field, or ``prompt``).

    The server answers with ``param`` and the command line names the flag from
    it, so neither has to read the field's name back out of the message.
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(OptionError):
    """A prompt, with the tokens asked of it, does not fit the model's context (OpenAI's context_length_exceeded).

    Besides the message, the numbers: so that a layer with other names for the
    options (the server's ``max_tokens``) words it in its own terms.
    """

    def __init__(self, param: str, message: str, *, context: int, prompt_tokens: int | None = None,
                 characters: int | None = None, max_new_tokens: int = 0) -> None:
        super().__init__(param, message)
        self.context, self.prompt_tokens, self.characters = context, prompt_tokens, characters
        self.max_new_tokens = max_new_tokens
