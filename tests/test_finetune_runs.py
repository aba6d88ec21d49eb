"""Fine-tuning as a careful user runs it: safe output folders, resume from the folder alone, records of the
run (metrics.jsonl, best/, early stopping, samples, loss.png, TensorBoard), documents per row, instruction
data against transformers' masked loss, and trained BPE vocabularies read by transformers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2lite import (
    GPT2,
    GPT2Config,
    Tokenizer,
    TrainConfig,
    load_instructions,
    load_tokenizer,
    prepare_data,
    train,
    train_bpe,
)
from gpt2lite.cli import main
from gpt2lite.training.objectives import InstructionTuning

QUIET = dict(progress=False, eval_interval=0, save_interval=0)
TINY_RUN = ["--steps", "4", "--batch-size", "2", "--block-size", "32", "--warmup-steps", "1", "--device", "cpu"]


def python_docs(n: int) -> list[str]:
    """Real prose: the documentation topics that ship with Python."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)][:n]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(python_docs(40))[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory):
    return prepare_data(corpus, tmp_path_factory.mktemp("data"))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


# safe runs ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rerun_into_a_used_out_is_refused_and_changes_nothing(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "--data", str(corpus), "--out", str(out), "--preset", "tiny", *TINY_RUN]
    assert main(argv) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main([*argv, "--steps", "6", "--lr", "1e-3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(out) == before
    # The library refuses too, before it writes anything.
    with pytest.raises(FileExistsError, match="holds a training run"):
        train(GPT2(GPT2Config.from_preset("tiny")), prepare_data(corpus, tmp_path / "d"), out,
              TrainConfig(steps=1, **QUIET))
    assert snapshot(out) == before
    # --overwrite replaces the run: a fresh metrics.jsonl with only the new run's steps.
    assert main([*argv, "--steps", "2", "--overwrite"]) == 0
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert json.loads((out / "run.json").read_text())["preset"] == "tiny"


@pytest.mark.slow
def test_resume_without_model_continues_the_checkpoint_model(tiny_dir, corpus, tmp_path, monkeypatch):
    """--resume takes model, tokenizer and data settings from the run folder: the --model folder can be gone."""
    import shutil

    from gpt2lite.training import trainer

    model_dir = shutil.copytree(tiny_dir, tmp_path / "base")
    common = ["--data", str(corpus), "--steps", "6", "--batch-size", "2", "--block-size", "32",
              "--warmup-steps", "1", "--save-interval", "3", "--eval-interval", "3", "--device", "cpu"]
    whole = tmp_path / "whole"
    assert main(["finetune", "--model", str(model_dir), "--out", str(whole), *common]) == 0

    calls = {"n": 0}
    real_step = trainer._Run.step

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 4:  # after the checkpoint at step 3
            raise KeyboardInterrupt
        return real_step(self)

    split = tmp_path / "split"
    monkeypatch.setattr(trainer._Run, "step", interrupted)
    assert main(["finetune", "--model", str(model_dir), "--out", str(split), *common]) == 130
    monkeypatch.setattr(trainer._Run, "step", real_step)
    shutil.rmtree(model_dir)  # the resumed run must not need it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nor the hub
    assert main(["finetune", "--out", str(split), "--resume"]) == 0
    a = GPT2.from_pretrained(whole / "final").state_dict()
    b = GPT2.from_pretrained(split / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in metrics(split)] == list(range(1, 7))  # one story, no repeated steps


@pytest.mark.slow
def test_resume_refuses_flags_that_disagree(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--data", str(corpus), "--out", str(out), "--preset", "tiny", *TINY_RUN]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(["finetune", "--out", str(out), "--resume", "--lr", "0.5", "--preset", "tiny", "--steps", "5"]) == 1
    err = capsys.readouterr().err
    assert "--lr 0.5" in err and "disagree" in err and "--preset" not in err.split("disagree")[1]
    assert snapshot(out) == before
    assert main(["finetune", "--out", str(tmp_path / "empty"), "--resume"]) == 1
    assert "nothing to resume" in capsys.readouterr().err


# records of a run -------------------------------------------------------------------------------


@pytest.mark.slow
def test_metrics_best_and_plot(data, tmp_path):
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_preset("tiny"))
    out = tmp_path / "run"
    config = TrainConfig(steps=12, batch_size=4, block_size=32, lr=3e-2, min_lr=3e-2, warmup_steps=1,
                         eval_interval=2, eval_batches=2, save_interval=0, progress=False)
    result = train(model, data, out, config)
    lines = metrics(out)
    assert [m["step"] for m in lines] == list(range(1, 13))
    assert all({"train_loss", "lr", "tokens_per_s", "time"} <= m.keys() for m in lines)
    vals = {m["step"]: m["val_loss"] for m in lines if "val_loss" in m}
    assert sorted(vals) == [2, 4, 6, 8, 10, 12] and vals == dict(result.val_losses)
    assert result.best_step == min(vals, key=vals.get)
    best = GPT2.from_pretrained(out / "best")
    from gpt2lite.training.objectives import LanguageModeling

    again = LanguageModeling(data).evaluate(best, 32, 2, 4)["loss"]
    assert again == pytest.approx(vals[result.best_step], rel=1e-5)
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and result.plot == out / "loss.png"


@pytest.mark.slow
def test_early_stopping_stops(data, tmp_path):
    # A learning rate too small to move any fp32 weight: validation never improves after the first evaluation.
    torch.manual_seed(0)
    config = TrainConfig(steps=50, batch_size=2, block_size=32, lr=1e-30, min_lr=1e-30, warmup_steps=0,
                         eval_interval=1, eval_batches=1, save_interval=0, early_stopping=2, progress=False)
    result = train(GPT2(GPT2Config.from_preset("tiny")), data, tmp_path / "run", config)
    assert result.stopped_early and len(result.losses) == 3 and result.best_step == 1
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3]


@pytest.mark.slow
def test_samples_and_tensorboard(corpus, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(["finetune", "--data", str(corpus), "--out", str(out), "--preset", "tiny", *TINY_RUN,
                 "--sample-every", "2", "--sample-prompt", "The", "--sample-tokens", "5", "--tensorboard",
                 "--peak-flops", "1e12"]) == 0
    samples = {m["step"]: m["sample"] for m in metrics(out) if "sample" in m}
    assert sorted(samples) == [2, 4] and all(isinstance(s, str) for s in samples.values())
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("mfu")] == pytest.approx([m["mfu"] for m in metrics(out)])


# data ---------------------------------------------------------------------------------------------


def test_jsonl_and_csv_corpora_are_their_documents_each_ended(tmp_path):
    import csv

    from oracles import tiktoken_gpt2

    docs = ["First document.\nIt has two lines.", "Second, with \"quotes\", and commas.", "Third: é 世界 🙂"]
    enc = tiktoken_gpt2()
    expected = [t for d in docs for t in (*enc.encode_ordinary(d), enc.eot_token)]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    assert prepare_data(jsonl, tmp_path / "a", text_column="body").tokens.tolist() == expected
    table = tmp_path / "corpus.csv"
    with open(table, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "source"])
        writer.writerows([d, "x"] for d in docs)
    assert prepare_data(table, tmp_path / "b").tokens.tolist() == expected
    with pytest.raises(ValueError, match=r"line 1 has no 'text' column .*--text-column"):
        prepare_data(jsonl, tmp_path / "c")


