"""The text API and the CLI against transformers' greedy generation decoded by tiktoken."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import oracles
from gpt2lite import TextGenerator
from gpt2lite.cli import main


@pytest.fixture(scope="module")
def gen(tiny_dir):
    return TextGenerator.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def tik():
    return oracles.tiktoken_gpt2()


def hf_greedy_text(hf_model, tik, prompt, n):
    ids = tik.encode_ordinary(prompt) or [50256]
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=50256,
                                eos_token_id=50256)
    new = out[0, len(ids):].tolist()
    if 50256 in new:
        new = new[: new.index(50256)]
    return tik.decode(new)


@pytest.mark.parametrize("prompt", ["Hello, my dog is cute", "日本語 👩‍👩‍👧", ""])
def test_greedy_text_equals_transformers(gen, hf_tiny, tik, prompt):
    assert gen(prompt, max_new_tokens=20, temperature=0) == hf_greedy_text(hf_tiny, tik, prompt, 20)


def test_batch_equals_single_calls(gen):
    prompts = ["A", "A much longer prompt with many more tokens in it", "Short one"]
    batch = gen(prompts, max_new_tokens=12, temperature=0)
    assert batch == [gen(p, max_new_tokens=12, temperature=0) for p in prompts]


def test_stream_pieces_join_to_the_call(gen):
    pieces = list(gen.stream("Once upon a time", max_new_tokens=25, temperature=0))
    assert "".join(pieces) == gen("Once upon a time", max_new_tokens=25, temperature=0)
    assert all(pieces)


def test_stop_strings(gen):
    free = gen("The quick brown fox", max_new_tokens=30, temperature=0)
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    expected = free[: free.find(stop)]
    assert gen("The quick brown fox", max_new_tokens=30, temperature=0, stop=stop) == expected
    assert gen("The quick brown fox", max_new_tokens=30, temperature=0, stop=["\x00", stop]) == expected
    assert "".join(gen.stream("The quick brown fox", max_new_tokens=30, temperature=0, stop=stop)) == expected


def test_seeded_sampling_and_num_return_sequences(gen):
    a = gen(["x", "y"], max_new_tokens=8, seed=3, num_return_sequences=2)
    assert len(a) == 2 and all(len(group) == 2 for group in a)
    assert a == gen(["x", "y"], max_new_tokens=8, seed=3, num_return_sequences=2)


def test_text_api_errors(gen):
    with pytest.raises(TypeError, match="list of str"):
        gen([1, 2])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="top_p"):
        gen.stream("x", top_p=0)
    with pytest.raises(ValueError, match="stop"):
        gen("x", stop=[""])
    with pytest.raises(ValueError, match="context"):
        gen("word " * 100, max_new_tokens=10)


def test_cli_generate_matches_api(gen, tiny_dir, capsys):
    status = main(["generate", "Hello", "--model", str(tiny_dir), "--temperature", "0", "--max-new-tokens", "10",
                   "--device", "cpu"])
    assert status == 0
    assert capsys.readouterr().out == gen("Hello", max_new_tokens=10, temperature=0) + "\n"


@pytest.mark.parametrize(
    ("argv", "status", "match"),
    [
        (["generate", "x", "--top-p", "2"], 1, "--top-p must be in (0, 1]"),
        (["generate", "x", "--model", "/no/such/dir"], 1, "/no/such/dir"),
        (["generate", "x", "--max-new-tokens", "many"], 2, "invalid int value"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_cli_errors_are_one_line(argv, status, match, capsys):
    with pytest.raises(SystemExit) if status == 2 else contextlib.nullcontext() as exc:
        code = main(argv)
    code = exc.value.code if status == 2 else code
    err = capsys.readouterr().err
    assert code == status
    assert match in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_python_m_gpt2lite_reads_stdin(tiny_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "gpt2lite", "generate", "--model", str(tiny_dir), "--temperature", "0",
         "--max-new-tokens", "5", "--device", "cpu"],
        input="Hello", capture_output=True, text=True, timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},  # its kernel-choice cache goes here, not to the real home
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("\n") and len(out.stdout) > 1
