"""int8 inference: GPT-2's linear layers and tied embedding with int8 weights and per-channel scales.

Each weight row (one output channel) is stored as int8 with one float scale,
``w ≈ q * scale`` with ``scale = max|w_row| / 127``: a quarter of float32's bytes,
which is what a bandwidth-bound decode step pays for.

How the product is computed depends on where it runs, because it was measured
rather than assumed (2-core AVX-512 CPU, GPT-2 124M, one decode step's matmuls):

- on the CPU with float32 activations: PyTorch's fbgemm ``linear_dynamic``
  kernel, which quantizes each call's activations to 7-bit unsigned integers
  (one scale per call) and multiplies in integers: 2.2 ms per token against
  9.4 ms in float32. The weight-only kernels PyTorch ships for the CPU were
  slower than float32 with float32 activations (``_weight_int8pack_mm``) or
  need bfloat16 activations. Because the activation scale is shared by the rows
  of one call, a row's output can move within that rounding with the rows
  batched beside it;
- elsewhere (CUDA, or other dtypes): weight-only, ``x @ q.T * scale`` with the
  activations kept in floating point.

Training stays in floating point: ``train`` refuses a quantized model.
"""

from __future__ import annotations

import warnings
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from gpt2lite.errors import NonFiniteError
from gpt2lite.models.gpt2 import GPT2

__all__ = ["QUANTIZE_MODES", "Int8Embedding", "Int8Linear", "QuantizeMode", "is_quantized", "quantize"]

QuantizeMode = Literal["int8"]
QUANTIZE_MODES: tuple[str, ...] = get_args(QuantizeMode)

_OVERFLOWED = ("the model's activations overflowed (NaN or inf) in its int8 layers; load the model without "
               "quantize, or check the checkpoint")

# The activations fbgemm quantizes are kept to 7 bits: without VNNI (AVX2-only CPUs) its kernels
# add pairs of u8*s8 products in int16, which 8-bit activations could overflow; torch's own
# dynamic quantization does the same.
_REDUCE_RANGE = True


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 rows and their scales: ``weight ≈ q * scale[:, None]``; a non-finite weight is refused."""
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):  # its row's scale would be inf: the row would become zeros
        raise NonFiniteError("the weights hold NaN or inf values, which int8 cannot represent (a diverged "
                             "training run?); check the checkpoint")
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127  # (out,)
    q = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)  # (out, in); one float temporary
    return q, scale


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


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight ``(out, in)`` and one float scale per output channel."""

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

    @property
    def in_features(self) -> int:
        """Width of the input."""
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        """Width of the output."""
        return self.weight.shape[0]

    def dequantize(self) -> torch.Tensor:
        """The float weight ``q * scale`` this layer stands for, ``(out, in)``."""
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` for ``x`` ``(..., in)``."""
        if self._packed is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            try:
                return torch.ops.quantized.linear_dynamic(x, self._packed, _REDUCE_RANGE)
            except RuntimeError:  # fbgemm's own words for NaN input: "min should be less than or equal to max"
                if bool(torch.isfinite(x).all()):
                    raise
                raise NonFiniteError(_OVERFLOWED) from None
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)  # (..., out)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _repack(self) -> None:
        self._packed = _pack_for_cpu(self.weight, self.scale, self.bias)

    def _apply(self, fn, recurse=True):  # nn.Module's signature
        # .to() / .cuda() move the buffers; the prepacked copy belongs to the old ones.
        out = super()._apply(fn, recurse)
        self._repack()
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


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
        if self._packed is not None and not bool(torch.isfinite(x).all()):
            raise NonFiniteError(_OVERFLOWED)
        return super().forward(x)


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds quantized weights."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


def quantize(model: nn.Module, mode: QuantizeMode = "int8") -> nn.Module:
    """Quantize a GPT-2's linear layers and its tied embedding / LM head in place; return the model.

    Only inference: the result generates, streams, serves and scores like the
    float model, but does not train. Example::

        model = quantize(GPT2.from_pretrained("gpt2"), "int8")
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    body = getattr(model, "transformer", model)
    if not isinstance(body, GPT2):
        raise TypeError(f"quantize works on GPT-2 models, not {type(model).__name__}")
    if is_quantized(body):
        raise ValueError("the model is already quantized")
    bad = [name for name, p in body.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteError(f"the weights {bad[:4]} hold NaN or inf values, which int8 cannot represent (a "
                             "diverged training run?); check the checkpoint")
    with torch.no_grad():
        for block in body.h:
            for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                                 (block.mlp, "c_proj")):
                layer = getattr(parent, name)
                setattr(parent, name, Int8Linear.from_float(layer.weight, layer.bias))
        body.wte = Int8Embedding.from_float(body.wte.weight)
        if body.lm_head is not None:  # an untied head (tie_word_embeddings: false)
            body.lm_head = Int8Linear.from_float(body.lm_head.weight)
        # What stays in floating point (positions, LayerNorms) may still be a view of the mapped
        # checkpoint file, which would keep the whole float file resident: give it its own memory.
        for p in body.parameters():
            p.data = p.data.clone()
    body.requires_grad_(False)
    return model
