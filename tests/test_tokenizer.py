"""The tokenizer against tiktoken's and Hugging Face's GPT-2 encodings of the same vocabulary files."""

from __future__ import annotations

import functools
import hashlib
import json
import random
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import oracles
from gpt2lite import ModelNotFoundError, StreamDecoder, Tokenizer
from gpt2lite.tokenizers.files import bundled_gpt2_files

# The hashes tiktoken checks for its "gpt2" encoding: the genuine OpenAI files.
GENUINE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

SAMPLES = [
    "",
    "hello world",
    "Hello, World! It's a test: we've got 3 dogs, they're fine, I'm sure, you'll see, he'd say.",
    "IT'S WE'VE THEY'RE I'M YOU'LL HE'D DON'T 'S 'T",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }\t// tabs\r\n",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "emoji: 👩‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 thumbs, 🇫🇷🇯🇵 flags",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 Zalgo: Z\u0351\u036b\u0343a\u0360l\u0352g\u0308o",
    "   leading spaces, trailing spaces   ",
    "multiple\n\n\nnewlines\n \n  \n\t\t\ttabs    and  spaces      end  ",
    "numbers 1234567890 3.14159 -42 1e10 0x1F 1,000,000 ١٢٣ ⅷ",
    "text<|endoftext|>more text",
    "<|endoftext|>",
    "a" * 300 + " " + "ab" * 200,
    "Ünïcödé ßtraße café résumé naïve Ελληνικά русский עברית العربية",
    "\u200b zero width \ufeff bom \u00a0 nbsp \u2028 line sep",
    "mixed: http://example.com/path?q=1&r=2#frag user@example.com $100.00 50% #hashtag @mention",
]


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture(scope="session")
def tiktoken_gpt2():
    return oracles.tiktoken_gpt2()


@pytest.fixture(scope="session")
def hf_gpt2():
    return oracles.hf_gpt2_tokenizer()


def test_bundled_files_are_genuine():
    for path in bundled_gpt2_files():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == GENUINE_SHA256[path.name]


def test_known_ids(tok):
    assert tok.n_vocab == 50257
    assert tok.eot_token == 50256
    assert tok.encode("hello world") == [31373, 995]  # tiktoken's documented example


@pytest.mark.parametrize("text", SAMPLES)
def test_equals_tiktoken_and_hf(tok, tiktoken_gpt2, hf_gpt2, text):
    ours = tok.encode(text)
    assert ours == tiktoken_gpt2.encode_ordinary(text)
    assert ours == hf_gpt2.encode(text).ids
    assert tok.decode(ours) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_allowed_special_equals_tiktoken(tok, tiktoken_gpt2, text):
    assert tok.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == tiktoken_gpt2.encode(text, allowed_special="all")


def test_special_tokens_are_text_unless_allowed(tok):
    assert 50256 not in tok.encode("a<|endoftext|>b")
    assert tok.encode("a<|endoftext|>b", allowed_special="all").count(50256) == 1
    assert tok.decode(tok.encode("a<|endoftext|>b", allowed_special="all")) == "a<|endoftext|>b"
    with pytest.raises(ValueError, match="unknown special"):
        tok.encode("x", allowed_special={"<|fim|>"})
    with pytest.raises(TypeError, match="allowed_special"):
        tok.encode("x", allowed_special="<|endoftext|>")


def test_encode_batch(tok, tiktoken_gpt2):
    assert tok.encode_batch(SAMPLES) == tiktoken_gpt2.encode_ordinary_batch(SAMPLES)
    with pytest.raises(TypeError, match="single str"):
        tok.encode_batch("abc")


def test_bad_input(tok):
    with pytest.raises(TypeError, match="takes a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tok.encode(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="50257"):
        tok.decode([1, 50257])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="99999"):
        tok.decode_bytes([99999])


def test_lone_surrogates_like_tiktoken(tok, tiktoken_gpt2):
    for text in ["a\ud800b", "\udfff", "ok \ud83d\ude00 pair", "x\ud83d"]:
        assert tok.encode(text) == tiktoken_gpt2.encode_ordinary(text)


