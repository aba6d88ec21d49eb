"""Quantized inference: GPT-2's linear layers and tied embedding in int8 or int4.

``int8``: each weight row (one output channel) is stored as int8 with one float
scale, ``w ≈ q * scale`` with ``scale = max|w_row| / 127``: a quarter of
float32's bytes, which is what a bandwidth-bound decode step pays for.

How the product is computed depends on where it runs, because it was measured
rather than assumed (2-core AVX-512 CPU, GPT-2 124M, one decode step's matmuls):

- on the CPU with float32 activations, products of up to ``NATIVE_ROWS`` rows
  (decoding): gpt2lite's own int8 kernel (``transforms/native.py``), which
  rounds each activation row to int8 with its own scale and reads the weight
  rows one after another (124M step on a 2-core Zen 4 EPYC: 4.7 ms against
  fbgemm's 6.7), so a row's output never depends on its neighbours. With more
  rows (prompts, batches), or where the kernel cannot be built, or with
  ``kernels="torch"``: PyTorch's fbgemm ``linear_dynamic``
  kernel, which quantizes each call's activations to 7-bit unsigned integers
  (one scale per call) and multiplies in integers: 2.2 ms per token against
  9.4 ms in float32. The weight-only kernels PyTorch ships for the CPU were
  slower than float32 with float32 activations (``_weight_int8pack_mm``) or
  need bfloat16 activations. Because the activation scale is shared by the rows
  of one call, a row's output can move within that rounding with the rows
  batched beside it;
- elsewhere (CUDA, or other dtypes): weight-only, ``x @ q.T * scale`` with the
  activations kept in floating point.

``int4``: 4 bits per weight plus a bfloat16 scale and offset per
group of ``group_size`` inputs of each row, ``w ≈ (q - 8) * scale + zero`` with
``q`` in 0..15 (the min/max form gpt-fast and torchao use). On the CPU with
float32 activations, the product is gpt2lite's own int4 kernel
(``transforms/native.py``): the codes are kept as plain rows, two a byte, the
scales row after row, and each activation row is rounded to int8 in blocks of
32 inputs, a scale each (llama.cpp's q8_0 against its q4_0); 124M's step of 48
block products: 3.0 ms against 3.9 for PyTorch's kernel (one row), 13.0 against
10.5 (8 rows). With ``kernels="torch"`` (or where the kernels cannot be built) the
layer keeps PyTorch's layout and its
product is PyTorch's ``_weight_int4pack_mm_for_cpu`` with bfloat16 activations
and output (its float32 path is scalar code, 14 times slower): each activation
and each output is rounded to bfloat16 (8 significant bits), row by row, so a
row's output does not depend on its batch neighbours. Its kernel needs output
widths that are multiples of 16, so int4 layers are padded to a multiple of 64
rows (the LM head with ``head="int4"``: 50257 -> 50304, as nanoGPT pads its
vocabulary), and the padded outputs are cut off before anyone sees them, so
they are never sampled. By default the tied embedding / LM head stays int8 (see
``quantize``). Elsewhere the weight is dequantized for each product.

Training stays in floating point: ``train`` refuses a quantized model.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from gpt2lite.errors import NonFiniteError
from gpt2lite.models.gpt2 import GPT2
from gpt2lite.models.weights import own_memory
from gpt2lite.transforms.layers import linear_layers
from gpt2lite.transforms.native import OVERFLOWED as _OVERFLOWED
from gpt2lite.transforms.native import KernelRoute, NativeKernels, NativeOperands, kernels_for

__all__ = ["QUANTIZE_MODES", "Float16Embedding", "Float16Linear",
           "Int4Embedding", "Int4Linear", "Int8Embedding", "Int8Linear", "QuantizeMode",
           "is_quantized", "quantize"]

QuantizeMode = Literal["int8", "int4", "f16"]
QUANTIZE_MODES: tuple[str, ...] = get_args(QuantizeMode)

_NON_FINITE_WEIGHTS = ("hold NaN or inf values, which int8 and int4 cannot represent (a diverged training run?); "
                       "check the checkpoint")

# The activations fbgemm quantizes are kept to 7 bits: without VNNI (AVX2-only CPUs) its kernels
# add pairs of u8*s8 products in int16, which 8-bit activations could overflow; torch's own
# dynamic quantization does the same.
_REDUCE_RANGE = True
NATIVE_ROWS = 4  # up to this many rows: gpt2lite's int8 kernel; more: fbgemm (124M step, 8 rows: 11.1 ms against 7.5)


def _finite_float(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in float32; a non-finite one is refused (its scale would be inf and its row zeros)."""
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise NonFiniteError(f"the weights {_NON_FINITE_WEIGHTS}")
    return w


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 rows and their scales: ``weight ≈ q * scale[:, None]``; a non-finite weight is refused."""
    w = _finite_float(weight)
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127  # (out,)
    q = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)  # (out, in); one float temporary
    # In rows: GPT-2's Conv1D weights arrive transposed, and the quotient keeps their strides;
    # the weight-only kernel inductor picks for a bfloat16 model needs contiguous rows.
    return q.contiguous(), scale


def _pack_for_cpu(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> object | None:
    """fbgemm's prepacked weight for ``q`` (CPU), or None where this PyTorch build has no such kernel."""
    if q.device.type != "cpu":
        return None
    try:
        with warnings.catch_warnings():
            # PyTorch 2.13 deprecates building quantized tensors; its packed kernel is still the
            # fastest int8 product here. Without it, forward falls back to the weight-only path.
            warnings.simplefilter("ignore", UserWarning)
            zero = torch.zeros(q.shape[0], dtype=torch.long)
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
            return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float())
    except (RuntimeError, NotImplementedError, AttributeError):  # no quantized engine on this build or CPU
        return None


