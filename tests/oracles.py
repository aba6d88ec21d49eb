"""Reference implementations built offline from the same files: shared by the tests and benchmarks."""

from __future__ import annotations

import os

from gpt2lite.tokenizers.files import bundled_gpt2_files

# tiktoken's "gpt2" pattern (its own spelling of GPT-2's).
TIKTOKEN_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def tiktoken_gpt2():
    """tiktoken's GPT-2 encoding, built from the bundled vocabulary files instead of a download."""
    import tiktoken
    import tiktoken.load

    encoder, vocab_bpe = bundled_gpt2_files()
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the local files directly, cache nothing
    try:
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder))
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    return tiktoken.Encoding(
        "gpt2-local", pat_str=TIKTOKEN_GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )


def hf_gpt2_tokenizer():
    """Hugging Face `tokenizers` byte-level BPE over the bundled vocabulary files (no special tokens)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    encoder, vocab_bpe = bundled_gpt2_files()
    hf = tokenizers.Tokenizer(models.BPE.from_file(str(encoder), str(vocab_bpe)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf
