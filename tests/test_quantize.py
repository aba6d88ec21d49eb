"""int8 and int4 inference: layers against float references with error bounds from the scales, and whole models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gpt2lite import (
    GPT2,
    TextGenerator,
    TrainConfig,
    generate,
    load_model,
    prepare_data,
    quantize,
    save_model,
    train,
)
from gpt2lite.cli import QUANTIZE_CHOICES, build_parser, main
from gpt2lite.errors import NonFiniteError
from gpt2lite.transforms.native import use_kernels
from gpt2lite.transforms.quantize import (
    QUANTIZE_MODES,
    Int4Embedding,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    is_quantized,
)


def _layer(out_features: int = 96, in_features: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Rows of very different sizes, as trained weights have: one scale per row must follow each.
    w = torch.randn(out_features, in_features, generator=g) * torch.logspace(-2, 1, out_features)[:, None]
    return w, torch.randn(out_features, generator=g)


def test_weights_round_to_within_half_a_step_of_their_row_scale():
    w, b = _layer()
    layer = Int8Linear.from_float(w, b)
    assert layer.weight.dtype == torch.int8
    assert torch.allclose(layer.scale, w.abs().amax(1) / 127)
    assert bool(((layer.dequantize() - w).abs() <= layer.scale[:, None] / 2 + 1e-7).all())
    assert int(layer.weight.abs().max()) == 127  # each row's largest weight uses the full range


def test_weight_only_product_equals_the_dequantized_float_layer():
    w, b = _layer()
    layer = Int8Linear.from_float(w, b)
    layer._packed = None  # the path CUDA (and a CPU without fbgemm) takes
    x = torch.randn(5, 3, 64)
    expected = F.linear(x.double(), layer.dequantize().double(), b.double())
    assert torch.allclose(layer(x).double(), expected, atol=1e-4, rtol=1e-5)
    # ... and the error against the float layer stays inside what the rounding of the weights allows.
    bound = (x.abs().double() @ (layer.scale.double()[:, None] / 2).expand(-1, 64).T) + 1e-4
    assert bool(((layer(x).double() - F.linear(x.double(), w.double(), b.double())).abs() <= bound).all())


@pytest.mark.parametrize("rows", [1, 8, 33])
def test_cpu_kernel_stays_within_the_activation_rounding_bound(rows):
    w, b = _layer(seed=rows)
    layer = Int8Linear.from_float(w, b)
    assert layer._packed is not None, "fbgemm's int8 kernel should be available in the CPU build of torch"
    x = torch.randn(rows, 64) * 3
    # The kernel rounds the activations of one call to 7-bit unsigned steps over [min(x, 0), max(x, 0)]:
    # each product term moves by at most half a step times |w|.
    step = (x.max().clamp(min=0) - x.min().clamp(max=0)).double() / 127
    bound = layer.dequantize().abs().double().sum(1) * step / 2 * 1.01 + 1e-4  # (out,)
    reference = F.linear(x.double(), layer.dequantize().double(), b.double())
    error = (layer(x).double() - reference).abs()
    assert bool((error <= bound).all()), float((error / bound).max())
    assert float(error.max()) > 0  # it did quantize the activations: this is the integer kernel


def test_embedding_lookup_and_tied_head_use_the_same_int8_rows():
    w, _ = _layer(out_features=50, in_features=16)
    emb = Int8Embedding.from_float(w)
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    assert torch.equal(emb(ids), emb.dequantize()[ids])
    x = torch.randn(2, 3, 16)
    step = (x.max().clamp(min=0) - x.min().clamp(max=0)).double() / 127
    bound = emb.dequantize().abs().double().sum(1) * step / 2 * 1.01 + 1e-4
    assert bool(((emb.project(x).double() - x.double() @ emb.dequantize().double().T).abs() <= bound).all())


def test_moving_a_layer_rebuilds_its_packed_weight():
    w, b = _layer()
    layer = Int8Linear.from_float(w, b)
    before = layer._packed
    layer.to("cpu", torch.float32)
    assert layer._packed is not None and layer._packed is not before


def test_quantized_model_is_close_to_float_and_generates(tiny_dir, tiny):
    q = load_model(tiny_dir, quantize="int8")
    assert is_quantized(q) and not is_quantized(tiny)
    assert q.dtype == torch.float32
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = tiny(ids), q(ids)
    # Random weights make tiny logits; int8 moves them by a small share of their spread.
    assert float((a - b).abs().max()) < 0.1 * float(a.std())
    out = generate(q, ids, max_new_tokens=6, temperature=0, ignore_eos=True)
    assert out.shape == (2, 18) and torch.equal(out[:, :12], ids)
    sampled = generate(q, ids, max_new_tokens=6, temperature=1.0, top_k=20, seed=1, ignore_eos=True)
    assert sampled.shape == (2, 18)


def test_text_api_streams_scores_and_refuses_training(tiny_dir, tmp_path):
    gen = TextGenerator.from_pretrained(tiny_dir, quantize="int8")
    assert is_quantized(gen.model)
    pieces = list(gen.stream("Hello there", max_new_tokens=5, temperature=0))
    assert "".join(pieces) == gen("Hello there", max_new_tokens=5, temperature=0)
    assert gen.perplexity("The quick brown fox jumps over the lazy dog.") > 1
    data = prepare_data(["some text to train on " * 50], tmp_path / "data")
    with pytest.raises(ValueError, match="quantized model cannot be trained"):
        train(gen.model, data, tmp_path / "run", TrainConfig(steps=1, block_size=16, progress=False))
    with pytest.raises(ValueError, match="already quantized"):
        quantize(gen.model)
    with pytest.raises(ValueError, match="saving a quantized model"):
        save_model(gen.model, tmp_path / "q")
    with pytest.raises(ValueError, match=r"saved with gpt2lite\.save_model"):
        gen.model.save_pretrained(tmp_path / "q")  # the model's own class knows nothing of quantization


def test_bad_quantize_values_are_errors(tiny_dir):
    with pytest.raises(ValueError, match="quantize must be one of"):
        load_model(tiny_dir, quantize="int3")


@pytest.mark.slow
def test_compiled_int8_steps_run_fbgemm_inside_the_graph(tiny_dir, monkeypatch):
    """compile=True calls fbgemm's product through gpt2lite::int8_linear; a copy shares the compiled graph."""
    from torch._dynamo.utils import counters

    from gpt2lite.transforms import quantize as quantize_module

    q = load_model(tiny_dir, quantize="int8", kernels="torch")  # gpt2lite's own kernel: tests/test_native.py
    ids = torch.tensor([[5, 17, 3, 99, 2048, 7]])
    eager = generate(q, ids, max_new_tokens=10, temperature=0, ignore_eos=True, return_dict=True)
    calls: list[int] = []
    find = quantize_module._layer  # only the registered op's kernel looks layers up
    monkeypatch.setattr(quantize_module, "_layer", lambda weight: calls.append(1) or find(weight))
    compiled = generate(q, ids, max_new_tokens=10, temperature=0, ignore_eos=True, return_dict=True,
                        compile=True)
    layers = sum(isinstance(m, Int8Linear) for m in q.modules())  # the tied embedding / head is one too
    assert len(calls) == 9 * layers  # each layer's product at each of the 9 one-token steps
    assert compiled.sequences.tolist() == eager.sequences.tolist()
    # The LayerNorms and GELUs inductor fuses round differently, and fbgemm requantizes what they give.
    assert torch.allclose(compiled.logprobs, eager.logprobs, atol=1e-2)
    graphs = counters["stats"]["unique_graphs"]
    twin = copy.deepcopy(q)
    del q  # the copy's layers do not lean on the original's
    again = generate(twin, ids, max_new_tokens=10, temperature=0, ignore_eos=True, compile=True)
    assert again.tolist() == eager.sequences.tolist()
    assert counters["stats"]["unique_graphs"] == graphs  # the same shapes: the same graph, with the copy's weights


