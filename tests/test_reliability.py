"""Hostile and careless input: each case here was reproduced against the earlier code and fails there."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2lite import (
    GPT2,
    CheckpointError,
    GPT2Config,
    NonFiniteError,
    TextGenerator,
    Tokenizer,
    TrainConfig,
    generate,
    perplexity,
    prepare_data,
    train,
)
from gpt2lite.cli import main
from gpt2lite.training import data as data_module

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 6


@pytest.fixture
def small_run(tmp_path):
    """A tiny model from scratch, its data and a finished 4-step run with a checkpoint."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64))
    data = prepare_data([TEXT], tmp_path / "data")
    config = TrainConfig(steps=4, batch_size=2, block_size=16, warmup_steps=1, save_interval=2, eval_interval=0,
                         eval_batches=1, progress=False)
    train(model, data, tmp_path / "run", config)
    return model, data, config, tmp_path / "run"


# security ---------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs code: it would create a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_resume_never_unpickles_code(small_run, tmp_path):
    model, data, config, run = small_run
    marker = tmp_path / "pwned"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["losses"] = [_Payload(str(marker))]
    torch.save(state, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        train(model, data, run, config.__class__(**{**config.__dict__, "steps": 6}), resume=True)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing key", "not a dict"])
def test_damaged_checkpoint_is_one_clear_error(small_run, damage):
    model, data, config, run = small_run
    path = run / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "missing key":
        state = torch.load(path, weights_only=True)
        del state["optimizer"]
        torch.save(state, path)
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="checkpoint"):
        train(model, data, run, config, resume=True)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_shard_index_cannot_name_files_outside_the_model(tiny_dir, tmp_path, name):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    index = {"metadata": {}, "weight_map": {"wte.weight": name}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="refusing"):
        GPT2.from_pretrained(tmp_path)


# silent wrong results -------------------------------------------------------------------------


def test_bare_file_uses_the_config_beside_it(tiny_dir, hf_tiny, tmp_path):
    """The tiny checkpoint has 4 heads of 16; a guess from n_embd // 64 would say 1 head."""
    model = GPT2.from_pretrained(tiny_dir / "model.safetensors")
    assert model.config.n_head == 4
    ids = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - hf_tiny(ids).logits).abs().max() < 1e-4
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"number of attention heads is unknown.*config="):
        GPT2.from_pretrained(lone)
    assert GPT2.from_pretrained(lone, config=model.config).config.n_head == 4


@pytest.mark.parametrize("bad", [dict(lr=math.inf), dict(weight_decay=math.nan), dict(min_lr=math.nan),
                                 dict(grad_clip=math.inf), dict(betas=(0.9, math.nan)), dict(seed=2**64)])
def test_non_finite_hyperparameters_are_rejected(bad):
    with pytest.raises(ValueError, match="must be"):
        TrainConfig(**bad)


