"""Faster float32 decoding on the CPU: linear weights also kept in oneDNN's blocked layout.

MKL's sgemm, which ``F.linear`` uses on the CPU, runs a decode step of 4 to 32
rows at about 50 GFLOP/s on 2 AVX-512 cores; oneDNN's matmul over a weight
reordered once into its blocked layout is about 30% faster end to end at batch 8
(GPT-2 124M: 239 against 183 tok/s). For 2 and 3 rows MKL leaves its
matrix-vector path for a small-matrix one that, on an AMD EPYC, takes 2 to 3
times the one-row time (the 768x50257 LM head: 14 ms for 1 row, 42 ms for 3;
oneDNN: 8 and 10 ms). For a single row the faster kernel depends on the CPU (MKL
on the Intel Xeon measured, 48 against 41 tok/s; oneDNN on the AMD EPYC, where
MKL's GEMV reaches half the memory bandwidth), so ``prepack`` measures both for
each weight shape (``kernels.choose_kernels``, cached per CPU model) unless told
which. It keeps each weight as it is, adds the reordered copy, and uses it for
products of ``MIN_ROWS`` rows or more without gradients, and for single rows
where oneDNN won.

The copy costs as much memory as the float32 weights again (about 0.5 GB for
124M, the LM head included). It is rebuilt when the weight changes (its version
counter moves), so training or loading new weights never reads a stale copy.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gpt2lite.models.gpt2 import GPT2
from gpt2lite.transforms.kernels import KERNELS, Choice, choose_kernels
from gpt2lite.transforms.quantize import is_quantized

__all__ = ["MIN_ROWS", "PackedEmbedding", "PackedLinear", "kernel_report", "prepack"]

MIN_ROWS = 2  # from this many rows the reordered copy always serves; one row takes the layer's `one_row` kernel


def _product(layer: PackedLinear | PackedEmbedding, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ layer.weight.T + bias``: through the reordered copy for float32 CPU batches without gradients."""
    weight = layer.weight
    rows = x.numel() // x.shape[-1]
    if ((rows < MIN_ROWS and layer.one_row != "onednn") or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != x.dtype or (torch.is_grad_enabled() and weight.requires_grad)):
        return F.linear(x, weight, bias)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), _packed(layer), bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])  # (..., out)


def _packed(layer: PackedLinear | PackedEmbedding) -> torch.Tensor:
    """The layer's reordered weight, made again when the weight changed (its version counter moved)."""
    weight = layer.weight
    if layer._packed is None or layer._version != weight._version:
        layer._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), layer.rows)
        layer._version = weight._version
    return layer._packed


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose batched CPU products use a oneDNN layout."""

    rows: int = 8
    one_row: str = "mkl"  # the kernel of products under MIN_ROWS rows: "mkl" (F.linear) or "onednn"
    choice: Choice | None = None  # how one_row was chosen: the measured times
    _packed: torch.Tensor | None = None
    _version: int = -1

    @classmethod
    def wrap(cls, layer: nn.Linear, rows: int = 8) -> PackedLinear:
        """A ``PackedLinear`` sharing ``layer``'s parameters."""
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        new.weight, new.bias, new.rows = layer.weight, layer.bias, rows
        return new.train(layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias``."""
        return _product(self, x, self.bias)


class PackedEmbedding(nn.Embedding):
    """GPT-2's token embedding (same parameter) whose use as the tied LM head goes through ``PackedLinear``'s path."""

    rows: int = 8
    one_row: str = "mkl"
    choice: Choice | None = None
    _packed: torch.Tensor | None = None
    _version: int = -1

    @classmethod
    def wrap(cls, embedding: nn.Embedding, rows: int = 8) -> PackedEmbedding:
        """A ``PackedEmbedding`` sharing ``embedding``'s weight."""
        new = cls(embedding.num_embeddings, embedding.embedding_dim, device="meta")
        new.weight, new.rows = embedding.weight, rows
        return new

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``x @ E.T`` of hidden states ``(..., n_embd)``."""
        return _product(self, x, None)


def prepack(model: nn.Module, rows: int = 8, *, one_row: Literal["auto", "mkl", "onednn"] = "auto",
            kernel_cache: str | os.PathLike[str] | None = None) -> nn.Module:
    """Give a float32 GPT-2's linear layers and LM head a oneDNN-reordered copy for CPU decoding; return it.

    ``rows`` is the batch size the layout is tuned for (any size works).
    ``one_row`` picks the kernel of products under ``MIN_ROWS`` rows (batch-1
    decoding): ``"auto"`` measures both per weight shape on this CPU, cached in
    ``kernel_cache`` (default ``~/.cache/gpt2lite/kernels.json``). The state
    dict, saving and training are unchanged. Example::

        model = prepack(GPT2.from_pretrained("gpt2"))  # then generate()
    """
    if one_row not in ("auto", *KERNELS):
        raise ValueError(f"one_row must be 'auto', 'mkl' or 'onednn', got {one_row!r}")
    body = getattr(model, "transformer", model)
    if not isinstance(body, GPT2):
        raise TypeError(f"prepack works on GPT-2 models, not {type(model).__name__}")
    if is_quantized(body) or body.dtype != torch.float32 or body.device.type != "cpu":
        raise ValueError("prepack is for float32 models on the CPU (not quantized, not on a GPU)")
    if not torch.backends.mkldnn.is_available():
        raise ValueError("prepack needs PyTorch's oneDNN (mkldnn) backend, which this build lacks")
    for block in body.h:
        for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                             (block.mlp, "c_proj")):
            layer = getattr(parent, name)
            if type(layer) is nn.Linear:
                setattr(parent, name, PackedLinear.wrap(layer, rows))
    if type(body.wte) is nn.Embedding:
        body.wte = PackedEmbedding.wrap(body.wte, rows)
    if type(body.lm_head) is nn.Linear:  # an untied head (tie_word_embeddings: false)
        body.lm_head = PackedLinear.wrap(body.lm_head, rows)
    layers = [m for m in body.modules() if isinstance(m, (PackedLinear, PackedEmbedding))]
    if one_row != "auto":
        for layer in layers:
            layer.one_row, layer.choice = one_row, None
        return model
    groups: dict[str, list[PackedLinear | PackedEmbedding]] = {}
    for layer in layers:
        groups.setdefault(_shape(layer), []).append(layer)
    with torch.no_grad():
        choices = choose_kernels({shape: ([m.weight.detach() for m in group], [_packed(m) for m in group])
                                  for shape, group in groups.items()}, kernel_cache)
    for shape, group in groups.items():
        for layer in group:
            layer.one_row, layer.choice = str(choices[shape]["kernel"]), choices[shape]
    return model


def _shape(layer: PackedLinear | PackedEmbedding) -> str:
    """``"in x out"`` of the product the layer computes."""
    out_features, in_features = layer.weight.shape
    return f"{in_features}x{out_features}"


def kernel_report(model: nn.Module) -> list[str]:
    """A line per product shape of a prepacked model: the one-row kernel and why (the measured times)."""
    lines: dict[str, str] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, (PackedLinear, PackedEmbedding)):
            shape = _shape(layer)
            why = "as asked" if layer.choice is None else \
                f"measured: mkl {layer.choice['mkl_us']} us, onednn {layer.choice['onednn_us']} us"
            kind = name.rsplit(".", 1)[-1] if name != "wte" else "wte (tied LM head)"
            lines.setdefault(shape, f"{shape:>10} ({kind}): 1-row products via {layer.one_row} ({why}); "
                                    f"{MIN_ROWS}+ rows via onednn")
    return list(lines.values())