# `gpt2lite::int8_linear(x, weight, check)`: fbgemm's product as an op that torch.compile can
# trace. Dynamo cannot trace the packed-weight object itself, so the op is handed the layer's int8
# weight and finds the layer by the weight's address when it runs. The address is a graph input,
# not a constant: every int8 model of the same shapes shares one compiled graph.
_LAYERS: weakref.WeakValueDictionary[int, Int8Linear] = weakref.WeakValueDictionary()


def _layer(weight: torch.Tensor) -> Int8Linear:
    """The live layer whose int8 weight is ``weight``."""
    layer = _LAYERS.get(weight.data_ptr())
    if layer is None or layer._packed is None or layer.weight.data_ptr() != weight.data_ptr():
        raise RuntimeError("gpt2lite::int8_linear was handed a weight that belongs to no live int8 layer")
    return layer


if not hasattr(torch.ops.gpt2lite, "int8_linear"):  # an op is defined once per process (a reload must not redo it)
    _OPS = torch.library.Library("gpt2lite", "FRAGMENT")
    _OPS.define("int8_linear(Tensor x, Tensor weight, bool check) -> Tensor")
    _OPS.impl("int8_linear", lambda x, weight, check: _layer(weight)._fbgemm(x, check), "CPU")
    torch.library.register_fake(
        "gpt2lite::int8_linear", lambda x, weight, check: x.new_empty(*x.shape[:-1], weight.shape[0]), lib=_OPS
    )


