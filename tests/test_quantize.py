"""int8 inference: layers against float references with error bounds from the scales, and the model end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2lite import TextGenerator, TrainConfig, generate, load_model, prepare_data, quantize, save_model, train
from gpt2lite.cli import QUANTIZE_CHOICES, build_parser, main
from gpt2lite.transforms.quantize import QUANTIZE_MODES, Int8Embedding, Int8Linear, is_quantized


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
    q = load_model(tiny_dir, quantize="int8")
    with pytest.raises(ValueError, match="compile=True cannot trace the CPU int8 kernel"):
        generate(q, torch.tensor([[1, 2, 3]]), max_new_tokens=2, compile=True)


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
    with pytest.raises(SystemExit) as exc:
        main(["generate", "Hi", "--model", str(tiny_dir), "--quantize", "int4"])
    assert exc.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err