def test_sft_loss_equals_transformers_masked_loss(hf_tiny, tiny_dir, tmp_path):
    """Packed examples (segment ids) with prompt labels -100 give transformers' loss, example by example."""
    tok = Tokenizer.gpt2()
    rows = [{"prompt": "Q: What does len() return?\nA:", "completion": " The number of items."},
            {"prompt": "Q: Name a mutable type.\nA:", "completion": " list"},
            {"prompt": "", "completion": "An example with no prompt."},
            {"prompt": "Q: What is a tuple?\nA:", "completion": " An immutable sequence of values."}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = load_instructions(path, tok, val_fraction=0.25)
    model = GPT2.from_pretrained(tiny_dir)
    block = 64
    ids, _, segments = data.batch("train", range(len(data.train)), block)
    assert ids.shape[0] == 1 and set(segments[0].tolist()) == {-1, 0, 1, 2}  # three examples share one row
    ours = InstructionTuning(data).loss(lambda x, **kw: model(x, **kw), torch.arange(len(data.train)), block,
                                        torch.device("cpu"))
    total, count = 0.0, 0
    for prompt, completion in data.train:
        x = torch.tensor([prompt + completion])
        hf_labels = x.clone()
        hf_labels[0, : len(prompt)] = -100
        n = len(completion)
        with torch.no_grad():
            total += hf_tiny(x, labels=hf_labels).loss.item() * n
        count += n
    assert ours.item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.slow
def test_cli_sft_with_prompts_and_chats(tmp_path, capsys):
    rows = [{"prompt": f"Q: What is {n} plus {n}?\nA:", "completion": f" {2 * n}"} for n in range(12)]
    rows += [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
             for w in ("yes", "no", "maybe", "later")]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["finetune", "--task", "sft", "--data", str(path), "--out", str(out), "--preset", "tiny",
                 *TINY_RUN, "--eval-interval", "2"]) == 0
    assert "validation loss" in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").is_file() and (out / "best" / "model.safetensors").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n', encoding="utf-8")
    assert main(["finetune", "--task", "sft", "--data", str(bad), "--out", str(tmp_path / "r2"), "--preset",
                 "tiny", *TINY_RUN]) == 1
    err = capsys.readouterr().err
    assert "line 1" in err and "'completion'" in err and err.count("\n") == 1


