"""Generation past the context window: llama.cpp's context shift, for a model with absolute positions.

When a row's window of tokens fills the model's context, its first ``n_keep``
tokens stay, half of the rest is dropped at once, and the kept window is run again
from position 0 (GPT-2's positions are absolute, so the cached keys and values
cannot simply slide). A shift so costs one prefill per half window. The decode loop
and the server's scheduler both shift through ``shifted``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["check_n_keep", "shifted"]


def check_n_keep(n_keep: int, context: int) -> None:
    """Refuse an ``n_keep`` that would leave a shift nothing to drop."""
    if n_keep > context - 2:
        raise ValueError(f"n_keep={n_keep} leaves nothing to drop from the context of {context} tokens; "
                         f"keep at most {context - 2}")


def shifted(window: Sequence[int], context: int, n_keep: int) -> list[int]:
    """The window after a shift: its first ``n_keep`` tokens, then all but the first half of the rest.

    >>> shifted(list(range(10)), context=10, n_keep=2)
    [0, 1, 6, 7, 8, 9]
    """
    drop = (context - n_keep) // 2
    return [*window[:n_keep], *window[n_keep + drop :]]
