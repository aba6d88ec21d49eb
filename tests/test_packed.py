"""prepack: the reordered copy gives the float product, follows weight changes, leaves the model's API alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt2lite import GPT2, TextGenerator, TrainConfig, generate, load_model, prepack, prepare_data, train
from gpt2lite.cli import build_parser, main
from gpt2lite.transforms.packed import MIN_ROWS, PackedEmbedding, PackedLinear


@pytest.mark.parametrize("one_row", ["mkl", "onednn"])
@pytest.mark.parametrize(("copy", "batch"), [(True, "mkl"), (False, "mkl"), (False, "onednn")])
@pytest.mark.parametrize("rows", [1, MIN_ROWS, 8, 40])
def test_packed_product_equals_the_float_product(rows, copy, batch, one_row):
    torch.manual_seed(0)
    layer = nn.Linear(64, 96)
    packed = PackedLinear.wrap(layer)
    packed.copy, packed.batch, packed.one_row = copy, batch, one_row
    x = torch.randn(rows, 64)
    with torch.no_grad():
        expected = F.linear(x.double(), layer.weight.double(), layer.bias.double())
        torch.testing.assert_close(packed(x).double(), expected, atol=1e-5, rtol=1e-5)
    # The reordered copy is made for batches only, and only when asked for: one row reads the weight as it is.
    assert (packed._packed is not None) == (rows >= MIN_ROWS and copy)


@pytest.mark.parametrize("rows", [1, 3])
def test_gradients_flow_through_a_frozen_prepacked_layer(rows):
    """LoRA trains with the base weights frozen: the input's gradient must still come back through them."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    packed = PackedLinear.wrap(layer)
    packed.one_row, packed.copy = "onednn", True
    packed.requires_grad_(False)
    x = torch.randn(rows, 16, requires_grad=True)
    packed(x).square().sum().backward()
    expected = torch.autograd.grad(F.linear(x, layer.weight, layer.bias).square().sum(), x)[0]
    assert x.grad is not None and torch.allclose(x.grad, expected, atol=1e-5)


def test_a_changed_weight_is_reordered_again():
    torch.manual_seed(0)
    packed = PackedLinear.wrap(nn.Linear(32, 16))
    x = torch.randn(8, 32)
    with torch.no_grad():
        packed(x)
        packed.weight.mul_(2)  # as an optimizer step or load_state_dict would
        torch.testing.assert_close(packed(x), F.linear(x, packed.weight, packed.bias), atol=1e-5, rtol=1e-5)


def test_prepacked_model_matches_the_float_model_and_keeps_its_state_dict(tiny_dir, tiny, tmp_path):
    model = prepack(GPT2.from_pretrained(tiny_dir))
    assert isinstance(model.h[0].mlp.c_fc, PackedLinear)
    assert model.state_dict().keys() == tiny.state_dict().keys()
    ids = torch.randint(0, 50257, (8, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), tiny(ids), atol=1e-4, rtol=1e-4)
    assert torch.equal(generate(model, ids, max_new_tokens=8, temperature=0, ignore_eos=True),
                       generate(tiny, ids, max_new_tokens=8, temperature=0, ignore_eos=True))
    data = prepare_data(["Some text to train a step on. " * 100], tmp_path / "data")
    result = train(model, data, tmp_path / "run", TrainConfig(steps=2, batch_size=2, block_size=16, progress=False))
    assert GPT2.from_pretrained(result.final_dir).state_dict().keys() == tiny.state_dict().keys()


def test_prepack_refuses_what_it_cannot_serve(tiny_dir):
    with pytest.raises(ValueError, match="float32 models on the CPU"):
        prepack(load_model(tiny_dir, quantize="int8"))
    with pytest.raises(ValueError, match="float32 models on the CPU"):
        prepack(GPT2.from_pretrained(tiny_dir, dtype="bfloat16"))