def test_decode_invalid_utf8_is_replaced(tok):
    # "𝄞" is four bytes over several tokens; half of it is not valid UTF-8.
    ids = tok.encode("𝄞")
    assert len(ids) > 1
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode_bytes(ids) == "𝄞".encode()


@pytest.mark.parametrize("text", ["👩‍👩‍👧‍👦 and 日本語", "é€𝄞 mixed ascii", SAMPLES[7]])
def test_stream_decoder_never_splits_characters(tok, text):
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    pieces = [dec.add(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert isinstance(dec, StreamDecoder)
    # Some character spans tokens, so some token yields nothing until the next completes it.
    assert "" in pieces[:-1]


def test_stream_decoder_flushes_unfinished_character(tok):
    ids = tok.encode("𝄞")
    dec = tok.stream_decoder()
    assert dec.add(ids[0]) == ""
    assert dec.flush() == "\ufffd"


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_and_oracle_property(tok, tiktoken_gpt2, text):
    ids = tok.encode(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab '\n\t1.😀é<|>endoftx")), max_size=60))
def test_property_dense_alphabet(tok, tiktoken_gpt2, hf_gpt2, text):
    # A small alphabet makes contractions, whitespace runs and near-special strings common.
    ids = tok.encode(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text) == hf_gpt2.encode(text).ids
    assert tok.encode(text, allowed_special="all") == tiktoken_gpt2.encode(text, allowed_special="all")
    assert tok.decode(ids) == text


def test_from_files_both_layouts(tmp_path, tok):
    encoder, vocab_bpe = bundled_gpt2_files()
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copy(encoder, hf_dir / "vocab.json")
    shutil.copy(vocab_bpe, hf_dir / "merges.txt")
    openai_dir = tmp_path / "openai"
    openai_dir.mkdir()
    shutil.copy(encoder, openai_dir / "encoder.json")
    shutil.copy(vocab_bpe, openai_dir / "vocab.bpe")
    text = SAMPLES[2] + SAMPLES[7]
    for d in (hf_dir, openai_dir):
        assert Tokenizer.from_pretrained(d).encode(text) == tok.encode(text)
    assert Tokenizer.from_files(hf_dir / "vocab.json", hf_dir / "merges.txt").encode(text) == tok.encode(text)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"vocab\.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no such file"):
        Tokenizer.from_pretrained(tmp_path / "missing" / "dir")
    # A hub id with an empty cache and no network allowed: the message says how to fix it.
    with pytest.raises(ModelNotFoundError, match="local directory"):
        Tokenizer.from_pretrained("gpt2", cache_dir=tmp_path / "cache", local_files_only=True)


def test_from_pretrained_hub_cache(tmp_path, tok):
    """A hub repo already in the huggingface_hub cache loads through the real hub code path, offline."""
    encoder, vocab_bpe = bundled_gpt2_files()
    commit = "0" * 40
    repo = tmp_path / "models--openai-community--gpt2"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copy(encoder, snap / "vocab.json")
    shutil.copy(vocab_bpe, snap / "merges.txt")
    loaded = Tokenizer.from_pretrained("gpt2", cache_dir=tmp_path, local_files_only=True)
    assert loaded.encode("hello world") == [31373, 995]


def test_bad_vocab_files(tmp_path):
    (tmp_path / "vocab.json").write_text("not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
    vocab = {c: i for i, c in enumerate("abc")}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="single-byte"):
        Tokenizer.from_pretrained(tmp_path)


def test_cache_is_bounded(tok, monkeypatch):
    import gpt2lite.tokenizers.bpe as module

    fresh = Tokenizer.gpt2()
    monkeypatch.setattr(module, "_CACHE_LIMIT", 50)
    words = " ".join(f"w{i}x" for i in range(500))
    assert fresh.encode(words) == tok.encode(words)
    assert len(fresh._cache) <= 50


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab \n\r\t.'é😀中文，。1\u3000")), max_size=30), max_size=8))
def test_encode_stream_equals_whole_text(tok, pieces):
    assert [t for ids in tok.encode_stream(pieces) for t in ids] == tok.encode("".join(pieces))


@functools.cache
def _byte_level_hf():
    """A small byte-level BPE trained by tokenizers on this alphabet's text, wrapped as an HFTokenizer."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from gpt2lite import HFTokenizer

    inner = RustTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    inner.train_from_iterator(["ab ba\n\naab é中 ab.\r\n\t b\u3000a"] * 20, trainer)
    return HFTokenizer(inner)


def _reference_cut(text: str) -> int:
    """Where HFTokenizer.split_stream cuts a text it holds: after the last line end before a non-space (0: none)."""
    return max((i + 1 for i in range(len(text) - 1) if text[i] == "\n" and not text[i + 1].isspace()), default=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab \n\r\t\u2028\u3000\x85.é中")), max_size=30), max_size=8))
def test_hf_split_stream_cuts_where_a_line_starts_a_word(pieces):
    """The fast search (str.rfind) makes the cuts of the per-character definition, and tokenizers' ids of the whole."""
    tok = _byte_level_hf()
    inner = tok._tok
    expected, carry = [], ""
    for piece in pieces:
        text = carry + piece
        cut = _reference_cut(text)
        expected += [text[:cut]] if cut else []
        carry = text[cut:]
    expected += [carry] if carry else []
    assert list(tok.split_stream(pieces)) == expected
    whole = "".join(pieces)
    assert [t for ids in tok.encode_stream(pieces) for t in ids] == inner.encode(whole).ids


def _random_unicode(rng: random.Random, n: int) -> str:
    """A string of ``n`` code points from everywhere in Unicode, weighted towards the commonly used planes."""
    out = []
    for _ in range(n):
        pick = rng.random()
        if pick < 0.3:
            out.append(chr(rng.choice([rng.randrange(32, 127), 32, 10, 39])))  # ASCII, spaces, apostrophes
        elif pick < 0.7:
            out.append(chr(rng.randrange(0xA0, 0x3000)))  # Latin to CJK punctuation: letters, marks, digits
        else:
            c = rng.randrange(0x3000, 0x110000)
            out.append(chr(c if not 0xD800 <= c < 0xE000 else 0x4E00))  # anything, surrogates excluded
    return "".join(out)


def test_fuzz_against_tiktoken(tok, tiktoken_gpt2):
    """3,000 random Unicode strings: equal ids, except where a code point is classified differently.

    tiktoken's Rust regex and Python's `regex` carry Unicode tables of different
    versions; a code point that one calls a letter, number or space and the other
    does not is split differently. Such code points are found by probing each in
    a few contexts; replacing them must then make the whole string agree.
    """
    rng = random.Random(20261125)
    strings = [_random_unicode(rng, rng.randint(1, 40)) for _ in range(3000)]
    probes = ("a{}b", " {}", "1{}2", "{} ", "\n{}\n", "'{}", "{}{}")

    def classified_differently(c: str) -> bool:
        return any(tok.encode(p.format(c, c)) != tiktoken_gpt2.encode_ordinary(p.format(c, c)) for p in probes)

    differing = [s for s in strings if tok.encode(s) != tiktoken_gpt2.encode_ordinary(s)]
    odd_code_points = set()
    for s in differing:
        suspects = {c for c in s if classified_differently(c)}
        assert suspects, f"{s!r} differs from tiktoken with no code point classified differently"
        odd_code_points |= suspects
        cleaned = "".join("x" if c in suspects else c for c in s)
        assert tok.encode(cleaned) == tiktoken_gpt2.encode_ordinary(cleaned), s
    assert len(differing) <= 0.05 * len(strings), (len(differing), sorted(map(ord, odd_code_points))[:20])
    for s in strings:
        assert tok.decode(tok.encode(s)) == s