class _WeightRows(nn.Module):
    """A linear layer whose ``weight`` is stored ``(out, in)``, as nn.Linear's: its widths and repr read off it."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def in_features(self) -> int:
        """Width of the input."""
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        """Width of the output."""
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_WeightRows):
    """A linear layer with an int8 weight ``(out, in)`` and one float scale per output channel."""

    kernels: KernelRoute = "native"  # float32 CPU products: gpt2lite's int8 kernel where built, else fbgemm

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Wrap an already quantized weight; ``Int8Linear.from_float`` quantizes one."""
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scale.shape != qweight.shape[:1]:
            raise ValueError("Int8Linear needs an int8 (out, in) weight and one scale per output row")
        self.register_buffer("weight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self._packed: object | None = None
        self._repack()

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """Quantize a float ``(out, in)`` weight row by row; scales and bias keep the weight's dtype."""
        q, scale = _quantize_rows(weight)
        return cls(q, scale.to(weight.dtype), None if bias is None else bias.detach().clone())

    def dequantize(self) -> torch.Tensor:
        """The float weight ``q * scale`` this layer stands for, ``(out, in)``."""
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` for ``x`` ``(..., in)``."""
        return self._product(x, check=False)

    def _product(self, x: torch.Tensor, *, check: bool) -> torch.Tensor:
        """``x @ W.T + b``; with ``check``, fbgemm's route refuses non-finite ``x`` first (it would make it finite)."""
        if x.device.type == "cpu" and x.dtype == torch.float32:
            kernels = self._native(x)
            if kernels is not None:
                if torch.compiler.is_compiling():
                    return torch.ops.gpt2lite.native_linear_int8(x, self.weight, self.scale, self.bias, check)
                return kernels.linear_int8(x, self.weight, self.scale, self.bias, check=check)
        if self._packed is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            if torch.compiler.is_compiling():
                return torch.ops.gpt2lite.int8_linear(x, self.weight, check)
            return self._fbgemm(x, check)
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)  # (..., out)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _native(self, x: torch.Tensor) -> NativeKernels | None:
        """gpt2lite's kernels, where they serve this product (float32 scales, a row count under ``NATIVE_ROWS``)."""
        if self.kernels != "native" or x.numel() > NATIVE_ROWS * x.shape[-1] or self.scale.dtype != torch.float32 \
                or (self.bias is not None and self.bias.dtype != torch.float32):
            return None
        kernels = kernels_for(self.kernels)
        return kernels if kernels is not None and kernels.fits(self.weight) else None

    def native_operands(self) -> NativeOperands | None:
        """What gpt2lite's kernels read for a one-row product (see ``native.block_step``), or None."""
        if self.kernels != "native" or self.scale.dtype != torch.float32 or not NativeKernels.fits(self.weight) \
                or (self.bias is not None and self.bias.dtype != torch.float32):
            return None
        return NativeOperands("int8", self.weight, self.bias, scale=self.scale)

    def _fbgemm(self, x: torch.Tensor, check: bool) -> torch.Tensor:
        """fbgemm's product with the packed weight (float32 CPU activations)."""
        if self._packed_from != self._weights_now():
            self._repack()  # new weights (load_state_dict, an edit): the packed copy holds the old ones
        if check and not bool(torch.isfinite(x).all()):
            raise NonFiniteError(_OVERFLOWED)
        try:
            return torch.ops.quantized.linear_dynamic(x, self._packed, _REDUCE_RANGE)
        except RuntimeError:  # fbgemm's own words for NaN input: "min should be less than or equal to max"
            if bool(torch.isfinite(x).all()):
                raise
            raise NonFiniteError(_OVERFLOWED) from None

    def _repack(self) -> None:
        self._packed = _pack_for_cpu(self.weight, self.scale, self.bias)
        self._packed_from = self._weights_now()
        self._register()

    def _weights_now(self) -> tuple[object, ...]:
        """Where the weight, scale and bias are and their version counters: any change moves one.

        In place (``load_state_dict``, an edit) moves a version counter; ``assign=True`` moves an
        address. Inference tensors keep no counter (-1): only a new tensor shows there. Read from
        ``_buffers`` directly: this runs before every product (0.5 us, against 5 through getattr).
        """
        b = self._buffers
        return tuple(None if t is None else (t.data_ptr(), -1 if t.is_inference() else t._version)
                     for t in (b["weight"], b["scale"], b["bias"]))

    def _register(self) -> None:
        """File this layer under its weight's address, where gpt2lite::int8_linear looks it up."""
        if self._packed is not None:
            _LAYERS[self.weight.data_ptr()] = self

    def __setstate__(self, state: dict) -> None:
        # A copy (deepcopy, pickle) has a weight of its own, at its own address, and a packed
        # copy of the same values: it is packed from these weights, not stale.
        super().__setstate__(state)
        self._packed_from = self._weights_now()
        self._register()

    def _apply(self, fn, recurse=True):  # nn.Module's signature
        # .to() / .cuda() move the buffers; the prepacked copy belongs to the old ones.
        out = super()._apply(fn, recurse)
        self._repack()
        return out


class Int8Embedding(Int8Linear):
    """A token embedding stored as ``Int8Linear`` rows: looked up by id, and used as the tied LM head."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The (dequantized) embedding rows of ``ids``: ``(*ids.shape, n_embd)``."""
        return self.weight[ids].to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``x @ E.T`` of hidden states ``(..., n_embd)`` against every embedding row.

        The CPU kernel turns NaN activations into finite numbers, so the final
        hidden states are checked here: once a value overflows, the residual
        stream keeps it to the end.
        """
        return self._product(x, check=True)


F16_NATIVE_ROWS = 8  # up to this many rows: gpt2lite's float16-weight kernel; more: the weight widened for F.linear


class Float16Linear(_WeightRows):
    """A linear layer whose ``(out, in)`` weight is stored in float16 (half of float32's bytes), used in float32."""

    kernels: KernelRoute = "native"  # float32 CPU products: gpt2lite's kernel where built, else F.linear

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Wrap a float16 ``(out, in)`` weight; ``Float16Linear.from_float`` rounds a float one."""
        super().__init__()
        if weight.dtype != torch.float16 or weight.dim() != 2:
            raise ValueError("Float16Linear needs a float16 (out, in) weight")
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", bias)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Float16Linear:
        """Round a float ``(out, in)`` weight to float16 (refused where it does not fit: |w| > 65504, NaN)."""
        w = _finite_float(weight)
        if bool((w.abs() > torch.finfo(torch.float16).max).any()):
            raise ValueError("the weights exceed float16's range (65504); use int8, which scales each row")
        return cls(w.half(), None if bias is None else bias.detach().clone())

    def dequantize(self) -> torch.Tensor:
        """The float32 weight this layer stands for (exact: every float16 is a float32), ``(out, in)``."""
        return self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` for ``x`` ``(..., in)``."""
        if x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() <= F16_NATIVE_ROWS * x.shape[-1] \
                and (self.bias is None or self.bias.dtype == torch.float32):
            kernels = kernels_for(self.kernels)
            if kernels is not None and kernels.fits(self.weight):
                if torch.compiler.is_compiling():
                    return torch.ops.gpt2lite.native_linear_f16(x, self.weight, self.bias)
                return kernels.linear_f16(x, self.weight, self.bias)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def native_operands(self) -> NativeOperands | None:
        """What gpt2lite's kernels read for a one-row product (see ``native.block_step``), or None."""
        if self.kernels != "native" or not NativeKernels.fits(self.weight) \
                or (self.bias is not None and self.bias.dtype != torch.float32):
            return None
        return NativeOperands("f16", self.weight, self.bias)

    def _apply(self, fn, recurse=True):  # nn.Module's signature
        # .to(dtype) / .float() cast every float buffer: the weight stays float16 (what this layer is).
        out = super()._apply(fn, recurse)
        self.weight = self.weight.half()
        return out


class Float16Embedding(Float16Linear):
    """A token embedding stored as ``Float16Linear`` rows: looked up by id, and used as the tied LM head."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The embedding rows of ``ids`` in float32: ``(*ids.shape, n_embd)``."""
        return self.weight[ids].float()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``x @ E.T`` of hidden states ``(..., n_embd)`` against every embedding row."""
        return super().forward(x)


INT4_GROUP_SIZE = 64  # inputs per scale/offset pair: 4 + 2 * 16 / 64 = 4.5 bits a weight
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what PyTorch's int4 CPU kernel accepts
_INT4_ROWS = 64  # the int4 layers' output widths are padded to a multiple of this


def _check_group_size(group_size: int, widths: set[int], what: str) -> None:
    """Refuse a group size the CPU kernel does not take, or one that does not divide every input width."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES} (the CPU kernel's), got {group_size!r}")
    uneven = sorted(w for w in widths if w % group_size)
    if uneven:
        fits = [g for g in INT4_GROUP_SIZES if all(w % g == 0 for w in widths)]
        # load_model and the CLI take the default group size: name the call that takes another.
        fix = (f"quantize it with gpt2lite.quantize(model, 'int4', group_size={max(fits)}), or use int8" if fits
               else f"no group size int4 takes ({', '.join(map(str, INT4_GROUP_SIZES))}) divides them; use int8")
        raise ValueError(f"int4 needs every input width to be a multiple of group_size={group_size}; "
                         f"this {what} has {uneven}: {fix}")