def test_prepack_flag_reaches_the_model(tiny_dir, capsys):
    assert build_parser().parse_args(["serve", "--prepack"]).prepack is True
    gen = TextGenerator.from_pretrained(tiny_dir, prepack=True)
    assert isinstance(gen.model.h[1].attn.c_attn, PackedLinear)
    assert main(["generate", "Hi", "--model", str(tiny_dir), "--device", "cpu", "--prepack", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() != ""


# the one-row kernel ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["mkl", "onednn"])
def test_each_one_row_kernel_gives_transformers_greedy_tokens(tiny_dir, hf_tiny, kernel):
    model = prepack(GPT2.from_pretrained(tiny_dir), one_row=kernel)
    assert {m.one_row for m in model.modules() if isinstance(m, PackedLinear)} == {kernel}
    ids = torch.tensor([[464, 3290, 318, 257]])
    ours = generate(model, ids, max_new_tokens=30, temperature=0, ignore_eos=True)
    theirs = hf_tiny.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=30,
                              pad_token_id=50256)
    assert torch.equal(ours, theirs)


def test_one_copy_prepack_keeps_transformers_greedy_tokens_and_adds_no_weights(tiny_dir, hf_tiny):
    model = prepack(GPT2.from_pretrained(tiny_dir), one_row="onednn", copy=False, batch="mkl")
    ids = torch.tensor([[464, 3290, 318, 257], [50, 1000, 7, 2]])
    for batch in (ids[:1], ids):  # one row through oneDNN over the plain weights; two rows through MKL
        ours = generate(model, batch, max_new_tokens=20, temperature=0, ignore_eos=True)
        theirs = hf_tiny.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                  max_new_tokens=20, pad_token_id=50256)
        assert torch.equal(ours, theirs)
    assert all(m._packed is None for m in model.modules() if hasattr(m, "_packed"))  # one copy of each weight
    from gpt2lite.transforms.packed import kernel_report
    assert all("onednn (as asked)" in line and "mkl (no copy)" in line for line in kernel_report(model))


@pytest.mark.parametrize("kernel", ["mkl", "onednn"])
def test_each_batch_kernel_without_a_copy_gives_transformers_greedy_tokens(tiny_dir, hf_tiny, kernel):
    model = prepack(GPT2.from_pretrained(tiny_dir), one_row="mkl", copy=False, batch=kernel)
    assert {m.batch for m in model.modules() if isinstance(m, (PackedLinear, PackedEmbedding))} == {kernel}
    batch = torch.tensor([[464, 3290, 318, 257], [50, 1000, 7, 2], [9, 99, 999, 9999]])
    with torch.profiler.profile() as prof:
        ours = generate(model, batch, max_new_tokens=20, temperature=0, ignore_eos=True)
    theirs = hf_tiny.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False, max_new_tokens=20,
                              pad_token_id=50256)
    assert torch.equal(ours, theirs)
    onednn = sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")
    assert (onednn > 0) == (kernel == "onednn")
    with torch.profiler.profile() as prof, torch.inference_mode():  # the tied head follows its own choice too
        model.wte.project(torch.randn(3, 64))
    assert any(e.key == "mkldnn::_linear_pointwise" for e in prof.key_averages()) == (kernel == "onednn")
    assert all(m._packed is None for m in model.modules() if hasattr(m, "_packed"))  # no reordered copies


def test_load_model_without_native_kernels_measures_the_one_row_kernel_with_one_copy_of_each_weight(
        tiny_dir, hf_tiny, _kernel_cache_in_a_temporary_folder):
    import json

    from gpt2lite.transforms import kernels

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    # float32 on the CPU with PyTorch's routes: prepack(copy=False), the kernels measured or cached
    model = load_model(tiny_dir, kernels="torch")
    assert torch.equal(torch.rand(3), expected)  # measuring drew nothing from the caller's random state
    c_fc = model.h[0].mlp.c_fc
    assert isinstance(c_fc, PackedLinear) and c_fc.copy is False
    chosen = json.loads(_kernel_cache_in_a_temporary_folder.read_text())[kernels.cpu_key()]
    assert c_fc.one_row == chosen["64x256"]["kernel"] and model.wte.one_row == chosen["64x50257"]["kernel"]
    # Batches keep MKL, as transformers computes them, so that greedy tokens stay its own.
    assert all(m.batch == "mkl" and m.batch_choice is None for m in (c_fc, model.wte))
    for ids in (torch.tensor([[464, 3290, 318, 257]]), torch.tensor([[464, 3290, 318, 257], [50, 1000, 7, 2]])):
        ours = generate(model, ids, max_new_tokens=20, temperature=0, ignore_eos=True)
        theirs = hf_tiny.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                                  pad_token_id=50256)
        assert torch.equal(ours, theirs)
    assert all(m._packed is None for m in model.modules() if hasattr(m, "_packed"))  # no reordered copies
    # Opting out, and what the default leaves alone.
    assert type(load_model(tiny_dir, prepack=False).h[0].mlp.c_fc) is nn.Linear
    assert build_parser().parse_args(["serve", "--no-prepack"]).prepack is False
    assert build_parser().parse_args(["serve"]).prepack is None
    assert type(load_model(tiny_dir, quantize="int8").h[0].mlp.c_fc) is not PackedLinear
    assert type(load_model(tiny_dir, dtype="bfloat16").h[0].mlp.c_fc) is nn.Linear
    assert type(load_model(tiny_dir, kind="classifier", labels=["a", "b"]).transformer.h[0].mlp.c_fc) is nn.Linear


