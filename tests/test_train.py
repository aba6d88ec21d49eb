"""Data preparation, training, resume, DDP and perplexity, against transformers and single-process runs."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import transformers

from gpt2lite import GPT2, GPT2Config, TokenData, TrainConfig, perplexity, prepare_data, token_logprobs, train
from gpt2lite.cli import main

QUIET = dict(progress=False, eval_interval=0, save_interval=0)


def real_text(n_chars: int) -> str:
    """English prose: the documentation topics that ship with Python."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:n_chars]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(real_text(60_000), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory):
    return prepare_data(corpus, tmp_path_factory.mktemp("data"))


def no_dropout(config_dir) -> GPT2Config:
    return dataclasses.replace(GPT2Config.from_json_file(config_dir / "config.json"),
                               embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


# data ----------------------------------------------------------------------------------


def test_prepare_data_tokens_and_reuse(corpus, tmp_path):
    from gpt2lite import Tokenizer

    tok = Tokenizer.gpt2()
    d = prepare_data(corpus, tmp_path / "d", val_fraction=0.1)
    expected = [*tok.encode(corpus.read_text(encoding="utf-8")), 50256]
    assert d.tokens.dtype == np.uint16
    assert d.tokens.tolist() == expected
    assert len(d.val) == len(expected) - d.split and abs(len(d.val) / len(expected) - 0.1) < 0.01
    stamp = (tmp_path / "d" / "shard-00000.bin").stat().st_mtime_ns
    again = prepare_data(corpus, tmp_path / "d", val_fraction=0.1)
    assert (tmp_path / "d" / "shard-00000.bin").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert again.tokens.tolist() == expected


def test_prepare_data_folder_and_strings(tmp_path):
    from gpt2lite import Tokenizer

    tok = Tokenizer.gpt2()
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First document. " * 20)
    (folder / "sub" / "b.md").write_text("Second document, 日本語. " * 20)
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    d = prepare_data(folder, tmp_path / "d1")
    first, second = tok.encode("First document. " * 20), tok.encode("Second document, 日本語. " * 20)
    assert d.tokens.tolist() == [*first, 50256, *second, 50256]
    texts = ["one " * 30, "two " * 30]
    d2 = prepare_data(texts, tmp_path / "d2")
    assert d2.tokens.tolist() == [*tok.encode(texts[0]), 50256, *tok.encode(texts[1]), 50256]


def test_prepare_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare_data(tmp_path / "missing.txt", tmp_path / "d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        prepare_data(tmp_path / "empty", tmp_path / "d")
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        prepare_data(tmp_path / "e.txt", tmp_path / "d")
    with pytest.raises(ValueError, match="no text"):
        prepare_data(["", ""], tmp_path / "d")


# training --------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_training_step_follows_eager(data, tmp_path):
    """torch.compile'd forward and backward (inductor, fp32): the eager run's loss curve, step by step."""
    config = dataclasses.replace(GPT2Config.from_preset("tiny"), embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    losses = []
    for compile in (False, True):
        torch.manual_seed(0)
        run = TrainConfig(steps=20, batch_size=4, block_size=64, lr=3e-3, warmup_steps=5, compile=compile, **QUIET)
        losses.append(train(GPT2(config), data, tmp_path / f"run{compile}", run).losses)
    assert losses[0][-1] < losses[0][0] - 1.0  # it learns
    assert max(abs(a - b) for a, b in zip(*losses, strict=True)) < 1e-4


def test_finetuned_checkpoint_loads_in_transformers(tiny_dir, data, tmp_path):
    model = GPT2.from_pretrained(tiny_dir)
    result = train(model, data, tmp_path / "ft", TrainConfig(steps=3, batch_size=2, block_size=32, **QUIET))
    hf = transformers.GPT2LMHeadModel.from_pretrained(result.final_dir).eval()
    ids = torch.from_numpy(data.val[:40].astype(np.int64))[None]
    with torch.no_grad():
        ours = GPT2.from_pretrained(result.final_dir)(ids)
        theirs = hf(ids).logits
        original = GPT2.from_pretrained(tiny_dir)(ids)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours - original).abs().max().item() > 1e-3  # training changed the weights


def test_an_explicit_objective_and_callbacks(tiny_dir, data, tmp_path):
    """An objective of one's own trains what it says (a zero loss changes nothing); callbacks get each record."""
    import json

    from gpt2lite.training.objectives import LanguageModeling

    class Frozen(LanguageModeling):
        def loss(self, forward, rows, block, device):
            return super().loss(forward, rows, block, device) * 0.0

    config = TrainConfig(steps=2, batch_size=2, block_size=32, weight_decay=0.0, **QUIET)
    model = GPT2.from_pretrained(tiny_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = []
    train(model, data, tmp_path / "frozen", config, objective=Frozen(data),
          callbacks=[lambda done, record: records.append((done, dict(record)))])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    logged = [json.loads(line) for line in (tmp_path / "frozen" / "metrics.jsonl").read_text().splitlines()]
    assert [done for done, _ in records] == [1, 2]
    assert [r["train_loss"] for _, r in records] == [line["train_loss"] for line in logged] == [0.0, 0.0]
    with pytest.raises(ValueError, match="other data"):
        other = prepare_data(["Some other text to train on. " * 50], tmp_path / "other")
        train(GPT2.from_pretrained(tiny_dir), data, tmp_path / "x", config, objective=LanguageModeling(other))


@pytest.mark.slow
def test_resume_continues_exactly(tiny_dir, data, tmp_path):
    """6 steps in one go equal 3 steps, an interruption (Ctrl-C), then a resume for the rest; dropout on."""
    config = TrainConfig(steps=6, batch_size=2, grad_accum=2, block_size=32, warmup_steps=2, progress=False,
                         save_interval=1, eval_interval=2)
    whole = train(GPT2.from_pretrained(tiny_dir), data, tmp_path / "whole", config)

    def interrupt(done, record):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(GPT2.from_pretrained(tiny_dir), data, tmp_path / "split", config, callbacks=[interrupt])
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["step"] == 3
    resumed = train(GPT2.from_pretrained(tiny_dir), data, tmp_path / "split", config, resume=True)
    assert resumed.losses == whole.losses
    assert resumed.val_losses == whole.val_losses
    a = GPT2.from_pretrained(whole.final_dir).state_dict()
    b = GPT2.from_pretrained(resumed.final_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_on_combined_batch(tiny_dir, data, tmp_path):
    model_config = no_dropout(tiny_dir)
    common = dict(steps=2, block_size=32, warmup_steps=1, **QUIET)
    single = train(GPT2.from_pretrained(tiny_dir, config=model_config), data, tmp_path / "single",
                   TrainConfig(batch_size=4, **common))
    config = {"model": model_config, "train": TrainConfig(batch_size=2, **common)}
    import ddp_worker

    mp.spawn(ddp_worker.train_one_rank, nprocs=2, join=True,
             args=(2, str(tmp_path / "store"), str(tiny_dir), str(data.directory), [(str(tmp_path / "ddp"), config)]))
    a = GPT2.from_pretrained(single.final_dir).state_dict()
    b = GPT2.from_pretrained(tmp_path / "ddp" / "final").state_dict()
    before = GPT2.from_pretrained(tiny_dir).state_dict()
    update = max((a[k] - before[k]).abs().max().item() for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert update > 1e-4  # the update was not empty
    # Averaging two half-batch gradients sums in another order than one full batch; Adam's
    # normalisation turns that float rounding into at most a sliver of a step.
    assert worst < 1e-2 * update, (worst, update)


def _spawn(tiny_dir, data, model_config, runs, resume=False):
    """``runs`` (``(out_dir, TrainConfig)``) one after another on 2 gloo processes, spawned once."""
    import ddp_worker

    store = runs[0][0].parent / f"store-{runs[0][0].name}-{resume}"
    mp.spawn(ddp_worker.train_one_rank, nprocs=2, join=True,
             args=(2, str(store), str(tiny_dir), str(data.directory),
                   [(str(out), {"model": model_config, "train": config, "resume": resume}) for out, config in runs]))


def _metrics(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# A constant learning rate: a run told steps=10 follows the schedule of one told steps=20.
CONSTANT_LR = dict(block_size=32, lr=1e-3, min_lr=1e-3, warmup_steps=0, progress=False, eval_interval=10,
                   eval_batches=2, save_interval=10)


@pytest.fixture(scope="module")
def two_process_runs(tiny_dir, data, tmp_path_factory) -> Path:
    """One spawn of 2 gloo processes, no dropout: DDP and FSDP for 20 steps, and 10 FSDP steps in ``split``.

    DDP's run is what FSDP and Ray Train must equal; the FSDP test goes on with ``split``.
    """
    runs = tmp_path_factory.mktemp("two-processes")
    _spawn(tiny_dir, data, no_dropout(tiny_dir),
           [(runs / "ddp", TrainConfig(steps=20, batch_size=2, **CONSTANT_LR)),
            (runs / "fsdp", TrainConfig(steps=20, batch_size=2, fsdp=True, **CONSTANT_LR)),
            (runs / "split", TrainConfig(steps=10, batch_size=2, fsdp=True, **CONSTANT_LR))])
    return runs


@pytest.mark.slow
def test_fsdp_equals_ddp_and_resumes_across_process_counts(tiny_dir, data, two_process_runs):
    """FSDP2 on 2 gloo processes: DDP's losses over 20 steps; its checkpoint goes on in 1 process, then in 2 again."""
    model_config, common, runs = no_dropout(tiny_dir), CONSTANT_LR, two_process_runs
    ddp, fsdp = _metrics(runs / "ddp"), _metrics(runs / "fsdp")
    assert len(ddp) == len(fsdp) == 20
    assert max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(ddp, fsdp, strict=True)) < 1e-4
    assert abs(ddp[-1]["val_loss"] - fsdp[-1]["val_loss"]) < 1e-4
    # The split run: 2 processes (fsdp) for 10 steps, 1 process (the same global batch) to 15, fsdp again to 20.
    split = runs / "split"
    train(GPT2.from_pretrained(tiny_dir, config=model_config), TokenData.open(data.directory), split,
          TrainConfig(steps=15, batch_size=4, **{**common, "save_interval": 5}), resume=True)
    _spawn(tiny_dir, data, model_config, [(split, TrainConfig(steps=20, batch_size=2, fsdp=True, **common))],
           resume=True)
    resumed = _metrics(split)
    assert [m["step"] for m in resumed] == list(range(1, 21))
    assert abs(resumed[-1]["val_loss"] - ddp[-1]["val_loss"]) < 1e-4
    for i in [*range(10), *range(15, 20)]:  # steps run on 2 processes log process 0's half of the batch
        assert abs(resumed[i]["train_loss"] - ddp[i]["train_loss"]) < 1e-4
    a = GPT2.from_pretrained(runs / "ddp" / "final").state_dict()
    b = GPT2.from_pretrained(split / "final").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@pytest.mark.slow
def test_ray_train_example_equals_ddp(tiny_dir, data, two_process_runs, tmp_path):
    """examples/ray_train.py: 2 CPU workers under Ray Train's TorchTrainer train as 2 DDP (torchrun) processes do."""
    pytest.importorskip("ray.train", reason="examples/ray_train.py needs ray[train] (examples/requirements.txt)")
    import subprocess
    import sys

    start = tmp_path / "start"  # the reference's starting point: the tiny checkpoint without dropout
    GPT2.from_pretrained(tiny_dir, config=no_dropout(tiny_dir)).save_pretrained(start)
    example = Path(__file__).resolve().parents[1] / "examples" / "ray_train.py"
    c = CONSTANT_LR
    proc = subprocess.run(
        [sys.executable, str(example), "--data", str(data.directory), "--out", str(tmp_path / "ray"), "--model",
         str(start), "--workers", "2", "--steps", "10", "--batch-size", "2", "--block-size", str(c["block_size"]),
         "--lr", str(c["lr"]), "--min-lr", str(c["min_lr"]), "--warmup-steps", str(c["warmup_steps"]),
         "--eval-interval", str(c["eval_interval"]), "--eval-batches", str(c["eval_batches"]),
         "--save-interval", str(c["save_interval"]), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "10 steps on 2 Ray workers" in proc.stdout
    ray_run, ddp = _metrics(tmp_path / "ray"), _metrics(two_process_runs / "ddp")[:10]
    assert [m["step"] for m in ray_run] == list(range(1, 11))
    assert max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(ray_run, ddp, strict=True)) < 1e-6
    assert abs(ray_run[-1]["val_loss"] - ddp[-1]["val_loss"]) < 1e-6
    # The final model as Ray keeps it (copied into its storage) reads in transformers, as gpt2lite reads it.
    (kept,) = [p for p in (tmp_path / "ray" / "ray" / "gpt2lite").glob("checkpoint_*") if p.is_dir()]
    hf = transformers.GPT2LMHeadModel.from_pretrained(kept).eval()
    ids = torch.from_numpy(data.val[:40].astype(np.int64))[None]
    with torch.no_grad():
        theirs = hf(ids).logits
        ours = GPT2.from_pretrained(kept).eval()(ids)
        original = GPT2.from_pretrained(start).eval()(ids)
    assert (theirs - ours).abs().max().item() < 1e-5
    assert (theirs - original).abs().max().item() > 1e-3  # training changed the weights


def test_training_errors(tiny_dir, data, tmp_path):
    model = GPT2.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match=r"block_size must be an int in 1..96 \(the model's context\)"):
        train(model, data, tmp_path / "x", TrainConfig(block_size=97, **QUIET))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="not writable"):
        train(model, data, blocker / "out", TrainConfig(steps=1, block_size=16, **QUIET))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(model, data, tmp_path / "fresh", TrainConfig(steps=1, block_size=16, **QUIET), resume=True)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="CUDA"):
        train(model, data, tmp_path / "y", TrainConfig(steps=1, block_size=16, autocast="bf16", **QUIET))


# evaluation -------------------------------------------------------------------------------


def hf_sliding_perplexity(hf, ids, max_length, stride):
    """The transformers documentation's sliding-window procedure, weighting each window by the tokens it scores."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + max_length, ids.shape[1])
        target_len = end - prev_end
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            loss = hf(window, labels=labels).loss.item()
        scored = int((labels[:, 1:] != -100).sum())
        nll += loss * scored
        count += scored
        prev_end = end
        if end == ids.shape[1]:
            break
    return math.exp(nll / count)


def test_perplexity_equals_transformers(tiny_dir, hf_tiny, data):
    model = GPT2.from_pretrained(tiny_dir)
    short = torch.from_numpy(data.val[:50].astype(np.int64))[None]
    with torch.no_grad():
        expected = math.exp(hf_tiny(short, labels=short).loss.item())
    assert math.isclose(perplexity(model, short[0]), expected, rel_tol=1e-4)
    long = torch.from_numpy(data.train[:300].astype(np.int64))[None]  # past the 96-token context
    for max_length, stride in [(96, 48), (96, 96), (64, 17)]:
        ours = perplexity(model, long[0], max_length=max_length, stride=stride)
        assert math.isclose(ours, hf_sliding_perplexity(hf_tiny, long, max_length, stride), rel_tol=1e-4)


def test_token_logprobs_equal_transformers(tiny_dir, hf_tiny):
    model = GPT2.from_pretrained(tiny_dir)
    prompt, cont = [464, 3290, 318], [257, 1263, 13, 50256]
    with torch.no_grad():
        logp = hf_tiny(torch.tensor([prompt + cont])).logits[0].log_softmax(-1)
    expected = torch.stack([logp[len(prompt) - 1 + i, t] for i, t in enumerate(cont)])
    assert torch.allclose(token_logprobs(model, prompt, cont), expected, atol=1e-4)
    with pytest.raises(ValueError, match="empty"):
        token_logprobs(model, [], cont)


# command line -------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_finetune_then_perplexity(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--data", str(corpus), "--out", str(out), "--preset", "tiny", "--steps", "4",
                 "--batch-size", "2", "--block-size", "32", "--warmup-steps", "1", "--eval-interval", "0",
                 "--device", "cpu"]) == 0
    assert "validation loss" in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").is_file() and (out / "checkpoint.pt").is_file()
    assert main(["perplexity", str(corpus), "--model", str(out / "final"), "--max-length", "64",
                 "--device", "cpu"]) == 0
    value = float(capsys.readouterr().out)
    assert 1 < value < 50257 * 2


def test_cli_finetune_errors(tmp_path, capsys):
    assert main(["finetune", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"),
                 "--preset", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "nope.txt" in err and err.count("\n") == 1
    assert main(["finetune", "--data", "x", "--out", "y", "--steps", "0"]) == 1
    assert "steps" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text("hello " * 100)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["finetune", "--data", str(text), "--out", str(blocker / "out"), "--preset", "tiny"]) == 1
    assert "not writable" in capsys.readouterr().err
    assert main(["finetune", "--data", str(text), "--out", str(tmp_path / "o2"), "--preset", "tiny",
                 "--block-size", "129", "--device", "cpu"]) == 1
    assert "context" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "data").exists()  # nothing was tokenized


@pytest.mark.slow
def test_torchrun_finetune_two_processes(corpus, tmp_path):
    """The documented multi-process command: torchrun with two CPU processes (gloo, loopback only)."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    out = tmp_path / "ddp-run"
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "gpt2lite", "finetune", "--data", str(corpus),
         "--out", str(out), "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--block-size", "32",
         "--warmup-steps", "1", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "final" / "model.safetensors").is_file()
    assert "validation loss" in proc.stdout
