"""The context gate: whether a prompt and the tokens asked of it fit the model's context, and the window past it.

Every path asks here, and nowhere else: ``generate`` (so ``TextGenerator`` and
the CLI), the text layer's check by characters before it encodes, the server,
whose HTTP layer refuses a request before anything runs and whose scheduler
shifts rows, and the windows of training, scoring and classifying
(``check_window``). Refusals are ``ContextLengthError`` (or ``OptionError``
for ``n_keep``), which name the option at fault in ``param``.

Generation past the context is llama.cpp's context shift, for a model with
absolute positions: when a row's window of tokens fills the context, its first
``n_keep`` tokens stay, half of the rest is dropped at once, and the kept window
is run again from position 0 (GPT-2's positions are absolute, so the cached keys
and values cannot simply slide). A shift so costs one prefill per half window.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpt2lite.errors import ContextLengthError, OptionError

__all__ = ["check_n_keep", "check_text_fits", "check_window", "fit_prompt", "shifted"]


def check_n_keep(n_keep: int, context: int) -> None:
    """Refuse an ``n_keep`` that would leave a shift nothing to drop.

    >>> check_n_keep(200, context=128)
    Traceback (most recent call last):
    ...
    gpt2lite.errors.OptionError: n_keep=200 leaves nothing to drop from the context of 128 tokens; keep at most 126
    """
    if n_keep > context - 2:
        raise OptionError("n_keep", f"n_keep={n_keep} leaves nothing to drop from the context of {context} tokens; "
                                    f"keep at most {context - 2}")


def fit_prompt(length: int, context: int | None, *, max_new_tokens: int, context_shift: bool = False,
               n_keep: int = 0, truncate_prompt: str = "error") -> int:
    """How many of a prompt's last tokens to run: all ``length`` when they fit, fewer with ``truncate_prompt='left'``.

    Without a context shift the prompt and ``max_new_tokens`` must fit together;
    with one, the prompt alone (and ``n_keep`` must leave a shift something to
    drop). ``context`` None is a model without a limit (recurrent ones).

    >>> fit_prompt(100, 128, max_new_tokens=40, truncate_prompt="left")
    88
    >>> fit_prompt(100, 128, max_new_tokens=40)
    Traceback (most recent call last):
    ...
    gpt2lite.errors.ContextLengthError: the prompt of 100 tokens + max_new_tokens=40 exceeds the model's context of \
128 tokens; shorten the prompt, lower max_new_tokens or pass truncate_prompt='left'
    """
    if context is None:
        return length
    numbers = dict(context=context, prompt_tokens=length, max_new_tokens=0 if context_shift else max_new_tokens)
    if context_shift:
        check_n_keep(n_keep, context)
    room = context if context_shift else context - max_new_tokens
    if length <= room:
        return length
    if truncate_prompt == "left" and room >= 1:
        return room
    if length > context:  # the prompt alone is too long, whatever else was asked
        shift = " (a context shift goes on past it, but starts from a prompt that fits)" if context_shift else ""
        raise ContextLengthError("prompt", f"the prompt of {length} tokens exceeds the model's context of {context} "
                                           f"tokens{shift}; shorten it, or pass truncate_prompt='left'", **numbers)
    raise ContextLengthError(
        "max_new_tokens", f"the prompt of {length} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                          f"context of {context} tokens; shorten the prompt, lower max_new_tokens"
                          + (" or pass truncate_prompt='left'" if room >= 1 else ""), **numbers)


def check_text_fits(characters: int, context: int | None, max_token_bytes: int, *, max_new_tokens: int = 0,
                    context_shift: bool = False, what: str = "the prompt") -> None:
    """Refuse a text that cannot fit before time and memory go into encoding it.

    A token holds at most ``max_token_bytes`` bytes, so at most that many
    characters: a text longer than the room times that has too many tokens.
    """
    if context is None:
        return
    numbers = dict(context=context, characters=characters, max_new_tokens=0 if context_shift else max_new_tokens)
    room = context if context_shift else context - max_new_tokens
    if room <= 0:
        raise ContextLengthError("max_new_tokens", f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                                                   f"the model's context of {context} tokens; lower it, or pass "
                                                   "context_shift=True to go on past the context", **numbers)
    if characters > room * max_token_bytes:
        with_new = "" if context_shift else f" with max_new_tokens={max_new_tokens}"
        raise ContextLengthError("prompt", f"{what} has {characters} characters: more tokens than fit in the model's "
                                           f"context of {context} tokens{with_new}; shorten it, or pass "
                                           "truncate_prompt='left'", **numbers)


def check_window(length: object, context: int | None, param: str, *, least: int = 1) -> None:
    """Refuse a window of tokens (a training block, a scoring or classifying length) outside ``least..context``.

    >>> check_window(200, 128, "block_size")
    Traceback (most recent call last):
    ...
    gpt2lite.errors.OptionError: block_size must be an int in 1..128 (the model's context), got 200
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < least or (
            context is not None and length > context):
        raise OptionError(param, f"{param} must be an int in {least}..{context or 'any'} (the model's context), "
                                 f"got {length!r}")


def shifted(window: Sequence[int], context: int, n_keep: int) -> list[int]:
    """The window after a shift: its first ``n_keep`` tokens, then all but the first half of the rest.

    >>> shifted(list(range(10)), context=10, n_keep=2)
    [0, 1, 6, 7, 8, 9]
    """
    drop = (context - n_keep) // 2
    return [*window[:n_keep], *window[n_keep + drop :]]
