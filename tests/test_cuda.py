"""Parity on a CUDA GPU (skipped where there is none): logits, greedy generation and the compiled path."""

from __future__ import annotations

import copy

import pytest
import torch

from gpt2lite import GPT2, generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def hf_cuda(hf_124m):
    return copy.deepcopy(hf_124m).cuda()


def ids_on_cuda(shape, seed=0):
    return torch.randint(0, 50257, shape, generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.float16, 0.05)])
def test_cuda_logits_equal_transformers(gpt2_124m_dir, hf_cuda, dtype, tol):
    ours = GPT2.from_pretrained(gpt2_124m_dir, device="cuda", dtype=dtype)
    ids = ids_on_cuda((2, 64))
    with torch.no_grad():
        theirs = copy.deepcopy(hf_cuda).to(dtype)(ids).logits
        mine = ours(ids)
    assert mine.device.type == "cuda" and mine.dtype == dtype
    assert (mine.float() - theirs.float()).abs().max().item() < tol


def test_cuda_greedy_equals_transformers(gpt2_124m_dir, hf_cuda):
    ours = GPT2.from_pretrained(gpt2_124m_dir, device="cuda")
    ids = ids_on_cuda((3, 10), seed=1)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mine = generate(ours, ids, attention_mask=mask, max_new_tokens=20, temperature=0)
    with torch.no_grad():
        theirs = hf_cuda.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                  pad_token_id=50256)
    assert torch.equal(mine, theirs)


def test_cuda_compiled_path_equals_eager(gpt2_124m_dir):
    ours = GPT2.from_pretrained(gpt2_124m_dir, device="cuda")
    ids = ids_on_cuda((2, 12), seed=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    eager = generate(ours, ids, attention_mask=mask, max_new_tokens=24, temperature=0, ignore_eos=True)
    for _ in range(2):
        compiled = generate(ours, ids, attention_mask=mask, max_new_tokens=24, temperature=0, ignore_eos=True,
                            compile=True)
        assert torch.equal(compiled, eager)


@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_cuda_training_lowers_loss(autocast, tmp_path):
    from gpt2lite import GPT2Config, TrainConfig, prepare_data, train

    text = ["The cat sat on the mat. The dog sat on the log. " * 200]
    data = prepare_data(text, tmp_path / "data")
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_preset("tiny")).cuda()
    config = TrainConfig(steps=30, batch_size=8, block_size=64, lr=3e-3, warmup_steps=3, autocast=autocast,
                         progress=False, save_interval=0, eval_interval=10)
    result = train(model, data, tmp_path / "run", config)
    first, last = result.val_losses[0][1], result.val_losses[-1][1]
    assert last < first - 1.0
    assert GPT2.from_pretrained(result.final_dir).dtype == torch.float32


def test_cuda_int8_is_weight_only_and_equals_the_dequantized_model(gpt2_124m_dir):
    from gpt2lite.transforms.quantize import Int8Linear

    quantized = GPT2.from_pretrained(gpt2_124m_dir, device="cuda", quantize="int8")
    layer = quantized.h[0].attn.c_attn
    assert isinstance(layer, Int8Linear) and layer._packed is None  # no CPU kernel: activations stay float
    reference = GPT2.from_pretrained(gpt2_124m_dir, device="cuda")
    with torch.no_grad():  # the float model with the very weights int8 stands for
        for q_block, f_block in zip(quantized.h, reference.h, strict=True):
            for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                q, f = q_block.get_submodule(name), f_block.get_submodule(name)
                f.weight.copy_(q.dequantize())
        reference.wte.weight.copy_(quantized.wte.dequantize())
        ids = ids_on_cuda((2, 32), seed=3)
        torch.testing.assert_close(quantized(ids), reference(ids), atol=1e-3, rtol=1e-3)
    out = generate(quantized, ids, max_new_tokens=8, temperature=0, ignore_eos=True)
    assert out.device.type == "cuda" and out.shape == (2, 40)
