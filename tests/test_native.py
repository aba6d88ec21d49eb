"""gpt2lite's compiled CPU kernels: each against an emulation of its own rounding, whole models, builds, fallback."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2lite import generate, load_model
from gpt2lite.cli import build_parser
from gpt2lite.errors import NonFiniteError
from gpt2lite.transforms import native
from gpt2lite.transforms.native import NativeKernels, load_kernels, use_kernels
from gpt2lite.transforms.packed import PackedEmbedding, PackedLinear
from gpt2lite.transforms.quantize import Int4Linear, Int8Linear

FEATURES = native.cpu_features()
ISAS = [isa for isa, need in (("avx2", {"avx2", "fma", "f16c"}),
                              ("avx512", {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}))
        if need <= FEATURES and platform.machine().lower() in ("x86_64", "amd64")]
# Decided without building (collection runs before conftest moves the cache to a temporary folder).
needs_kernels = pytest.mark.skipif(not ISAS or not (shutil.which("gcc") or shutil.which("cc")),
                                   reason="no kernels can be built here")


def _kernels(isa: str) -> NativeKernels:
    kernels = load_kernels(isa=isa)
    assert kernels is not None and kernels.isa == isa
    return kernels


def _int8_emulation(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The int8 kernel's own rounding, step by step in float32, its integer dot in float64 (exact below 2**53)."""
    amax = x.abs().amax(-1, keepdim=True)  # (M, 1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))  # float32 division, as the kernel's
    xq = (x * inv).round()  # ties to even, as cvtps2dq
    dot = (xq.double() @ q.double().T).float()  # (M, N): exact integers, then one rounding to float32
    y = dot * ((amax / 127) * scale)  # each a float32 product
    return y if bias is None else y + bias


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("rows", "out", "inp"), [(1, 1000, 768), (3, 37, 64), (1, 5, 3072), (2, 2304, 128)])
def test_float32_kernel_equals_the_float64_product_within_its_summation_order(isa, rows, out, inp):
    g = torch.Generator().manual_seed(rows * out)
    x, w, b = torch.randn(rows, inp, generator=g), torch.randn(out, inp, generator=g), torch.randn(out, generator=g)
    exact = x.double() @ w.double().T  # (rows, out)
    # float32 sums of `inp` products: each rounding within 2**-24 of the running sum's size.
    bound = inp * 2**-23 * (x.double().abs() @ w.double().abs().T) + 1e-6
    for bias in (None, b):
        y = _kernels(isa).linear_f32(x, w, bias)
        want = exact if bias is None else exact + b.double()
        assert y.dtype == torch.float32 and y.shape == (rows, out)
        assert bool(((y.double() - want).abs() <= bound + (0 if bias is None else 1e-6 * b.abs().double())).all())
    assert torch.equal(_kernels(isa).linear_f32(x[0], w, b), _kernels(isa).linear_f32(x[:1], w, b)[0])  # 1-D rows


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("rows", "out", "inp"), [(1, 1000, 768), (3, 37, 64), (1, 5, 3072), (4, 300, 192)])
def test_int8_kernel_equals_the_emulation_of_its_rounding_exactly(isa, rows, out, inp):
    g = torch.Generator().manual_seed(rows + out)
    x = torch.randn(rows, inp, generator=g) * 3
    if rows > 2:
        x[1] = 0  # a zero row: scale 0, outputs the bias
        x[2, :8] = torch.tensor([127.0, 0.5, -0.5, 1.5, -2.5, 63.5, -127.0, 0.0])  # ties, rounded to even
    q = torch.randint(-127, 128, (out, inp), generator=g, dtype=torch.int8)
    scale, bias = torch.rand(out, generator=g) / 100, torch.randn(out, generator=g)
    for b in (None, bias):
        assert torch.equal(_kernels(isa).linear_int8(x, q, scale, b), _int8_emulation(x, q, scale, b))


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
def test_int8_kernel_gives_nan_rows_for_non_finite_input_or_refuses_them(isa):
    x = torch.randn(2, 64)
    x[1, 3] = float("inf")
    q, scale = torch.ones(10, 64, dtype=torch.int8), torch.ones(10)
    y = _kernels(isa).linear_int8(x, q, scale, None)
    assert torch.equal(y[0], _int8_emulation(x[:1], q, scale, None)[0]) and bool(y[1].isnan().all())
    with pytest.raises(NonFiniteError, match="overflowed"):
        _kernels(isa).linear_int8(x, q, scale, None, check=True)