def test_diverging_run_stops_and_keeps_the_good_checkpoint(small_run, tmp_path):
    model, data, config, run = small_run
    before = (run / "checkpoint.pt").read_bytes()
    diverging = config.__class__(**{**config.__dict__, "steps": 60, "lr": 1e4, "min_lr": 1e4, "save_interval": 1,
                                    "grad_clip": 0})
    with pytest.raises(NonFiniteError, match="diverged"):
        train(model, data, tmp_path / "run2", diverging)
    # The second run saved only finite checkpoints (if any), and no final model.
    if (tmp_path / "run2" / "checkpoint.pt").exists():
        state = torch.load(tmp_path / "run2" / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (tmp_path / "run2" / "final").exists()
    assert (run / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize(("change", "named"), [(dict(lr=1e-3), "lr"), (dict(batch_size=3), "batch_size"),
                                               (dict(block_size=8), "block_size"), (dict(seed=1), "seed")])
def test_resume_with_other_settings_is_refused(small_run, change, named):
    model, data, config, run = small_run
    changed = config.__class__(**{**config.__dict__, "steps": 6, **change})
    with pytest.raises(ValueError, match=rf"other settings \({named}: "):
        train(model, data, run, changed, resume=True)


def test_resume_on_other_data_is_refused(small_run, tmp_path):
    model, _, config, run = small_run
    other = prepare_data([TEXT.replace("fox", "cat")], tmp_path / "other")
    with pytest.raises(ValueError, match="other data"):
        train(model, other, run, config.__class__(**{**config.__dict__, "steps": 6}), resume=True)


@pytest.fixture
def nan_model(tiny_dir, tmp_path):
    state = load_file(tiny_dir / "model.safetensors")
    state["h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    return GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.8, top_p=0.9, seed=0)])
def test_non_finite_weights_are_named_not_decoded(nan_model, sampling):
    with pytest.raises(NonFiniteError, match="non-finite logits"):
        generate(nan_model, [[1, 2, 3]], max_new_tokens=5, **sampling)


def test_non_finite_weights_in_perplexity(nan_model):
    with pytest.raises(NonFiniteError, match="non-finite"):
        perplexity(nan_model, list(range(1, 40)))


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-40, 1e-30])
def test_tiny_temperatures_decode_greedily(tiny, temperature):
    ids = [[5, 6, 7, 8]]
    greedy = generate(tiny, ids, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert torch.equal(generate(tiny, ids, max_new_tokens=12, temperature=temperature, ignore_eos=True, seed=0),
                       greedy)


def test_decode_rejects_non_integer_ids():
    tok = Tokenizer.gpt2()
    for bad in ([31373.9, 995.5], "123", b"12", [31373, "995"], torch.tensor([1.0, 2.0])):
        with pytest.raises(TypeError, match="integer"):
            tok.decode(bad)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        tok.decode(torch.tensor([[1, 2], [3, 4]]))
    assert tok.decode(torch.tensor([31373, 995])) == tok.decode(np.array([31373, 995])) == "hello world"


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16", "utf-16-le", "binary"])
def test_non_utf8_training_text_is_named(tmp_path, encoding):
    path = tmp_path / "corpus.txt"
    text = "Café crème, déjà vu. " * 50
    path.write_bytes(bytes(range(256)) * 20 if encoding == "binary" else text.encode(encoding))
    with pytest.raises(ValueError, match=r"corpus\.txt.*(not UTF-8|NUL)"):
        prepare_data(path, tmp_path / "data")
    if encoding == "latin-1":  # asked for explicitly, replacement is allowed
        assert len(prepare_data(path, tmp_path / "data", errors="replace").tokens) > 8


# clear errors, no tracebacks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["generate", "x", "--device", "foo"], "is not a device"),
        (["generate", "x", "--seed", str(2**64)], "seed must be below 2\\*\\*64"),
        (["generate", "x", "--temperature", "nan"], "temperature"),
        (["perplexity", "-", "--stride", "0"], "stride must be"),
        (["perplexity", "-", "--max-length", "0"], "--max-length must be"),
        (["finetune", "--data", "x", "--out", "y", "--lr", "inf"], "lr must be a finite number"),
        (["finetune", "--data", "x", "--out", "y", "--weight-decay", "nan"], "weight_decay must be a finite"),
    ],
)
def test_cli_bad_values_are_one_line(argv, match, tiny_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("some text to score " * 20))
    argv = [*argv, "--model", str(tiny_dir)] if argv[0] != "finetune" else argv
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert __import__("re").search(match, err), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cli_cuda_on_a_cpu_only_torch(tiny_dir, capsys):
    assert main(["generate", "x", "--model", str(tiny_dir), "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and err.count("\n") == 1


def test_cli_config_that_is_a_json_list(tiny_dir, tmp_path, capsys):
    (tmp_path / "config.json").write_text("[1, 2, 3]")
    (tmp_path / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    assert main(["generate", "x", "--model", str(tmp_path), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "JSON object" in err and err.count("\n") == 1


def test_cli_perplexity_of_a_latin1_file(tiny_dir, tmp_path, capsys):
    (tmp_path / "t.txt").write_bytes("Café déjà vu".encode("latin-1"))
    assert main(["perplexity", str(tmp_path / "t.txt"), "--model", str(tiny_dir)]) == 1
    err = capsys.readouterr().err
    assert "not UTF-8" in err and "t.txt" in err and err.count("\n") == 1


def test_generation_input_errors(tiny):
    with pytest.raises(ValueError, match=r"only 0 \(padding\) and 1"):
        generate(tiny, [[1, 2, 3]], attention_mask=torch.tensor([[0.5, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="stop: sequences hold token ids"):
        generate(tiny, [[1, 2]], stop=[[-1, 5]])
    with pytest.raises(ValueError, match="seed must be below"):
        generate(tiny, [[1, 2]], seed=2**64)
    with pytest.raises(ValueError, match="max_length must be"):
        perplexity(tiny, list(range(50)), max_length=0)
    with pytest.raises(ValueError, match="stride must be"):
        perplexity(tiny, list(range(50)), stride=0)
    with pytest.raises(ValueError, match="only 0"):
        tiny(torch.tensor([[1, 2]]), attention_mask=torch.tensor([[0.5, 1.0]]))


@pytest.mark.parametrize("kind", ["int32", "mixed"])
def test_checkpoint_dtypes(tiny_dir, tmp_path, kind):
    state = load_file(tiny_dir / "model.safetensors")
    if kind == "int32":
        state["h.1.ln_2.bias"] = state["h.1.ln_2.bias"].to(torch.int32)
        match = r"'h\.1\.ln_2\.bias' holds I32"
    else:
        state["h.0.attn.c_proj.weight"] = state["h.0.attn.c_proj.weight"].half()
        match = r"'h\.0\.attn\.c_proj\.weight' is F16 while wte\.weight is F32"
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=match):
        GPT2.from_pretrained(tmp_path)
    if kind == "mixed":
        assert GPT2.from_pretrained(tmp_path, dtype="float32").dtype == torch.float32


def test_full_disk_during_checkpoint_keeps_the_old_one(small_run, monkeypatch):
    model, data, config, run = small_run
    before = (run / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(10)}, f)  # some bytes land, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(model, data, run, config.__class__(**{**config.__dict__, "steps": 6}), resume=True)
    assert (run / "checkpoint.pt").read_bytes() == before
    names = {p.name for p in run.iterdir()}
    assert {"checkpoint.pt", "final"} <= names and not [n for n in names if ".tmp-" in n]  # no temporary file left


def test_full_disk_during_final_save_leaves_no_partial_file(tiny, tmp_path, monkeypatch):
    import gpt2lite.models.weights as weights

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        tiny.save_pretrained(tmp_path / "final")
    assert list((tmp_path / "final").iterdir()) == []


# Each phase of the command waits at a marker it prints, so the signal lands inside that phase
# whatever the machine's load (a fixed delay could land before Python even runs our code).
_PAUSED = """
import sys, time
import gpt2lite.cli as cli

def pause(name, real):
    def paused(*args, **kwargs):
        print("at " + name, file=sys.stderr, flush=True)
        # Ctrl-C arrives here. Short sleeps in a loop: a signal that lands just before one blocking
        # call begins is still handled at the next turn (one 60 s wait could sleep through it).
        for _ in range(600):
            time.sleep(0.1)
        return real(*args, **kwargs)
    return paused

phase = sys.argv[1]
if phase == "parse":
    cli.build_parser = pause(phase, cli.build_parser)
elif phase == "load":
    import gpt2lite.cli.generate as command
    command.load_text_generator = pause(phase, command.load_text_generator)
else:
    from gpt2lite.text.generator import TextGenerator
    TextGenerator.stream = pause(phase, TextGenerator.stream)
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["parse", "load", "generate"])
def test_ctrl_c_is_quiet_in_every_phase(tiny_dir, phase):
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSED, phase, "generate", "hello", "--model", str(tiny_dir), "--max-new-tokens",
         "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr.readline().strip() == f"at {phase}"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert proc.returncode == 130 and err.strip() == "gpt2lite: interrupted", (proc.returncode, err)


# bounded memory and time ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["crlf", "cjk", "single line", "trailing spaces"])
def test_prepare_data_streams_in_bounded_pieces(tmp_path, monkeypatch, shape):
    line = {"crlf": "Some words here.\r\n", "cjk": "中文的句子，还有标点。", "single line": "word and word ",
            "trailing spaces": "a line with a trailing space \n"}[shape]
    text = line * 20_000
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    monkeypatch.setattr(data_module, "_BLOCK_CHARS", 10_000)
    seen: list[int] = []
    encode = Tokenizer.encode

    def spy(self, s, **kwargs):
        seen.append(len(s))
        return encode(self, s, **kwargs)

    monkeypatch.setattr(Tokenizer, "encode", spy)
    data = prepare_data(path, tmp_path / "data")
    monkeypatch.setattr(Tokenizer, "encode", encode)
    assert max(seen) <= 20_000  # a block and what was held over, never the whole file
    assert data.tokens[:-1].tolist() == Tokenizer.gpt2().encode(text)


@pytest.mark.slow
def test_tokenizer_cache_is_bounded_by_size():
    tok = Tokenizer.gpt2()
    for i in range(20):
        tok.encode(chr(0x4E00 + i) * 10_000)  # 20 words past the per-word bound, 200,000 characters in all
    assert sum(map(len, tok._cache)) < 100_000


def test_long_prompt_is_refused_before_encoding(tiny_dir, monkeypatch):
    gen = TextGenerator.from_pretrained(tiny_dir)
    monkeypatch.setattr(gen.tokenizer, "encode", lambda *a, **k: pytest.fail("the prompt was encoded"))
    t0 = time.process_time()  # CPU time: a loaded machine does not inflate it
    with pytest.raises(ValueError, match="more tokens than fit"):
        gen("x" * 10_000_000, max_new_tokens=5)
    assert time.process_time() - t0 < 1.0


def test_perplexity_batches_windows_and_shows_progress(tiny, capsys):
    ids = torch.randint(0, 50257, (400,), generator=torch.Generator().manual_seed(0))
    one = perplexity(tiny, ids, max_length=32, stride=16, batch_size=1)
    batched = perplexity(tiny, ids, max_length=32, stride=16, batch_size=8, progress=True)
    assert math.isclose(one, batched, rel_tol=1e-5)
    assert "perplexity" in capsys.readouterr().err

