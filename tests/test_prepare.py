"""Token shards: parallel preparation against tiktoken, resume after a stop, training from shards against a memmap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2lite import GPT2, GPT2Config, TokenData, Tokenizer, TrainConfig, prepare_data, train
from gpt2lite.cli import main
from gpt2lite.tokenizers.char import CharTokenizer
from gpt2lite.tokenizers.files import bundled_gpt2_files
from gpt2lite.training import data as data_module
from oracles import tiktoken_gpt2

MIXED = "日本語のテキスト, ελληνικά, emoji 👩‍👩‍👧 and It's we've   \n\n\t spaces 3.14159 "


def documents() -> list[str]:
    """Python's documentation topics (English prose and code), with non-ASCII lines spliced in."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    return ["\n\n".join(texts[i : i + 12]) + MIXED * (i % 5) for i in range(0, 96, 12)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(documents()):
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def expected() -> list[int]:
    """tiktoken's ids of each document, each followed by <|endoftext|>."""
    enc = tiktoken_gpt2()
    return [t for text in documents() for t in [*enc.encode_ordinary(text), 50256]]


@pytest.fixture
def small_units(monkeypatch):
    """Pieces and units of a few KB, so that a small corpus makes many of them (and many shards)."""
    monkeypatch.setattr(data_module, "_BLOCK_CHARS", 3000)
    monkeypatch.setattr(data_module, "_UNIT_CHARS", 5000)


@pytest.mark.parametrize("workers", [1, 2])
def test_prepared_shards_equal_tiktoken(corpus, expected, small_units, tmp_path, workers):
    data = prepare_data(corpus, tmp_path / "shards", workers=workers, shard_tokens=1000)
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["dtype"] == "uint16" and len(index["shards"]) == -(-len(expected) // 1000) > 10
    assert all(s["tokens"] == 1000 for s in index["shards"][:-1])
    assert data.tokens.tolist() == expected
    assert data.train.tolist() + data.val.tolist() == expected
    assert data.val[5:2000].tolist() == expected[data.split + 5 : data.split + 2000]  # across shards


def test_prepare_resumes_after_a_stop(corpus, expected, small_units, tmp_path):
    out = tmp_path / "shards"

    def stop(tokens: int) -> None:
        if tokens > 4500:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_data(corpus, out, workers=2, shard_tokens=1000, on_tokens=stop)
    progress = json.loads((out / "progress.json").read_text())
    assert progress["shards"] >= 3 and not (out / "index.json").exists()
    stamp = (out / "shard-00000.bin").stat().st_mtime_ns

    class Counting(Tokenizer):
        chars = 0

        def encode(self, text, **kwargs):
            Counting.chars += len(text)
            return super().encode(text, **kwargs)

    data = prepare_data(corpus, out, tokenizer=Counting.from_files(*bundled_gpt2_files()), shard_tokens=1000)
    assert data.tokens.tolist() == expected
    assert (out / "shard-00000.bin").stat().st_mtime_ns == stamp  # kept, not written again
    total = sum(len(t) for t in documents())
    assert 0 < Counting.chars < total - 10_000  # only the text after the last complete shard was encoded
    assert not (out / "progress.json").exists() and not list(out.glob("tail-*"))


def test_a_vocabulary_past_uint16_gets_uint32(tmp_path):
    text = "".join(chr(0x20000 + i) for i in range(70_000))
    tok = CharTokenizer.from_texts([text])
    data = prepare_data([text], tmp_path / "d", tokenizer=tok)
    assert data.tokens.dtype == np.uint32
    assert data.tokens.tolist() == [*range(70_000), tok.eot_token]  # the sorted characters' ids


def test_training_from_shards_equals_training_from_one_memmap(corpus, expected, small_units, tmp_path):
    """The same seed draws the same windows, many across shard edges: the same losses, step by step."""
    sharded = prepare_data(corpus, tmp_path / "shards", workers=2, shard_tokens=997)
    assert len(sharded.tokens.parts) > 20
    path = tmp_path / "memmap" / "train.bin"  # nanoGPT's layout: the whole stream in one uint16 file
    path.parent.mkdir()
    np.asarray(expected, dtype=np.uint16).tofile(path)
    single = TokenData(path.parent, np.memmap(path, dtype=np.uint16, mode="r"), sharded.split)
    config = TrainConfig(steps=4, batch_size=4, block_size=64, warmup_steps=2, eval_interval=0, eval_batches=1,
                         progress=False, save_interval=0)
    results = []
    for name, data in (("a", sharded), ("b", single)):
        torch.manual_seed(0)
        results.append(train(GPT2(GPT2Config.from_preset("tiny")), data, tmp_path / name, config))
    assert results[0].losses == results[1].losses and len(results[0].losses) == 4
    assert results[0].val_losses == results[1].val_losses


def test_cli_prepare_a_glob_then_train_on_the_shards(corpus, expected, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["prepare", str(corpus / "doc*.txt"), "--out", str(out), "--workers", "2",
                 "--shard-tokens", "4000"]) == 0
    assert f"{len(expected):,} tokens" in capsys.readouterr().out
    assert TokenData.open(out).tokens.tolist() == expected
    run = tmp_path / "run"
    assert main(["finetune", "--data", str(out), "--out", str(run), "--preset", "tiny", "--steps", "2",
                 "--batch-size", "2", "--block-size", "32", "--eval-interval", "0", "--device", "cpu"]) == 0
    assert "validation loss" in capsys.readouterr().out
    # Tokens of another vocabulary are refused, and so is preparing prepared tokens.
    CharTokenizer.from_texts(["abc "]).save(tmp_path / "chars")
    assert main(["finetune", "--data", str(out), "--out", str(tmp_path / "r1"), "--preset", "tiny", "--tokenizer",
                 str(tmp_path / "chars"), "--steps", "1"]) == 1
    assert "another vocabulary" in capsys.readouterr().err
    assert main(["finetune", "--data", str(out), "--out", str(tmp_path / "r2"), "--arch", "gru", "--char",
                 "--steps", "1"]) == 1
    assert "prepared already" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "nothing*.txt"), "--out", str(tmp_path / "x")]) == 1
    assert "no files match" in capsys.readouterr().err


def test_tiktoken_fast_path_gives_the_same_ids_on_held_out_text(corpus, expected, tmp_path, capsys):
    from gpt2lite.tokenizers.fast import TiktokenTokenizer

    fast, pure = TiktokenTokenizer.gpt2(), Tokenizer.gpt2()
    held_out = [*documents(), "<|endoftext|> \ud800 lone surrogate", " " * 300 + "x", "a\u0300\u200d🏳️‍🌈" * 50]
    for text in held_out:
        assert fast.encode(text) == pure.encode(text) == tiktoken_gpt2().encode_ordinary(pure.decode(pure.encode(text)))
    assert fast.encode("hi<|endoftext|>", allowed_special="all") == [5303, 50256]
    assert fast.fingerprint == pure.fingerprint  # the same data either way
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "s"), "--workers", "2", "--fast"]) == 0
    assert TokenData.open(tmp_path / "s").tokens.tolist() == expected
    capsys.readouterr()
    vocab = {bytes([b]): b for b in range(256)} | {b"ab": 300}  # a merge whose token is not 256 + its rank
    with pytest.raises(ValueError, match="laid out as GPT-2's"):
        TiktokenTokenizer(vocab, [(b"a", b"b")], special_tokens={})
