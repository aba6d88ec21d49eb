"""Many LoRA adapters per batch (transforms/adapters.py, the scheduler, the server): PEFT as the oracle per row."""

from __future__ import annotations

import pytest
import torch

from gpt2lite import GPT2, load_model
from gpt2lite.transforms.adapters import LoraSlots, MultiLoraLinear
from gpt2lite.transforms.quantize import Int8Linear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# Three adapters unlike each other: ranks, scales, targets (one leaves the attention alone).
ADAPTERS = {
    "alpha": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
    "beta": dict(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True),
    "gamma": dict(r=8, lora_alpha=16, target_modules=["mlp.c_proj", "c_fc"]),
}
NAMES = ["alpha", None, "beta", "gamma", "alpha", None]  # a batch mixing them, and rows with none
IDS = torch.randint(0, 50257, (len(NAMES), 9), generator=torch.Generator().manual_seed(3))


def _hf_lm(directory):
    transformers.logging.set_verbosity_error()
    return transformers.GPT2LMHeadModel.from_pretrained(directory).eval()


@pytest.fixture(scope="module")
def adapter_dirs(tiny_dir, tmp_path_factory):
    """The three adapters, made and saved by peft with random B (so that each changes the output)."""
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, settings) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        model = peft.get_peft_model(_hf_lm(tiny_dir), peft.LoraConfig(init_lora_weights=False, **settings))
        model.save_pretrained(root / name)
    return {name: root / name for name in ADAPTERS}


def _peft_logits(base_dir, adapter_dirs, name, ids):
    """PEFT's logits for ``ids`` with adapter ``name`` (None: the base model) on transformers' GPT-2."""
    model = _hf_lm(base_dir)
    if name is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dirs[name]).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _slots(model, adapter_dirs):
    slots = LoraSlots(model, max_loras=3)
    for name, path in adapter_dirs.items():
        slots.add(name, slots.read(str(path)))
    return slots


def test_a_mixed_batch_gives_each_row_peft_logits_for_its_adapter(tiny_dir, adapter_dirs):
    model = GPT2.from_pretrained(tiny_dir).eval()
    slots = _slots(model, adapter_dirs)
    assert sum(isinstance(m, MultiLoraLinear) for m in model.modules()) == 2 * 4  # every target, once
    slots.route(NAMES)
    with torch.no_grad():
        got = model(IDS)
    base = _peft_logits(tiny_dir, adapter_dirs, None, IDS)
    for i, name in enumerate(NAMES):
        expected = _peft_logits(tiny_dir, adapter_dirs, name, IDS[i : i + 1])[0]
        torch.testing.assert_close(got[i], expected, atol=1e-4, rtol=1e-4)
        if name is not None:
            assert float((expected - base[i]).abs().max()) > 0.05  # the adapter matters
    # One adapter for the whole batch takes the shorter path: the same numbers.
    slots.route(["beta"] * len(NAMES))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS)[2], got[2], atol=1e-5, rtol=1e-5)


def _dequantized_copy(quantized, tiny_dir, directory):
    """A float checkpoint holding the weights an int8 model stands for (``q * scale``), for PEFT to run."""
    model = GPT2.from_pretrained(tiny_dir)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, Int8Linear):  # the layers and the tied embedding
                target = model.get_submodule(name.removesuffix(".base_layer"))
                target.weight.copy_(module.dequantize())
    model.save_pretrained(directory)
    return directory


def test_over_an_int8_base_the_products_stay_float(tiny_dir, adapter_dirs, tmp_path):
    model = load_model(tiny_dir, quantize="int8").eval()
    slots = _slots(model, adapter_dirs)
    assert isinstance(model.h[0].attn.c_attn.base_layer, Int8Linear)
    assert all(m.lora_A.dtype == torch.float32 for m in model.modules() if isinstance(m, MultiLoraLinear))
    slots.route(NAMES)
    with torch.no_grad():
        got = model(IDS)
    # The oracle: PEFT over the float weights the int8 ones stand for. fbgemm also rounds the
    # activations to 8 bits, so each row is as far from it as the base row is, not further.
    float_dir = _dequantized_copy(model, tiny_dir, tmp_path / "dequantized")
    base_error = max(float((got[i] - _peft_logits(float_dir, adapter_dirs, None, IDS[i : i + 1])[0]).abs().max())
                     for i, name in enumerate(NAMES) if name is None)
    for i, name in enumerate(NAMES):
        expected = _peft_logits(float_dir, adapter_dirs, name, IDS[i : i + 1])[0]
        error = float((got[i] - expected).abs().max())
        effect = float((expected - _peft_logits(float_dir, adapter_dirs, None, IDS[i : i + 1])[0]).abs().max())
        assert error < 2 * base_error + 1e-4, (name, error, base_error)
        if name is not None:
            assert effect > 10 * error, (name, effect, error)


def test_over_a_prepacked_base_rows_equal_peft(tiny_dir, adapter_dirs):
    model = load_model(tiny_dir, prepack=True).eval()
    slots = _slots(model, adapter_dirs)
    slots.route(NAMES)
    with torch.no_grad():
        got = model(IDS)
    for i, name in enumerate(NAMES):
        torch.testing.assert_close(got[i], _peft_logits(tiny_dir, adapter_dirs, name, IDS[i : i + 1])[0],
                                   atol=1e-4, rtol=1e-4)
