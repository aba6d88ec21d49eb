"""Learning a byte-level BPE vocabulary from your own text, with Hugging Face's ``tokenizers`` trainer.

The vocabulary is GPT-2's kind: the 256 byte tokens, merges learned on words
split by GPT-2's pattern, and ``<|endoftext|>`` as the last id. It comes back as
this library's exact ``Tokenizer``, whose ``save`` writes the standard
``vocab.json`` + ``merges.txt`` that transformers, vLLM and llama.cpp read.
``tokenizers`` comes with the ``tokenizers`` extra.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from gpt2lite.tokenizers.bpe import Tokenizer
from gpt2lite.tokenizers.files import ENDOFTEXT, parse_vocab

__all__ = ["train_bpe"]

MAX_VOCAB = 1 << 16  # training data is stored as uint16


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens (``<|endoftext|>`` included) learned from ``texts``.

    Merges stop early when no pair occurs ``min_frequency`` times. Example::

        tok = train_bpe(open("corpus.txt"), 8000)
        tok.save("my-tokenizer")  # vocab.json, merges.txt, tokenizer_config.json
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 257 < vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be an int in (257, {MAX_VOCAB}] (256 bytes and the end token come "
                         f"first), got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    try:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers, trainers
    except ImportError:
        raise ImportError("training a tokenizer needs Hugging Face tokenizers: pip install 'gpt2lite[tokenizers]'") \
            from None
    hf = HFTokenizer(models.BPE())
    # GPT-2's pattern, no added space: the words our Tokenizer splits text into.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    hf.train_from_iterator(texts, trainer)
    learned = json.loads(hf.to_str())["model"]
    vocab: dict[str, int] = learned["vocab"]
    # Newer tokenizers write a merge as [left, right], older ones as "left right".
    merges = [m if isinstance(m, str) else " ".join(m) for m in learned["merges"]]
    vocab[ENDOFTEXT] = len(vocab)  # last, as in GPT-2
    tokens, ranked, specials = parse_vocab(vocab, "\n".join(merges))
    return Tokenizer(tokens, ranked, special_tokens=specials)
