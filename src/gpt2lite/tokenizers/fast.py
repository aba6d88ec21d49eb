"""An opt-in native fast path for GPT-2's vocabulary: the pure-Python ``Tokenizer`` with tiktoken's encoder.

Only for vocabularies whose merge order is their id order and whose pattern is
GPT-2's, where tiktoken's ranks are the ids (GPT-2's own files; tiktoken's loader
asserts the same of them): there the ids are GPT-2's, which the tests check on
held-out text against the pure-Python encoder. Everything but ordinary encoding
(special tokens, decoding, saving, the fingerprint) is the pure-Python
tokenizer's, so data prepared with either is the same data.
"""

from __future__ import annotations

from typing import Any

from gpt2lite.tokenizers.bpe import GPT2_PATTERN, Tokenizer

__all__ = ["TiktokenTokenizer"]


class TiktokenTokenizer(Tokenizer):
    """``Tokenizer`` whose ordinary text is encoded by tiktoken (``pip install tiktoken``): the same ids, faster."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """As ``Tokenizer``; refuses vocabularies tiktoken would encode differently."""
        super().__init__(*args, **kwargs)
        try:
            import tiktoken  # noqa: F401
        except ImportError:
            raise ImportError("the tiktoken fast path needs tiktoken: pip install tiktoken") from None
        specials = set(self.special_tokens.values())
        # tiktoken merges the pair whose merged token has the lowest rank; GPT-2 the pair of the earliest merge.
        # With ranks = ids the two agree when merge r made token 256 + r, as in GPT-2's files.
        by_rank = sorted((rank, merged) for rank, merged in self._merges.values())
        if self.pattern != GPT2_PATTERN or any(merged != 256 + rank for rank, merged in by_rank) or \
                sorted(self._byte_ids) != list(range(256)):
            raise ValueError("the tiktoken fast path serves vocabularies laid out as GPT-2's (byte tokens 0-255, "
                             "then one token per merge in merge order, GPT-2's pattern); use Tokenizer")
        self._specials = specials
        self._tiktoken: Any = None

    def _encoder(self) -> Any:
        if self._tiktoken is None:
            import tiktoken

            ranks = {token: i for i, token in enumerate(self._decoder) if token is not None and i not in self._specials}
            self._tiktoken = tiktoken.Encoding("gpt2lite", pat_str=self.pattern, mergeable_ranks=ranks,
                                               special_tokens=dict(self.special_tokens))
        return self._tiktoken

    def _encode_ordinary(self, text: str) -> list[int]:
        return self._encoder().encode_ordinary(text)

    def __getstate__(self) -> dict[str, Any]:
        # The Rust encoder does not pickle: a worker process builds its own.
        return {**self.__dict__, "_tiktoken": None}