def _int4_emulation(x: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor, bias: torch.Tensor | None, out: int,
                    group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 kernel's rounding in float64: its int8 activations (blocks of 32) and float32 scale products
    exactly, its sums exact; with the bound that float32 summation in the kernel's order can add."""
    M, K = x.shape
    blocks = x.view(M, K // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)  # (M, B, 1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))  # float32 division, as the kernel's
    xq = (blocks * inv).round()  # (M, B, 32): ties to even, as cvtps2dq
    xs = torch.where(amax > 0, amax / 127, torch.zeros(()))[..., 0]  # (M, B) float32
    c = codes[:out].to(torch.int32)
    nibbles = torch.stack([c & 15, c >> 4], -1).view(out, K // 32, 32).double()  # (N, B, 32): input order
    idot = torch.einsum("mbk,nbk->mnb", xq.double(), nibbles)  # exact integers
    scale, zero = sz[:, :out, 0].float().T, sz[:, :out, 1].float().T  # (N, G) each
    per = group // 32
    d = scale.repeat_interleave(per, dim=1)[None] * xs[:, None, :]  # (M, N, B): float32 products
    block_sums = xs * xq.sum(-1)  # (M, B): float32 products
    sums = torch.zeros(M, K // group)  # (M, G): float32 running sums over each group's blocks
    for b in range(K // 32):
        sums[:, b // per] += block_sums[:, b]
    main = d.double() * idot  # (M, N, B)
    offsets = (zero[None].double() - 8 * scale[None].double()) * sums[:, None].double()  # (M, N, G)
    y = main.sum(-1) + offsets.sum(-1)
    terms = main.abs().sum(-1) + ((zero.abs()[None] + 8 * scale.abs()[None]) * sums.abs()[:, None]).double().sum(-1)
    bound = (K // 32 + 2 * K // group + 2) * 2**-23 * terms + 1e-7
    if bias is not None:
        y, bound = y + bias.double(), bound + 2**-23 * bias.abs().double()
    return y, bound


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("rows", "out", "inp", "group"),
                         [(1, 1000, 768, 32), (3, 37, 64, 64), (2, 70, 3072, 128), (6, 64, 256, 256), (5, 40, 128, 32)])
def test_int4_kernel_equals_the_emulation_of_its_rounding(isa, rows, out, inp, group):
    g = torch.Generator().manual_seed(out + group)
    x = torch.randn(rows, inp, generator=g) * 3
    x[0, 5] = 40.0  # an outlier channel: its block's scale
    if rows > 2:
        x[1, :32] = 0  # a zero block: scale 0
        x[2, :8] = torch.tensor([127.0, 0.5, -0.5, 1.5, -2.5, 63.5, -127.0, 0.0])  # ties, rounded to even
    padded = -(-out // 64) * 64
    codes = torch.randint(0, 256, (padded, inp // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    sz = (torch.rand(padded, inp // group, 2, generator=g) - 0.5).bfloat16().transpose(0, 1)  # rows of (s, z)
    bias = torch.randn(out, generator=g)
    for b in (None, bias):
        y = _kernels(isa).linear_int4(x, codes, sz, b, out, group)
        want, bound = _int4_emulation(x, codes, sz, b, out, group)
        assert y.shape == (rows, out) and bool(((y.double() - want).abs() <= bound).all())
    one = _kernels(isa).linear_int4(x[:1], codes, sz, bias, out, group)  # a row alone: its batch's row
    assert torch.equal(one, _kernels(isa).linear_int4(x, codes, sz, bias, out, group)[:1])
    x[0, 7] = float("nan")
    y = _kernels(isa).linear_int4(x, codes, sz, bias, out, group)
    assert bool(y[0].isnan().all()) and not bool(y[1:].isnan().any())
    if inp > group:  # (with one group the two layouts are the same)
        with pytest.raises(ValueError, match="stored row after row"):
            _kernels(isa).linear_int4(x, codes, sz.contiguous(), bias, out, group)  # PyTorch's (G, N, 2) layout


@needs_kernels
def test_int4_layers_take_the_kernel_by_default_and_pytorch_s_layout_when_told(monkeypatch):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(100, 128, generator=g), torch.randn(100, generator=g)
    layer = Int4Linear.from_float(w.T.contiguous().T, b, group_size=32)  # a Conv1D's transposed weight
    codes, x = layer.dequantize(), torch.randn(3, 1, 128, generator=g)
    assert layer.block == 0 and layer.weight.is_contiguous() and layer.scales_and_zeros.transpose(0, 1).is_contiguous()
    y = layer(x)
    kernel = load_kernels().linear_int4(x.view(3, 128), layer.weight, layer.scales_and_zeros, layer.bias, 100, 32)
    assert torch.equal(y, kernel.view(3, 1, 100))
    use_kernels(layer, "torch")
    assert layer.block > 0 and layer.scales_and_zeros.is_contiguous() and torch.equal(layer.dequantize(), codes)
    monkeypatch.setattr(NativeKernels, "linear_int4", lambda *a, **k: pytest.fail("the kernel ran"))
    theirs = layer(x)  # bfloat16 activations and outputs: close to, not equal to, the kernel's
    assert not torch.equal(theirs, y) and torch.allclose(theirs, y, atol=0.02 * float(y.abs().max()))
    monkeypatch.undo()
    use_kernels(layer, "native")
    assert layer.block == 0 and torch.equal(layer.dequantize(), codes) and torch.equal(layer(x), y)


@needs_kernels
def test_int4_model_logits_are_within_int4_rounding_of_transformers_on_both_routes(tiny_dir, hf_tiny, monkeypatch):
    calls = []
    real = NativeKernels.linear_int4
    monkeypatch.setattr(NativeKernels, "linear_int4", lambda self, *a: calls.append(1) or real(self, *a))
    ids = torch.tensor([[464, 3290, 318, 257, 50, 1000]])
    with torch.no_grad():
        want = hf_tiny(ids).logits
        ours = load_model(tiny_dir, quantize="int4")
        theirs = load_model(tiny_dir, quantize="int4", kernels="torch")
        a, b = ours(ids), theirs(ids)
    assert calls and all(m.block == 0 for m in ours.modules() if isinstance(m, Int4Linear))
    assert all(m.block > 0 for m in theirs.modules() if isinstance(m, Int4Linear))
    # 4-bit weights move random weights' logits by about an eighth of their spread (0.12 here, both routes);
    # the routes share the codes and differ only in rounding the activations (int8 blocks, bfloat16).
    spread = float(want.std())
    assert (a - want).abs().max() < 0.2 * spread and (b - want).abs().max() < 0.2 * spread
    assert (a - b).abs().max() < 0.05 * spread
    steps = generate(ours, ids, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert steps.shape == (1, 18) and torch.equal(steps[:, :6], ids)


@needs_kernels
@pytest.mark.parametrize(("rows", "heads", "slots", "head_size"), [(1, 12, 37, 64), (3, 2, 1, 8), (2, 4, 300, 256)])
def test_one_row_attention_equals_the_float64_softmax_over_strided_cache_views(rows, heads, slots, head_size):
    g = torch.Generator().manual_seed(slots)
    cache = torch.randn(2, rows + 1, heads, slots + 5, head_size, generator=g) * 2  # (k/v, B+1, H, max, D)
    k, v = cache[0, 1:, :, :slots], cache[1, 1:, :, :slots]  # (B, H, S, D) views, as the cache hands them out
    q = torch.randn(rows, 1, heads, head_size, generator=g).transpose(1, 2)  # (B, H, 1, D), not contiguous
    scale = 1 / head_size**0.5
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale  # (B, H, 1, S)
    want = torch.softmax(scores, -1) @ v.double()  # (B, H, 1, D)
    y = native.one_row_attention(q, k, v, scale)
    assert y is not None and y.shape == (rows, heads, 1, head_size)
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)
    assert native.one_row_attention(q.double(), k.double(), v.double(), scale) is None  # float32 only
    assert native.one_row_attention(q[..., :6], k[..., :6], v[..., :6], scale) is None  # head size 6: SDPA


@needs_kernels
def test_int8_layers_take_the_kernel_by_default_and_fbgemm_when_told(monkeypatch):
    g = torch.Generator().manual_seed(0)
    layer = Int8Linear.from_float(torch.randn(96, 128, generator=g), torch.randn(96, generator=g))
    x = torch.randn(2, 1, 128, generator=g)
    y = layer(x)
    assert torch.equal(y, _int8_emulation(x.view(2, 128), layer.weight, layer.scale, layer.bias).view(2, 1, 96))
    use_kernels(layer, "torch")
    monkeypatch.setattr(NativeKernels, "linear_int8", lambda *a, **k: pytest.fail("the kernel ran"))
    fbgemm = layer(x)  # one activation scale for the whole call, 7-bit: close to, not equal to, the kernel's
    assert not torch.equal(fbgemm, y) and torch.allclose(fbgemm, y, atol=0.05 * float(y.abs().max()))
    with pytest.raises(ValueError, match="kernels must be one of"):
        use_kernels(layer, "fast")


@needs_kernels
@pytest.mark.parametrize("route", ["block", "layers"])
def test_float32_model_with_the_kernel_keeps_transformers_greedy_tokens(tiny_dir, hf_tiny, monkeypatch, route):
    calls, attended, blocks = [], [], []
    real, attend, block = NativeKernels.linear_f32, NativeKernels.attend_one_row, NativeKernels.block_step
    monkeypatch.setattr(NativeKernels, "linear_f32", lambda self, *a: calls.append(1) or real(self, *a))
    monkeypatch.setattr(NativeKernels, "attend_one_row", lambda self, *a: attended.append(1) or attend(self, *a))
    monkeypatch.setattr(NativeKernels, "block_step", lambda self, *a: blocks.append(1) or block(self, *a))
    model = load_model(tiny_dir)  # the default: one-row products through gpt2lite's kernel, chosen by rule
    assert all(m.one_row == "native" and m.kernels == "native"
               for m in model.modules() if isinstance(m, (PackedLinear, PackedEmbedding)))
    if route == "layers":  # the blocks as written, each product and attention through its own kernel
        for b in model.h:
            b.decode_step = None
    ids = torch.tensor([[464, 3290, 318, 257]])
    ours = generate(model, ids, max_new_tokens=24, temperature=0, ignore_eos=True)
    theirs = hf_tiny.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                              pad_token_id=50256)
    assert torch.equal(ours, theirs)
    if route == "block":  # 23 one-row steps: each of the 2 blocks in one call, the head's product
        assert len(blocks) == 23 * 2 and len(calls) >= 23 and not attended
    else:  # 23 one-row steps of 2 layers x 4 products + head, and each step's attention in each layer
        assert not blocks and len(calls) >= 23 * 9 and len(attended) == 23 * 2
    with torch.no_grad():
        step = torch.tensor([[50, 7]])
        assert torch.allclose(model(step[:, :1]), hf_tiny(step[:, :1]).logits, atol=1e-4)


@needs_kernels
def test_int8_model_logits_are_within_int8_rounding_of_transformers_and_the_torch_route(tiny_dir, hf_tiny):
    ids = torch.tensor([[464, 3290, 318, 257, 50, 1000]])
    with torch.no_grad():
        want = hf_tiny(ids).logits[:, -1]
        ours = load_model(tiny_dir, quantize="int8")
        fbgemm = load_model(tiny_dir, quantize="int8", kernels="torch")
        a = generate(ours, ids, max_new_tokens=12, temperature=0, ignore_eos=True)
        b = generate(fbgemm, ids, max_new_tokens=12, temperature=0, ignore_eos=True)
        last_ours, last_torch = ours(ids)[:, -1], fbgemm(ids)[:, -1]
    spread = float(want.std())
    assert (last_ours - want).abs().max() < 0.1 * spread and (last_torch - want).abs().max() < 0.1 * spread
    assert a.shape == b.shape == (1, 18)


def test_forced_fallback_runs_no_kernel_and_the_flag_reaches_the_model(tiny_dir, monkeypatch):
    monkeypatch.setattr(NativeKernels, "linear_f32", lambda *a, **k: pytest.fail("the float32 kernel ran"))
    monkeypatch.setattr(NativeKernels, "linear_int8", lambda *a, **k: pytest.fail("the int8 kernel ran"))
    monkeypatch.setattr(NativeKernels, "attend_one_row", lambda *a, **k: pytest.fail("the attention kernel ran"))
    ids = torch.tensor([[464, 3290, 318]])
    for quantize in (None, "int8"):
        model = load_model(tiny_dir, quantize=quantize, kernels="torch")
        out = generate(model, ids, max_new_tokens=5, temperature=0, ignore_eos=True)
        assert out.shape == (1, 8)
    assert load_model(tiny_dir, kernels="torch").wte.one_row in ("mkl", "onednn")  # measured, as before
    assert build_parser().parse_args(["generate", "x", "--kernels", "torch"]).kernels == "torch"
    assert build_parser().parse_args(["generate", "x"]).kernels == "native"
    with pytest.raises(ValueError, match="kernels must be one of"):
        load_model(tiny_dir, kernels="fast")


def test_without_a_compiler_the_layers_take_pytorch_routes_after_one_info_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no gcc, no cc
    with caplog.at_level(logging.INFO, logger="gpt2lite.transforms.native"):
        assert load_kernels(tmp_path / "cache") is None
        assert load_kernels(tmp_path / "cache") is None  # decided once per process: no second line
    lines = [r for r in caplog.records if r.name == "gpt2lite.transforms.native"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "no C compiler" in lines[0].getMessage()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("why", ["machine", "features"])
def test_other_cpus_fall_back_with_one_info_line(tmp_path, monkeypatch, caplog, why):
    if why == "machine":
        monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    else:
        monkeypatch.setattr(native, "cpu_features", lambda: frozenset({"sse2", "avx"}))
    with caplog.at_level(logging.INFO, logger="gpt2lite.transforms.native"):
        assert load_kernels(tmp_path) is None
    message = caplog.records[-1].getMessage()
    assert ("aarch64" in message) if why == "machine" else ("lacks avx2, f16c, fma" in message)


def test_a_failed_build_falls_back(tmp_path, monkeypatch, caplog):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    if not ISAS:
        pytest.skip("no kernels can be built here")
    with caplog.at_level(logging.INFO, logger="gpt2lite.transforms.native"):
        assert load_kernels(tmp_path / "cache", isa=ISAS[0]) is None
    assert "the build failed" in caplog.records[-1].getMessage()


@needs_kernels
@pytest.mark.parametrize("damage", ["garbage", "truncated", "symlink", "fifo", "foreign"])
def test_a_damaged_cached_library_is_built_again(tmp_path, damage):
    kernels = native._build_and_load(tmp_path, FEATURES, ISAS[0])
    path = kernels.path
    good = path.read_bytes()
    path.unlink()
    if damage == "garbage":
        path.write_bytes(b"\x7fELF" + os.urandom(5000))
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 3])
    elif damage == "symlink":
        path.symlink_to("/dev/zero")
    elif damage == "fifo":
        os.mkfifo(path)
    else:  # a whole library, but another build's (its key differs)
        subprocess.run(["gcc", *native.FLAGS, "-DGL_KEY=UINT64_C(7)", "-o", str(path), str(native.SOURCE)], check=True)
    again = native._build_and_load(tmp_path, FEATURES, ISAS[0])
    assert again is not None and path.is_file() and not path.is_symlink()
    x, w = torch.randn(1, 64), torch.randn(9, 64)
    assert torch.allclose(again.linear_f32(x, w, None), x @ w.T, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


_BUILD = """
import sys
from gpt2lite.transforms.native import load_kernels
kernels = load_kernels(sys.argv[1])
print("built" if kernels is not None else "none", kernels.path if kernels else "")
"""


@needs_kernels
def test_two_processes_building_at_once_both_get_a_whole_library(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(native.__file__).parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert [out.split()[0] for out, _ in outs] == ["built", "built"]
    assert outs[0][0].split()[1] == outs[1][0].split()[1]
    assert len(list(tmp_path.iterdir())) == 1  # one library, no temporary file left


@needs_kernels
@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_a_compiled_step_calls_the_kernels_inside_its_graph(tiny_dir, monkeypatch, quantize):
    """compile=True traces gpt2lite::native_linear_* into the graph: each one-row product still runs the kernel."""
    model = load_model(tiny_dir, quantize=quantize)
    ids = torch.tensor([[5, 17, 3, 99, 2048, 7]])
    eager = generate(model, ids, max_new_tokens=10, temperature=0, ignore_eos=True, return_dict=True)
    calls: list[int] = []
    name = f"linear_{quantize}" if quantize else "linear_f32"
    real = getattr(NativeKernels, name)
    monkeypatch.setattr(NativeKernels, name, lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    compiled = generate(model, ids, max_new_tokens=10, temperature=0, ignore_eos=True, return_dict=True,
                        compile=True)
    # 9 one-token steps of 2 layers x 4 products and the head (at least; int4 keeps its head in int8)
    assert len(calls) >= 9 * (2 * 4 + (quantize != "int4"))
    assert compiled.sequences.tolist() == eager.sequences.tolist()
    assert torch.allclose(compiled.logprobs, eager.logprobs, atol=1e-2 if quantize else 1e-4)


def test_settings_files_that_are_not_regular_files_are_refused_unopened(tmp_path):
    from gpt2lite.errors import CheckpointError
    from gpt2lite.io.files import read_json

    os.mkfifo(tmp_path / "config.json")  # opening it would block until a writer came
    (tmp_path / "zero.json").symlink_to("/dev/zero")  # reading it would never end
    for name in ("config.json", "zero.json"):
        with pytest.raises(CheckpointError, match="is not a regular file"):
            read_json(tmp_path / name)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("rows", "out", "inp"), [(1, 1000, 768), (3, 37, 64), (8, 5, 3072)])
def test_float16_weight_kernel_equals_the_float64_product_of_the_rounded_weights(isa, rows, out, inp):
    g = torch.Generator().manual_seed(out)
    x, b = torch.randn(rows, inp, generator=g), torch.randn(out, generator=g)
    w = torch.randn(out, inp, generator=g).half()
    exact = x.double() @ w.double().T + b.double()  # every float16 is exactly a float64
    bound = inp * 2**-23 * (x.double().abs() @ w.double().abs().T) + 1e-5 * (1 + b.double().abs())
    assert bool(((_kernels(isa).linear_f16(x, w, b).double() - exact).abs() <= bound).all())


@needs_kernels
def test_f16_model_equals_transformers_with_float16_rounded_weights(tiny_dir, hf_tiny, monkeypatch):
    """quantize="f16": every weight rounded to float16, products in float32; the oracle has the same weights."""
    import copy as copy_module

    from gpt2lite.transforms.quantize import Float16Embedding, Float16Linear

    calls = []
    real = NativeKernels.linear_f16
    monkeypatch.setattr(NativeKernels, "linear_f16", lambda self, *a: calls.append(1) or real(self, *a))
    model = load_model(tiny_dir, quantize="f16")
    assert isinstance(model.wte, Float16Embedding) and isinstance(model.h[0].mlp.c_fc, Float16Linear)
    assert model.h[0].mlp.c_fc.weight.dtype == torch.float16
    oracle = copy_module.deepcopy(hf_tiny)
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if p.dim() == 2 and "wpe" not in name:  # the linear weights and the tied embedding; positions stay
                p.copy_(p.half().float())
        ids = torch.tensor([[464, 3290, 318, 257, 50, 1000]])
        assert torch.allclose(model(ids), oracle(ids).logits, atol=1e-4)  # 6 rows: the widened weight
        one = torch.tensor([[464]])
        assert torch.allclose(model(one), oracle(one).logits, atol=1e-4) and calls  # 1 row: the kernel
    ours = generate(model, ids, max_new_tokens=16, temperature=0, ignore_eos=True)
    theirs = oracle.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                             pad_token_id=50256)
    assert torch.equal(ours, theirs)
    assert model.float().h[0].mlp.c_fc.weight.dtype == torch.float16  # a cast keeps the storage
    from gpt2lite import quantize

    with pytest.raises(ValueError, match="group_size and head are int4 settings"):
        quantize(load_model(tiny_dir), "f16", group_size=32)


@needs_kernels
def test_the_kernels_refuse_operands_they_would_misread():
    kernels = _kernels(ISAS[0])
    x, w = torch.randn(1, 64), torch.randn(8, 64)
    with pytest.raises(ValueError, match=r"contiguous torch\.float32"):
        kernels.linear_f32(x, w.T.contiguous().T, None)  # columns, not rows
    with pytest.raises(ValueError, match="multiple of 64"):
        kernels.linear_f32(x[:, :48], w[:, :48].contiguous(), None)
    with pytest.raises(ValueError, match=r"torch\.float16"):
        kernels.linear_f16(x, w, None)  # float32 read as float16
    with pytest.raises(ValueError, match="bias"):
        kernels.linear_f32(x, w, torch.randn(7))
    with pytest.raises(ValueError, match="one contiguous float32 scale"):
        kernels.linear_int8(x, w.to(torch.int8), torch.ones(8, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="attention kernel"):
        kernels.attend_one_row(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 4, 8), 1.0)


def _steps(model, ids: torch.Tensor, tokens: list[int]) -> tuple[list[torch.Tensor], object]:
    """Logits of a prompt and of each following one-token step, and the cache they leave."""
    with torch.inference_mode():
        state = model.new_state(ids.shape[0], 48)
        logits = [model.feed(ids, state)]
        for t in tokens:
            logits.append(model.feed(torch.full((ids.shape[0], 1), t), state))
    return logits, state


@needs_kernels
@pytest.mark.parametrize("quantize", [None, "f16", "int8", "int4"])
def test_the_block_kernel_equals_the_blocks_as_written(tiny_dir, monkeypatch, quantize):
    """One call a block at batch 1 gives the logits and the cache of the layer-by-layer route (same kernels)."""
    blocks = []
    real = NativeKernels.block_step
    monkeypatch.setattr(NativeKernels, "block_step", lambda self, *a: blocks.append(1) or real(self, *a))
    model = load_model(tiny_dir, quantize=quantize)
    ids, tokens = torch.tensor([[464, 3290, 318, 257, 50, 1000]]), [5, 9, 77, 1000, 3, 3]
    fused, fused_state = _steps(model, ids, tokens)
    assert len(blocks) == len(tokens) * len(model.h)  # the prompt ran as written; each step in the kernel
    for b in model.h:
        b.decode_step = None
    written, written_state = _steps(model, ids, tokens)
    assert len(blocks) == len(tokens) * len(model.h)
    for a, b in zip(fused, written, strict=True):  # float32 rounding apart (LayerNorm's, GELU's sums)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    for a, b in zip(fused_state.k + fused_state.v, written_state.k + written_state.v, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_the_block_kernel_leaves_batches_gradients_and_adapters_to_the_blocks_as_written(tiny_dir, monkeypatch):
    from gpt2lite import LoraConfig, add_lora

    monkeypatch.setattr(NativeKernels, "block_step", lambda *a, **k: pytest.fail("the block kernel ran"))
    model = load_model(tiny_dir)
    _steps(model, torch.tensor([[464, 3290], [318, 257]]), [5, 9])  # two rows
    state = model.new_state(1, 8)
    model.feed(torch.tensor([[464]]), state)  # gradients on: the blocks as written (autograd sees every step)
    model.feed(torch.tensor([[5]]), state)
    add_lora(model, LoraConfig(r=2, target_modules=("c_attn",)))
    _steps(model, torch.tensor([[464, 3290]]), [5, 9])  # a LoRA-wrapped layer: the kernel does not read it
    _steps(use_kernels(load_model(tiny_dir), "torch"), torch.tensor([[464, 3290]]), [5, 9])  # forced fallback