def _quantize_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes ``(out, in)`` int32 in 0..15 and ``(in / group_size, out, 2)`` bfloat16 scales and offsets.

    ``weight ≈ (q - 8) * scale + zero`` within each group of ``group_size`` inputs of a row; the
    codes are rounded against the bfloat16 scales and offsets (what the CPU kernel reads).
    """
    w = _finite_float(weight)
    out_features, in_features = w.shape
    groups = w.view(out_features, in_features // group_size, group_size)  # (out, G, gs)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)  # (out, G, 1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.bfloat16).tiny).bfloat16().float()
    zero = (low + 8 * scale).bfloat16().float()  # so that (q - 8) * scale + zero ≈ low + q * scale
    q = ((groups - zero) / scale + 8).round_().clamp_(0, 15).to(torch.int32).view(out_features, in_features)
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (G, out, 2)
    return q, scales_and_zeros.bfloat16()  # exact: the values are bfloat16 already


def _unpack_int4(packed: torch.Tensor, block: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The int32 codes ``(out, in)`` (or only ``rows``) of a packed int4 weight ``(out, in / 2)`` uint8.

    ``block == 0``: plain rows, two codes a byte (even input in the low nibble).
    ``block > 0``: the CPU kernel's layout, blocks of ``block`` output rows stored
    input-major, row ``r`` of a block in the low nibble and row ``r + block / 2``
    in the high one (on the AMD EPYC measured: blocks of 32, rows r and r + 16).
    """
    out_features, half_in = packed.shape
    rows = torch.arange(out_features, device=packed.device) if rows is None else rows
    if block == 0:
        picked = packed[rows].to(torch.int32)  # (R, in / 2)
        return torch.stack([picked & 15, picked >> 4], dim=-1).flatten(-2)  # (R, in)
    half = block // 2
    tiles = packed.view(out_features // block, 2 * half_in, half)  # (out / block, in, block / 2)
    within = rows % block
    picked = tiles[rows // block, :, within % half].to(torch.int32)  # (R, in)
    return (picked >> (4 * (within >= half)).unsqueeze(-1).to(torch.int32)) & 15


def _pack_int4(q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``q`` packed two codes a byte, and its layout (see ``_unpack_int4``).

    On the CPU the weight is packed by PyTorch's own int4 kernel, whose block of
    rows depends on the build and CPU; the layout is found by checking the packed
    bytes against ``q``, so the same bytes serve the kernel and the embedding
    lookup (one copy). Where the kernel is missing or its layout is not one of
    these, plain rows are kept and products dequantize.
    """
    if q.device.type == "cpu":
        try:
            packed = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        except (RuntimeError, AttributeError):  # no such kernel in this build
            packed = None
        if packed is not None and packed.shape == (q.shape[0], q.shape[1] // 2):
            for block in (32, 64, 16):
                if q.shape[0] % block == 0 and torch.equal(_unpack_int4(packed, block), q):
                    return packed, block
    return _pack_plain(q), 0


def _pack_plain(q: torch.Tensor) -> torch.Tensor:
    """``q`` ``(out, in)`` as plain rows, two codes a byte (even input in the low nibble): ``(out, in / 2)`` uint8."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).contiguous()  # a Conv1D's codes arrive transposed


class Int4Linear(nn.Module):
    """A linear layer with 4-bit weights and a bfloat16 scale and offset per group of inputs of each output row."""

    kernels: KernelRoute = "native"  # float32 CPU products: gpt2lite's int4 kernel where built, else PyTorch's

    def __init__(self, packed: torch.Tensor, block: int, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None,
                 out_features: int, group_size: int, dtype: torch.dtype = torch.float32) -> None:
        """Wrap an already packed weight (see ``_pack_int4``); ``Int4Linear.from_float`` quantizes one.

        ``dtype`` is the floating type of the model around it (what the dequantized weight is made in).
        """
        super().__init__()
        padded, half_in = packed.shape
        if packed.dtype != torch.uint8 or scales_and_zeros.shape != (2 * half_in // group_size, padded, 2) \
                or not 0 < out_features <= padded:
            raise ValueError("Int4Linear needs a uint8 (out, in / 2) weight and (in / group_size, out, 2) scales")
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.bfloat16())
        self.register_buffer("bias", bias)
        self.block = block
        self.group_size = group_size
        self.out_features = out_features
        self.dtype = dtype

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   group_size: int = INT4_GROUP_SIZE) -> Int4Linear:
        """Quantize a float ``(out, in)`` weight group by group (``group_size``: 32, 64, 128 or 256 inputs)."""
        out_features, in_features = weight.shape
        _check_group_size(group_size, {in_features}, "layer")
        padded = -(-out_features // _INT4_ROWS) * _INT4_ROWS
        # Padding rows are zeros, which dequantize to exactly 0 (code 0, offset 8 * scale).
        w = F.pad(weight.detach().float(), (0, 0, 0, padded - out_features))  # (padded, in)
        q, scales_and_zeros = _quantize_groups(w, group_size)
        bias = None if bias is None else bias.detach().clone()
        layer = cls(_pack_plain(q), 0, scales_and_zeros, bias, out_features, group_size, weight.dtype)
        layer.follow_route()  # PyTorch's layout, or the native kernel's
        return layer

    def _native(self) -> NativeKernels | None:
        """gpt2lite's kernels, where they serve this layer (the native route, a CPU weight, widths it takes)."""
        if self.kernels != "native" or self.weight.device.type != "cpu" or self.in_features % 64 \
                or self.group_size % 32 or (self.bias is not None and self.bias.dtype != torch.float32):
            return None
        return kernels_for(self.kernels)

    def native_operands(self) -> NativeOperands | None:
        """What gpt2lite's kernels read for a one-row product (see ``native.block_step``), or None."""
        if not self._native_layout() or self._native() is None or self.out_features != self.weight.shape[0]:
            return None
        return NativeOperands("int4", self.weight, self.bias, scales_and_zeros=self.scales_and_zeros,
                              group_size=self.group_size)

    def _native_layout(self) -> bool:
        """Whether the weight is laid out for the native kernel: plain rows, the scales row after row."""
        return self.block == 0 and self.weight.is_contiguous() and self.scales_and_zeros.transpose(0, 1).is_contiguous()

    def follow_route(self) -> None:
        """Lay the weight out for the product ``kernels`` picks: the native kernel's, or PyTorch's (same codes).

        Called when the route changes (``use_kernels``) and after construction; one
        layout at a time, so the codes are held once.
        """
        native = self._native() is not None
        if native == self._native_layout() and (native or self.block or self.weight.device.type != "cpu"):
            return
        q = _unpack_int4(self.weight, self.block)  # (padded, in) codes, whichever layout they are in
        if native:
            self.weight = _pack_plain(q)
            self.scales_and_zeros = self.scales_and_zeros.transpose(0, 1).contiguous().transpose(0, 1)
        else:
            self.weight, self.block = _pack_int4(q)
            self.scales_and_zeros = self.scales_and_zeros.contiguous()  # PyTorch's kernel reads (G, out, 2)
            return
        self.block = 0

    @property
    def in_features(self) -> int:
        """Width of the input."""
        return self.weight.shape[1] * 2

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight ``(q - 8) * scale + zero`` this layer stands for, ``(out, in)`` (or only ``rows``)."""
        rows = torch.arange(self.out_features, device=self.weight.device) if rows is None else rows
        q = _unpack_int4(self.weight, self.block, rows)  # (R, in)
        scale, zero = self.scales_and_zeros[:, rows].float().permute(2, 1, 0)  # (R, G) each
        groups = q.view(*q.shape[:-1], -1, self.group_size).float()  # (R, G, gs)
        weight = (groups - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)  # (R, G, gs)
        return weight.flatten(-2).to(self.dtype)  # (R, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` for ``x`` ``(..., in)``."""
        if x.dtype == torch.float32 and x.device.type == "cpu" and self._native_layout():
            kernels = self._native()
            if kernels is not None:
                if torch.compiler.is_compiling():
                    return torch.ops.gpt2lite.native_linear_int4(x, self.weight, self.scales_and_zeros, self.bias,
                                                                 self.out_features, self.group_size)
                return kernels.linear_int4(x, self.weight, self.scales_and_zeros, self.bias, self.out_features,
                                           self.group_size)
        if self.block and x.device.type == "cpu" and x.is_floating_point():
            # bfloat16 in and out: the kernel's float32 path is scalar code, 14x slower (768x50304, AVX2).
            rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (N, in): the kernel takes 2-D activations
            y = torch._weight_int4pack_mm_for_cpu(rows, self.weight, self.group_size,
                                                  self.scales_and_zeros)  # (N, padded out)
            y = y[:, :self.out_features].to(x.dtype).view(*x.shape[:-1], self.out_features)  # padding cut
        else:
            y = F.linear(x, self.dequantize().to(x.dtype))  # (..., out)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _apply(self, fn, recurse=True):  # nn.Module's signature
        # .to(dtype) / .half() cast every float buffer: the scales stay bfloat16 (the kernel reads
        # them so, and they hold bfloat16 values), and the cast names the model's new dtype.
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        out = super()._apply(fn, recurse)
        self.scales_and_zeros = self.scales_and_zeros.bfloat16()
        self.follow_route()  # moved to or from the CPU: the layout its products there take
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


class Int4Embedding(Int4Linear):
    """A token embedding stored as ``Int4Linear`` rows: looked up by id, and used as the tied LM head."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The (dequantized) embedding rows of ``ids``: ``(*ids.shape, n_embd)``."""
        return self.dequantize(ids.reshape(-1)).view(*ids.shape, self.in_features)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``x @ E.T`` of hidden states ``(..., n_embd)`` against every embedding row."""
        return super().forward(x)


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds quantized weights."""
    return any(isinstance(m, (Int8Linear, Int4Linear, Float16Linear)) for m in model.modules())


def quantize(model: nn.Module, mode: QuantizeMode = "int8", *, group_size: int | None = None,
             head: QuantizeMode | None = None) -> nn.Module:
    """Quantize a model's linear layers in place (a GPT-2's tied embedding / LM head too); return the model.

    Only inference: the result generates, streams, serves and scores like the
    float model, but does not train. For ``"int4"``, ``group_size`` (32, 64,
    128 or 256; default 64) is how many inputs share a scale, and the embedding
    / LM head is kept in int8 unless ``head="int4"``: the int4 kernel returns
    bfloat16, whose 8 significant bits would round GPT-2's logits (-30 to -130)
    to steps of 0.25 to 1, making ties of tokens that differ (llama.cpp's q4_0
    keeps its output matrix in 6 bits for the same reason). ``"f16"`` stores every
    weight, the embedding / LM head too, in float16 (half of float32's bytes) and
    multiplies in float32. Example::

        model = quantize(GPT2.from_pretrained("gpt2"), "int4")
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if mode == "int8" and (group_size is not None or head not in (None, "int8")):
        raise ValueError("group_size and head are int4 settings; int8 has one scale per output row")
    if mode == "f16" and (group_size is not None or head not in (None, "f16")):
        raise ValueError("group_size and head are int4 settings; f16 keeps every weight in float16")
    if head not in (None, *QUANTIZE_MODES):
        raise ValueError(f"head must be one of {QUANTIZE_MODES}, got {head!r}")
    group_size = INT4_GROUP_SIZE if group_size is None else group_size
    head = head or ("f16" if mode == "f16" else "int8")
    body = getattr(model, "transformer", model)
    gpt2 = isinstance(body, GPT2)  # its tied embedding and head are quantized too; other models: linear layers
    if not gpt2 and not linear_layers(body):
        raise TypeError(f"quantize works on models with linear layers; {type(model).__name__} has none")
    if is_quantized(body):
        raise ValueError("the model is already quantized")
    if mode == "int4":  # checked before any layer is replaced
        _check_group_size(group_size, {m.in_features for m in body.modules() if isinstance(m, nn.Linear)}, "model")
    bad = [name for name, p in body.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteError(f"the weights {bad[:4]} {_NON_FINITE_WEIGHTS}")

    def linear(weight: torch.Tensor, bias: torch.Tensor | None = None, kind: str = mode,
               embedding: bool = False) -> nn.Module:
        if kind == "f16":
            return (Float16Embedding if embedding else Float16Linear).from_float(weight, bias)
        if kind == "int4":
            return (Int4Embedding if embedding else Int4Linear).from_float(weight, bias, group_size=group_size)
        return (Int8Embedding if embedding else Int8Linear).from_float(weight, bias)

    with torch.no_grad():
        for _, parent, name in linear_layers(body):
            layer = getattr(parent, name)
            if not (gpt2 and layer is body.lm_head):  # GPT-2's untied head is quantized as a head, below
                setattr(parent, name, linear(layer.weight, layer.bias))
        if gpt2:
            body.wte = linear(body.wte.weight, kind=head, embedding=True)
            if body.lm_head is not None:  # an untied head (tie_word_embeddings: false)
                body.lm_head = linear(body.lm_head.weight, kind=head)
    # What stays in floating point (positions, LayerNorms) may still be a view of the mapped
    # checkpoint file, which would keep the whole float file resident: give it its own memory.
    own_memory(body)
    body.requires_grad_(False)
    return model