@pytest.mark.slow
def test_a_compiled_cpu_step_multiplies_one_row_as_a_sum_of_products_with_transformers_tokens(tiny_dir, hf_tiny):
    """compile=True on the CPU: inductor's own loop over (out, in) rows, and still transformers' greedy tokens."""
    # PyTorch's routes (gpt2lite's own kernels in a compiled step: tests/test_native.py), prepack(copy=False)
    # storing the weights as (out, in) rows.
    model = load_model(tiny_dir, kernels="torch")
    assert model.h[0].attn.c_attn.weight.is_contiguous() and model.h[0].attn.c_attn.weight.shape == (192, 64)
    ids = torch.tensor([[464, 3290, 318, 257]])
    generate(model, ids, max_new_tokens=2, temperature=0, ignore_eos=True, compile=True)  # compiled here
    with torch.profiler.profile() as prof:
        ours = generate(model, ids, max_new_tokens=12, temperature=0, ignore_eos=True, compile=True)
    theirs = hf_tiny.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                              pad_token_id=50256)
    assert torch.equal(ours, theirs)
    kernels = ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise")  # the products, not their callers
    calls = sum(e.count for e in prof.key_averages() if e.key in kernels)
    assert 0 < calls <= 2 * 4 + 1  # the 4-token prompt's products (2 blocks x 4, the head); none in the 11 steps
    # Batches in a compiled step take MKL, also where prepack made oneDNN copies (inductor cannot lower those).
    batch = torch.tensor([[464, 3290, 318, 257], [50, 1000, 7, 2]])
    ours = generate(prepack(GPT2.from_pretrained(tiny_dir)), batch, max_new_tokens=8, temperature=0, ignore_eos=True,
                    compile=True)
    theirs = hf_tiny.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False, max_new_tokens=8,
                              pad_token_id=50256)
    assert torch.equal(ours, theirs)


def test_kernel_choices_are_measured_once_per_cpu_and_cached(tiny_dir, tmp_path, monkeypatch):
    import json

    from gpt2lite.transforms import kernels
    from gpt2lite.transforms.packed import kernel_report

    cache = tmp_path / "kernels.json"
    model = prepack(GPT2.from_pretrained(tiny_dir), kernel_cache=cache, kernels="torch")
    saved = json.loads(cache.read_text())[kernels.cpu_key()]
    assert set(saved) == {"64x192", "64x64", "64x256", "256x64", "64x50257"}  # c_attn, c_proj, c_fc, mlp c_proj, head
    assert all(s["kernel"] in ("mkl", "onednn") and s["mkl_us"] > 0 and s["onednn_us"] > 0 for s in saved.values())
    assert model.h[0].mlp.c_fc.one_row == saved["64x256"]["kernel"]
    assert len(kernel_report(model)) == 5 and all("measured" in line for line in kernel_report(model))

    def no_measuring(*args):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(kernels, "measure", no_measuring)
    again = prepack(GPT2.from_pretrained(tiny_dir), kernel_cache=cache, kernels="torch")
    assert again.wte.one_row == saved["64x50257"]["kernel"]
    monkeypatch.undo()
    cache.write_text("{not json")  # damaged (or deleted): measured again, and the file made whole
    prepack(GPT2.from_pretrained(tiny_dir), kernel_cache=cache, kernels="torch")
    assert set(json.loads(cache.read_text())[kernels.cpu_key()]) == set(saved)
    cache.unlink()
    prepack(GPT2.from_pretrained(tiny_dir), kernel_cache=cache, kernels="torch")
    assert cache.is_file()