def test_cli_quantize_flag_reaches_the_model(tiny_dir, tmp_path, capsys):
    assert QUANTIZE_CHOICES == QUANTIZE_MODES
    for command in (["generate", "x"], ["serve"], ["perplexity"]):
        assert build_parser().parse_args([*command, "--quantize", "int8"]).quantize == "int8"
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4, encoding="utf-8")
    printed = {}
    for flag in ([], ["--quantize", "int8"]):
        assert main(["perplexity", str(text), "--model", str(tiny_dir), "--device", "cpu", *flag]) == 0
        printed[bool(flag)] = float(capsys.readouterr().out)
    body = text.read_text(encoding="utf-8")
    assert printed[True] == pytest.approx(TextGenerator.from_pretrained(tiny_dir, quantize="int8").perplexity(body),
                                          abs=1e-4)
    assert printed[False] == pytest.approx(TextGenerator.from_pretrained(tiny_dir).perplexity(body), abs=1e-4)
    assert printed[True] != printed[False]
    assert main(["generate", "Hi", "--model", str(tiny_dir), "--device", "cpu", "--quantize", "int8",
                 "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert main(["generate", "Hi", "--model", str(tiny_dir), "--device", "cpu", "--quantize", "int4",
                 "--max-new-tokens", "3", "--temperature", "0"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["generate", "Hi", "--model", str(tiny_dir), "--quantize", "int3"])
    assert exc.value.code == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err


# int4: 4-bit codes with a scale and offset per group of inputs, PyTorch's CPU kernel against our own dequantization.

@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_weights_round_to_within_half_a_step_of_their_group(group_size):
    w, b = _layer(out_features=100, in_features=128)
    layer = Int4Linear.from_float(w, b, group_size=group_size)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (128, 64)  # 100 rows padded to 128
    assert layer.scales_and_zeros.dtype == torch.bfloat16 and layer.dequantize().dtype == torch.float32
    groups = w.view(100, -1, group_size)
    low, high = groups.amin(-1), groups.amax(-1)  # (out, G)
    step = (high - low) / 15
    # Half a step, and what rounding the scale and offset to bfloat16 (2^-9 relative) can add.
    bound = step / 2 + (8 * step + low.abs() + high.abs()) * 2**-8 + 1e-6
    error = (layer.dequantize() - w).abs().view(100, -1, group_size)
    assert bool((error <= bound.unsqueeze(-1)).all())
    assert float(error.mean()) < float(step.mean()) / 3  # most weights round to a neighbouring code
    use_kernels(layer, "torch")  # PyTorch's layout (the default is gpt2lite's kernel's, where it is built)
    assert layer.block > 0, "PyTorch's int4 CPU kernel should pack this weight (torch 2.13 CPU wheel)"
    assert torch.equal(layer.dequantize().view(100, -1, group_size) - w.view(100, -1, group_size), -error.neg()) \
        or torch.equal((layer.dequantize() - w).abs().view(100, -1, group_size), error)  # the same codes


@pytest.mark.parametrize("rows", [1, 3, 17])
def test_int4_cpu_kernel_and_the_plain_fallback_equal_dequantizing_every_product(rows, monkeypatch):
    w, b = _layer(out_features=100, in_features=128, seed=rows)
    layer = use_kernels(Int4Linear.from_float(w, b, group_size=32), "torch")  # PyTorch's kernel

    def no_kernel(*args):
        raise RuntimeError("no int4 kernel in this build")

    monkeypatch.setattr(torch, "_convert_weight_to_int4pack_for_cpu", no_kernel)
    plain = use_kernels(Int4Linear.from_float(w, b, group_size=32), "torch")  # plain rows, every product dequantized
    monkeypatch.undo()
    assert plain.block == 0 and torch.equal(plain.dequantize(), layer.dequantize())
    x = torch.randn(rows, 2, 128)
    weight = layer.dequantize().double()
    expected = F.linear(x.double(), weight, b.double())
    y = plain(x)  # in float32
    assert y.shape == (rows, 2, 100) and torch.allclose(y.double(), expected, atol=1e-4, rtol=1e-5)
    # PyTorch's kernel over its own layout rounds each activation and each product (before the bias)
    # to bfloat16: within half a bfloat16 step (2^-9 relative) of each.
    y = layer(x)
    product = expected - b.double()
    bound = (x.abs().double() @ weight.abs().T + product.abs()) * 2**-9 * 1.05 + 1e-5
    assert y.shape == (rows, 2, 100)
    assert bool(((y.double() - expected).abs() <= bound).all()), float(((y.double() - expected).abs() / bound).max())


def test_int4_embedding_rows_and_tied_head_use_the_same_codes():
    w, _ = _layer(out_features=50257 // 200 * 2, in_features=64)  # an odd-sized vocabulary: padded rows
    emb = use_kernels(Int4Embedding.from_float(w, group_size=32), "torch")  # PyTorch's layout and kernel
    assert emb.block > 0
    ids = torch.tensor([[0, 15, w.shape[0] - 1], [16, 31, 32]])  # low and high nibbles of a block, and the next
    assert torch.equal(emb(ids), emb.dequantize()[ids])
    x = torch.randn(2, 3, 64)
    logits = emb.project(x)
    assert logits.shape == (2, 3, w.shape[0])  # the padding rows are cut off, never sampled
    expected = x.double() @ emb.dequantize().double().T
    bound = (x.abs().double() @ emb.dequantize().abs().double().T + expected.abs()) * 2**-9 * 1.05 + 1e-5
    assert bool(((logits.double() - expected).abs() <= bound).all())


def test_int4_layers_follow_dtype_casts_and_loaded_state():
    w, b = _layer(out_features=64, in_features=64)
    layer = Int4Linear.from_float(w, b, group_size=32)
    x = torch.randn(3, 64)
    before = layer(x)
    other = Int4Linear.from_float(3 * w, b, group_size=32)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x)) and not torch.equal(layer(x), before)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        layer.to(dtype)
        assert layer.scales_and_zeros.dtype == torch.bfloat16  # what the kernel reads, whatever the model's
        assert layer.dequantize().dtype == dtype and layer(x.to(dtype)).dtype == dtype