# own vocabularies -----------------------------------------------------------------------------------


def test_trained_bpe_round_trips_and_loads_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    docs = python_docs(79)
    tok = train_bpe(docs[:60], 1200)
    assert tok.n_vocab == 1200 and tok.eot_token == 1199
    tok.save(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "def f(x):\n    return x ** 2  # héllo 世界 🙂\n\n  it's   spaced\t" + docs[70][:2000]  # held-out text
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert hf.encode(text) == ids and hf.decode(ids) == text
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == tok.eot_token
    assert load_tokenizer(tmp_path / "tok", tok.n_vocab).encode(text) == ids


@pytest.mark.slow
def test_cli_train_tokenizer_then_finetune_from_scratch(corpus, tmp_path, capsys):
    from transformers import AutoTokenizer

    vocab = tmp_path / "vocab"
    assert main(["train-tokenizer", "--data", str(corpus), "--vocab-size", "600", "--out", str(vocab)]) == 0
    assert "600 tokens" in capsys.readouterr().out
    assert main(["train-tokenizer", "--data", str(corpus), "--vocab-size", "600", "--out", str(vocab)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["finetune", "--data", str(corpus), "--out", str(out), "--preset", "tiny", "--tokenizer", str(vocab),
                 *TINY_RUN]) == 0
    final = out / "final"
    assert GPT2.from_pretrained(final).config.vocab_size == 600
    text = corpus.read_text(encoding="utf-8")[:500]
    assert AutoTokenizer.from_pretrained(final).encode(text) == load_tokenizer(vocab, 600).encode(text)


# the hub -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unreachable_hub_fails_fast_with_one_line(tmp_path):
    """No retries when the hub cannot be reached: one line naming the problem and the fix."""
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # port 9: refused
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-m", "gpt2lite", "generate", "hi", "--model", "gpt2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "could not be reached" in proc.stderr and "local" in proc.stderr


# what a resumed run keeps, and how a run says where it is ----------------------------------------------------


class _Stop(Exception):
    """Raised by a stand-in for train(): the settings a command would train with, without training."""


def _settings_of(argv, monkeypatch):
    """The TrainConfig and recorded settings ``gpt2lite finetune argv`` would train with."""
    from gpt2lite.training import trainer

    seen = {}

    def capture(model, data, out, config, **kwargs):
        seen.update(config=config, settings=kwargs["settings"])
        raise _Stop

    monkeypatch.setattr(trainer, "train", capture)
    with pytest.raises(_Stop):
        main(argv)
    monkeypatch.undo()
    return seen["config"], seen["settings"]


@pytest.mark.slow
def test_resume_keeps_samples_tensorboard_and_early_stopping(corpus, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    start = ["finetune", "--data", str(corpus), "--out", str(out), "--preset", "tiny", "--steps", "20",
             "--batch-size", "2", "--block-size", "16", "--device", "cpu", "--eval-interval", "20"]
    records = ["--sample-every", "2", "--sample-prompt", "The", "--sample-tokens", "3", "--tensorboard",
               "--early-stopping", "7"]
    assert main([*start, *records]) == 0
    config, _ = _settings_of(["finetune", "--out", str(out), "--resume", "--steps", "40"], monkeypatch)
    assert (config.sample_every, config.sample_prompt, config.sample_tokens) == (2, "The", 3)  # were 0, "", 40
    assert config.tensorboard is True and config.early_stopping == 7  # were False and 0
    assert config.warmup_steps == 1  # 5% of the 20 steps it started with, not of 40: the schedule goes on
    config, _ = _settings_of(["finetune", "--out", str(out), "--resume", "--steps", "40", "--sample-every", "4",
                              "--early-stopping", "0"], monkeypatch)
    assert (config.sample_every, config.early_stopping, config.tensorboard) == (4, 0, True)  # flags given again win
    # And really: samples go on, at the interval this resume sets, which run.json keeps for the next resume.
    assert main(["finetune", "--out", str(out), "--resume", "--steps", "22", "--sample-every", "1"]) == 0
    assert [m["step"] for m in metrics(out) if "sample" in m][-3:] == [20, 21, 22]
    assert json.loads((out / "run.json").read_text())["steps"] == 22
    config, _ = _settings_of(["finetune", "--out", str(out), "--resume", "--steps", "30"], monkeypatch)
    assert config.sample_every == 1 and config.tensorboard is True


@pytest.mark.slow
def test_finetune_tokenizes_raw_text_in_worker_processes(corpus, tmp_path):
    """--workers 2: the run's data holds the tokens one process makes (GPT-2's tokenizer on the whole text)."""
    from gpt2lite import TokenData, Tokenizer

    out = tmp_path / "run"
    assert main(["finetune", "--data", str(corpus), "--out", str(out), "--preset", "tiny", "--workers", "2",
                 *TINY_RUN]) == 0
    data = TokenData.open(out / "data")
    expected = [*Tokenizer.gpt2().encode(corpus.read_text(encoding="utf-8")), 50256]
    assert data.tokens.tolist() == expected


def test_warmup_defaults_to_a_fraction_of_the_steps(corpus, tmp_path, monkeypatch):
    base = ["finetune", "--data", str(corpus), "--preset", "tiny", "--device", "cpu"]
    for steps, warmup in (("100", 5), ("1000", 50), ("10", 1)):
        config, settings = _settings_of([*base, "--out", str(tmp_path / steps), "--steps", steps], monkeypatch)
        assert config.warmup_steps == settings["warmup_steps"] == warmup  # a 100-step run was all warm-up (100)
    config, _ = _settings_of([*base, "--out", str(tmp_path / "given"), "--steps", "100", "--warmup-steps", "30"],
                             monkeypatch)
    assert config.warmup_steps == 30


def test_a_run_stopped_before_its_first_checkpoint_says_how_to_start_again(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--data", str(corpus), "--out", str(out), "--preset", "tiny", *TINY_RUN]) == 0
    (out / "checkpoint.pt").unlink()  # as a run stopped (Ctrl-C) before it saved one
    capsys.readouterr()
    assert main(["finetune", "--out", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stopped before its first checkpoint" in err and "--overwrite" in err
    assert "run.json" in err


def test_the_progress_bar_says_what_the_run_is_doing(data, tmp_path, monkeypatch):
    import io

    import tqdm.auto

    said = []

    class Recorded(tqdm.std.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, file=io.StringIO(), **kwargs)

        def set_description_str(self, desc=None, refresh=True):
            said.append(desc)
            super().set_description_str(desc, refresh)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    model = GPT2(GPT2Config.from_preset("tiny"))
    config = TrainConfig(steps=2, batch_size=2, block_size=16, warmup_steps=1, eval_interval=2, save_interval=2,
                         sample_every=1, sample_tokens=2, eval_batches=1)
    train(model, data, tmp_path / "run", config, tokenizer=Tokenizer.gpt2())
    assert said == ["sample", "train", "evaluate", "sample", "save", "train"]