def test_batch_kernels_are_measured_at_the_asked_rows_beside_older_one_row_choices(tiny_dir, tmp_path, monkeypatch):
    import json

    from gpt2lite.transforms import kernels
    from gpt2lite.transforms.packed import kernel_report

    cache = tmp_path / "kernels.json"
    # One-row choices only, as older versions wrote.
    prepack(GPT2.from_pretrained(tiny_dir), kernel_cache=cache, kernels="torch")
    one_row = json.loads(cache.read_text())[kernels.cpu_key()]
    measured: list[int] = []
    real = kernels.measure
    monkeypatch.setattr(kernels, "measure", lambda weights, rows=1, *rest: measured.append(rows) or
                        real(weights, rows, *rest))
    model = prepack(GPT2.from_pretrained(tiny_dir), copy=False, kernel_cache=cache, rows=8, kernels="torch")
    model = prepack(model, rows=4, copy=False, kernel_cache=cache, kernels="torch")  # made again, for batches of 4
    measured = [r for r in measured if r != 8]
    assert measured == [4] * 5  # each of the 5 shapes at 4 rows; the one-row choices were read, not measured
    saved = json.loads(cache.read_text())[kernels.cpu_key()]
    assert {k: saved[k] for k in one_row} == one_row
    assert set(saved) == set(one_row) | {f"{shape} @{n} rows" for shape in one_row for n in (4, 8)}
    assert all(m.rows == 4 and m.batch_choice == saved[f"{_shape} @4 rows"]
               for m, _shape in ((model.h[0].mlp.c_fc, "64x256"), (model.wte, "64x50257")))
    assert all("measured at 4 rows" in line for line in kernel_report(model))
    # Made again with copies: batches take those, and no batch choice is left behind.
    model = prepack(model, copy=True, kernel_cache=cache, kernels="torch")
    assert all(m.copy and m.batch == "mkl" and m.batch_choice is None and m.rows == 8
               for m in model.modules() if isinstance(m, (PackedLinear, PackedEmbedding)))
    with pytest.raises(ValueError, match="rows must be at least 1"):
        prepack(model, rows=0)
    with pytest.raises(ValueError, match="batch must be 'auto', 'mkl' or 'onednn'"):
        prepack(model, batch="fast")


_CHOOSE = """
import sys, torch
from gpt2lite.transforms.kernels import choose_kernels
cache, width = sys.argv[1], int(sys.argv[2])
weights = [torch.randn(width, 32) for _ in range(3)]
for _ in range(5):
    choose_kernels({f"32x{width}": weights}, cache)
"""


@pytest.mark.slow
def test_the_kernel_cache_is_safe_to_share_between_processes(tmp_path):
    import json
    import subprocess
    import sys

    cache = tmp_path / "kernels.json"
    workers = [subprocess.Popen([sys.executable, "-c", _CHOOSE, str(cache), str(16 + 8 * i)],
                                stderr=subprocess.PIPE, text=True) for i in range(3)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    saved = json.loads(cache.read_text())  # whole JSON, whoever wrote last
    assert all(choice["kernel"] in ("mkl", "onednn") for shapes in saved.values() for choice in shapes.values())
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_a_kernel_cache_that_is_no_regular_file_is_never_read(tiny_dir, tmp_path, kind):
    """A symlink to /dev/zero exhausted memory and a FIFO hung the load: they are measured over, then replaced."""
    import json
    import os
    import threading

    from gpt2lite.transforms import kernels

    cache = tmp_path / "kernels.json"
    if kind == "dev-zero":
        cache.symlink_to("/dev/zero")
    else:
        os.mkfifo(cache)
    done: list[nn.Module] = []
    worker = threading.Thread(target=lambda: done.append(
        prepack(GPT2.from_pretrained(tiny_dir), kernel_cache=cache, kernels="torch")), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert done, "prepack did not return"
    assert cache.is_file() and not cache.is_symlink()  # replaced by the measured choices
    assert set(json.loads(cache.read_text())[kernels.cpu_key()]) == {"64x192", "64x64", "64x256", "256x64",
                                                                      "64x50257"}