@pytest.mark.parametrize("route", ["native", "torch"])
def test_int4_model_follows_its_dequantized_weights_and_generates(tiny_dir, route):
    q = use_kernels(quantize(load_model(tiny_dir), "int4", head="int4"), route)
    assert is_quantized(q) and q.wte.weight.shape == (50304, 32)  # 64 wide, two codes a byte; 50257 padded
    reference = load_model(tiny_dir)  # float, with every quantized weight put back as the float it stands for
    with torch.no_grad():
        for name, module in q.named_modules():
            if isinstance(module, Int4Linear):
                reference.get_submodule(name).weight.copy_(module.dequantize())
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected = q(ids), reference(ids)
    assert logits.shape == expected.shape == (2, 12, 50257)
    # What differs is the activations' rounding: PyTorch's kernel's bfloat16, 2^-9 of each value; gpt2lite's
    # int8 in blocks of 32, up to 1/254 of the block's largest (more where a block holds an outlier channel).
    bound = 0.02 if route == "torch" or q.h[0].mlp.c_fc.block else 0.05
    assert float((logits - expected).abs().max()) < bound * float(expected.std())
    greedy = generate(q, ids, max_new_tokens=8, temperature=0, ignore_eos=True)
    assert torch.equal(greedy, generate(reference, ids, max_new_tokens=8, temperature=0, ignore_eos=True))
    sampled = generate(q, ids, max_new_tokens=6, temperature=1.0, top_k=20, seed=1, ignore_eos=True)
    assert sampled.shape == (2, 18) and int(sampled.max()) < 50257


def test_int4_keeps_the_lm_head_in_int8_unless_asked(tiny_dir):
    q = load_model(tiny_dir, quantize="int4")
    assert isinstance(q.wte, Int8Embedding)
    assert {type(m) for m in q.h.modules() if isinstance(m, (Int4Linear, Int8Linear, torch.nn.Linear))} == {Int4Linear}
    ids = torch.tensor([[464, 3290, 318, 257]])
    with torch.no_grad():
        logits = q(ids)
        rounded = use_kernels(quantize(load_model(tiny_dir), "int4", head="int4"), "torch")(ids)
    # PyTorch's int4 kernel's logits are bfloat16 values; the int8 head's are not.
    assert torch.equal(rounded, rounded.bfloat16().float())
    assert not torch.equal(logits, logits.bfloat16().float())
    assert quantize(GPT2.from_pretrained(tiny_dir, dtype="bfloat16"), "int4")(ids).dtype == torch.bfloat16


def test_int4_refuses_what_it_cannot_hold(tiny_dir):
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128, 256\)"):
        quantize(load_model(tiny_dir), "int4", group_size=48)
    with pytest.raises(ValueError, match=r"group_size must be one of"):
        Int4Linear.from_float(torch.randn(64, 96), group_size=48)
    with pytest.raises(ValueError, match=r"multiple of group_size=128; this model has \[64\]: quantize it with "
                                         r"gpt2lite.quantize\(model, 'int4', group_size=64\)"):
        quantize(load_model(tiny_dir), "int4", group_size=128)
    with pytest.raises(ValueError, match=r"this layer has \[80\]: no group size int4 takes .* divides them; use int8"):
        Int4Linear.from_float(torch.randn(64, 80))
    with pytest.raises(ValueError, match="int4 settings"):
        quantize(load_model(tiny_dir), "int8", group_size=32)
    w, _ = _layer(out_features=64, in_features=64)
    w[3, 5] = float("inf")
    with pytest.raises(NonFiniteError, match="int8 and int4 cannot represent"):
        Int4Linear.from_float(w)


