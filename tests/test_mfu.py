"""MFU: nanoGPT's FLOPs per token counted by hand (and N by transformers), the GPU peaks, and what a run logs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from gpt2lite import GPT2, GPT2Config, TrainConfig, prepare_data, train
from gpt2lite.cli import main
from gpt2lite.training.flops import flops_per_token, gpu_peak_flops, mfu, peak_flops


def gpt2_params(C: int, L: int, V: int) -> int:
    """GPT-2's parameters without the position embeddings, from its shapes (lm_head tied to wte)."""
    ln = 2 * C
    attn = (C * 3 * C + 3 * C) + (C * C + C)  # c_attn, c_proj
    mlp = (C * 4 * C + 4 * C) + (4 * C * C + C)  # c_fc, c_proj
    return V * C + L * (ln + attn + ln + mlp) + ln  # wte, blocks, ln_f


def test_gpt2_124m_flops_per_token_by_hand():
    with torch.device("meta"):
        ours = GPT2(GPT2Config.from_preset("gpt2"))
        theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    n = gpt2_params(C=768, L=12, V=50257)
    assert n == 123_653_376  # nanoGPT prints "number of parameters: 123.65M" for GPT-2 124M
    assert n == theirs.num_parameters() - 1024 * 768  # transformers' count, less wpe
    # 6N + 12 L H Q T with L=12 layers, H=12 heads of Q=64, T=1024: nanoGPT's estimate_mfu.
    assert flops_per_token(ours, 1024) == 6 * 123_653_376 + 12 * 12 * 12 * 64 * 1024 == 855_166_464
    # nanoGPT's default run: 12 x 1024 tokens x 40 micro-steps in 1 s on one A100 (312 TFLOP/s bf16).
    assert mfu(855_166_464, 12 * 1024 * 40, 312e12) == pytest.approx(855_166_464 * 491_520 / 312e12)
    assert mfu(855_166_464, 12 * 1024 * 40, 312e12, devices=8) == pytest.approx(0.1684, abs=1e-4)
    assert mfu(None, 1000.0, 312e12) is None and mfu(1e9, 1000.0, None) is None


def test_peaks_of_known_gpus_and_none_elsewhere():
    # NVIDIA's datasheets, dense bf16 (half the "with sparsity" figures).
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == gpu_peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA H200") == 989e12
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090") is None
    assert peak_flops("cpu") is None
    with pytest.raises(ValueError, match="peak_flops"):
        TrainConfig(peak_flops=0)


def test_a_run_logs_mfu_against_the_given_peak_and_null_without(tmp_path, capsys):
    data = prepare_data(["The quick brown fox jumps over the lazy dog. " * 200], tmp_path / "data")
    config = TrainConfig(steps=2, batch_size=2, block_size=32, progress=False, eval_interval=0, save_interval=0,
                         peak_flops=1e12)
    torch.manual_seed(0)
    train(GPT2(GPT2Config.from_preset("tiny")), data, tmp_path / "a", config)
    flops = 6 * gpt2_params(C=64, L=2, V=50257) + 12 * 2 * 2 * 32 * 32  # tiny: 2 layers, 2 heads of 32
    for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        assert entry["mfu"] == pytest.approx(flops * entry["tokens_per_s"] / 1e12, rel=1e-12)
    corpus = tmp_path / "text.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    assert main(["finetune", "--data", str(corpus), "--out", str(tmp_path / "b"), "--preset", "tiny", "--steps", "1",
                 "--batch-size", "2", "--block-size", "32", "--device", "cpu"]) == 0
    assert "MFU unknown" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text())["mfu"] is None