@pytest.mark.parametrize("mode", ["int8", "int4"])  # int4 keeps its tied head in int8
def test_weights_loaded_into_a_quantized_model_are_the_ones_it_runs(tiny_dir, mode):
    """load_state_dict copies in place: fbgemm's packed copy of the old weights must not be read after it."""
    source = load_model(tiny_dir, quantize=mode)
    other = GPT2.from_pretrained(tiny_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.5)  # other weights, same shapes
    ids = torch.tensor([[5, 17, 3, 99, 2048, 7]])
    for assign in (False, True):  # copied in place, or the loaded tensors themselves
        target = quantize(copy.deepcopy(other), mode)
        assert not torch.equal(target(ids), source(ids))
        target.load_state_dict(source.state_dict(), assign=assign)
        assert torch.equal(target(ids), source(ids))
        assert torch.equal(generate(target, ids, max_new_tokens=8, temperature=0, ignore_eos=True),
                           generate(source, ids, max_new_tokens=8, temperature=0, ignore_eos=True))


@pytest.mark.slow
def test_a_bfloat16_int8_model_compiles(tiny_dir):
    """Inductor gives a bfloat16 int8 product to a kernel that needs the int8 weight in contiguous rows."""
    model = load_model(tiny_dir, quantize="int8", dtype="bfloat16")
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, Int8Linear))
    ids = torch.tensor([[5, 17, 3, 99, 2048, 7]])
    compiled = generate(model, ids, max_new_tokens=6, temperature=0, ignore_eos=True, compile=True)
    assert torch.equal(compiled, generate(model, ids, max_new_tokens=6, temperature=0, ignore_eos=True))
