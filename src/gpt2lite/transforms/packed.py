"""Faster float32 decoding on the CPU: the product kernel chosen per CPU, and oneDNN's blocked layout for batches.

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
which. A one-row oneDNN product reads the weight as it is: it needs no copy.

For products of ``MIN_ROWS`` rows or more without gradients, ``prepack`` adds a
copy of each weight reordered into oneDNN's blocked layout, which costs as much
memory as the float32 weights again (about 0.5 GB for 124M, the LM head
included). ``copy=False`` keeps one copy of each weight; those products then take
MKL or oneDNN over the weight as it is, whichever was faster for the shape at
``rows`` rows on this CPU (measured like the one-row kernel: on the AMD EPYC,
oneDNN, 1.8 times MKL's speed at 8 rows). The copy is rebuilt when the weight
changes (its version counter moves), so training or loading new weights never
reads a stale copy.

Inside a ``torch.compile``'d decode step on the CPU (``compile=True``) a one-row
product is written as a sum of products, ``(x * W).sum(-1)``, which inductor
turns into one vectorized loop streaming the weight: 26 GB/s against oneDNN's
21 and MKL's 13 on an AMD EPYC (Zen 3, 2 threads). That loop needs each output's
weights side by side, so ``prepack`` stores the weights as ``(out, in)`` rows
(GPT-2's files hold them transposed); the values and the state dict are as before.
It gives every tensor memory of its own (one copy of the weights, the checkpoint
file no longer mapped), as a load with a dtype conversion does.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from gpt2lite.models.gpt2 import GPT2, tied_head_product
from gpt2lite.models.weights import own_memory
from gpt2lite.transforms.kernels import KERNELS, Choice, choose_kernels
from gpt2lite.transforms.layers import linear_layers
from gpt2lite.transforms.native import (
    KERNEL_ROUTES,
    KernelRoute,
    NativeKernels,
    NativeOperands,
    kernels_for,
    native_f32_operands,
)
from gpt2lite.transforms.quantize import is_quantized

__all__ = ["MIN_ROWS", "PackedEmbedding", "PackedLinear", "can_prepack", "kernel_report", "prepack"]

MIN_ROWS = 2  # from this many rows the reordered copy (without one, the `batch` kernel) serves; one row: `one_row`

# `gpt2lite::materialize(x)`: a copy of `x` that inductor cannot fuse into its consumer. Without
# it, the LayerNorm or GELU that makes a product's input would be recomputed inside the
# product's loop, once for every output.
if not hasattr(torch.ops.gpt2lite, "materialize"):  # an op is defined once per process (a reload must not redo it)
    _OPS = torch.library.Library("gpt2lite", "FRAGMENT")
    _OPS.define("materialize(Tensor x) -> Tensor")
    _OPS.impl("materialize", torch.clone, "CompositeExplicitAutograd")
    torch.library.register_fake("gpt2lite::materialize", torch.empty_like, lib=_OPS)


def _row_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One row ``(..., in)`` times ``(out, in)`` rows as a sum of products, which inductor makes one loop."""
    v = torch.ops.gpt2lite.materialize(x.reshape(1, x.shape[-1]))  # (1, in)
    y = (v * weight).sum(-1)  # (out,)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])  # (..., out)


def _product(layer: PackedLinear | PackedEmbedding, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ layer.weight.T + bias``; float32 CPU products without gradients take the layer's chosen kernels."""
    weight = layer.weight
    rows = x.numel() // x.shape[-1]
    # oneDNN's product has no backward: anything that needs gradients (through a frozen weight
    # too, as LoRA training does) takes F.linear.
    plain = (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != x.dtype
             or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)))
    if not plain and rows < MIN_ROWS and layer.one_row == "native":
        kernels = kernels_for(layer.kernels)
        if kernels is not None and kernels.fits(weight):
            if torch.compiler.is_compiling():
                return torch.ops.gpt2lite.native_linear_f32(x, weight, bias)
            return kernels.linear_f32(x, weight, bias)
    if not plain and torch.compiler.is_compiling():  # inductor cannot lower oneDNN over a weight it does not own
        if rows < MIN_ROWS and weight.is_contiguous():
            return _row_product(x, weight, bias)
        plain = True
    if plain:
        return F.linear(x, weight, bias)
    kernel = layer.one_row if rows < MIN_ROWS else "copy" if layer.copy else layer.batch
    if kernel not in ("onednn", "copy"):  # MKL, as the model without prepack computes it
        return F.linear(x, weight, bias) if isinstance(layer, PackedLinear) else tied_head_product(x, weight)
    operand = _packed(layer) if kernel == "copy" else weight  # oneDNN reads the weight as it is: no copy
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), operand, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])  # (..., out)


def _packed(layer: PackedLinear | PackedEmbedding) -> torch.Tensor:
    """The layer's reordered weight, made again when the weight changed (its version counter moved)."""
    weight = layer.weight
    if layer._packed is None or layer._copied_version != weight._version:
        layer._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), layer.rows)
        layer._copied_version = weight._version
    return layer._packed


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose batched CPU products use a oneDNN layout."""

    rows: int = 8
    one_row: str = "mkl"  # the kernel of products under MIN_ROWS rows: "mkl" (F.linear) or "onednn"
    kernels: KernelRoute = "native"  # "torch": PyTorch's routes only (use_kernels)
    copy: bool = True  # whether products of MIN_ROWS+ rows use a reordered copy (else the `batch` kernel)
    batch: str = "mkl"  # without the copy, the kernel of products of MIN_ROWS+ rows (over the weight as it is)
    choice: Choice | None = None  # how one_row was chosen: the measured times
    batch_choice: Choice | None = None  # how batch was chosen
    _packed: torch.Tensor | None = None
    _copied_version: int = -1  # the weight's version counter when the copy was made (not nn.Module's _version)

    @classmethod
    def wrap(cls, layer: nn.Linear, rows: int = 8) -> PackedLinear:
        """A ``PackedLinear`` sharing ``layer``'s parameters."""
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        new.weight, new.bias, new.rows = layer.weight, layer.bias, rows
        return new.train(layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias``."""
        return _product(self, x, self.bias)

    def native_operands(self) -> NativeOperands | None:
        """What gpt2lite's kernels read for a one-row product (see ``native.block_step``), or None."""
        return native_f32_operands(self) if self.one_row == "native" and self.kernels == "native" else None


class PackedEmbedding(nn.Embedding):
    """GPT-2's token embedding (same parameter) whose use as the tied LM head goes through ``PackedLinear``'s path."""

    rows: int = 8
    one_row: str = "mkl"
    kernels: KernelRoute = "native"  # "torch": PyTorch's routes only (use_kernels)
    copy: bool = True
    batch: str = "mkl"
    choice: Choice | None = None
    batch_choice: Choice | None = None
    _packed: torch.Tensor | None = None
    _copied_version: int = -1  # the weight's version counter when the copy was made (not nn.Module's _version)

    @classmethod
    def wrap(cls, embedding: nn.Embedding, rows: int = 8) -> PackedEmbedding:
        """A ``PackedEmbedding`` sharing ``embedding``'s weight."""
        new = cls(embedding.num_embeddings, embedding.embedding_dim, device="meta")
        new.weight, new.rows = embedding.weight, rows
        return new

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``x @ E.T`` of hidden states ``(..., n_embd)``."""
        return _product(self, x, None)


def prepack(model: nn.Module, rows: int = 8, *, one_row: Literal["auto", "native", "mkl", "onednn"] = "auto",
            copy: bool = True, batch: Literal["auto", "mkl", "onednn"] = "auto",
            kernel_cache: str | os.PathLike[str] | None = None, kernels: KernelRoute = "native") -> nn.Module:
    """Choose a float32 model's CPU product kernels (a GPT-2's tied head too), with oneDNN copies for batches.

    ``one_row`` picks the kernel of products under ``MIN_ROWS`` rows (batch-1
    decoding): ``"auto"`` takes gpt2lite's own float32 kernel (``"native"``,
    ``transforms/native.py``) where it was built and ``kernels="native"``, and
    otherwise measures MKL and oneDNN per weight shape on this CPU, cached in
    ``kernel_cache`` (default ``~/.cache/gpt2lite/kernels.json``). ``copy``
    adds the reordered copies that speed up batches (twice the weight memory);
    without them (``copy=False``) ``batch`` picks the kernel of products of
    ``MIN_ROWS`` rows or more, MKL or oneDNN over the weight as it is (``"auto"``:
    measured at ``rows`` rows). oneDNN's products round differently from MKL's,
    which ``transformers`` uses, so greedy tokens can part from its at a near tie;
    ``batch="mkl"`` keeps them (what ``load_model`` does). ``rows`` is the batch
    size the copies' layout is tuned for and the batch kernel is measured at (any
    size works). The state dict, saving and training are unchanged. Example::

        model = prepack(GPT2.from_pretrained("gpt2"), copy=False)  # kernels measured, one copy of the weights
    """
    if one_row not in ("auto", "native", *KERNELS):
        raise ValueError(f"one_row must be 'auto', 'native', 'mkl' or 'onednn', got {one_row!r}")
    if batch not in ("auto", *KERNELS):
        raise ValueError(f"batch must be 'auto', 'mkl' or 'onednn', got {batch!r}")
    if kernels not in KERNEL_ROUTES:
        raise ValueError(f"kernels must be one of {KERNEL_ROUTES}, got {kernels!r}")
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    body = getattr(model, "transformer", model)
    if not isinstance(body, GPT2) and not linear_layers(body):
        raise TypeError(f"prepack works on models with linear layers; {type(model).__name__} has none")
    refusal = _refusal(body)
    if refusal is not None:
        raise ValueError(refusal)
    for _, parent, name in linear_layers(body):  # GPT-2's untied head (tie_word_embeddings: false) among them
        layer = getattr(parent, name)
        if type(layer) is nn.Linear:
            setattr(parent, name, PackedLinear.wrap(layer, rows))
    if isinstance(body, GPT2) and type(body.wte) is nn.Embedding:  # the tied embedding is GPT-2's head too
        body.wte = PackedEmbedding.wrap(body.wte, rows)
    layers = [m for m in body.modules() if isinstance(m, (PackedLinear, PackedEmbedding))]
    # GPT-2's Conv1D weights arrive as transposed views of the mapped file: every tensor gets
    # memory of its own, in (out, in) rows, so no view keeps the file mapped beside the copies.
    own_memory(body)
    for layer in layers:
        layer.rows, layer.copy, layer.kernels = rows, copy, kernels
        layer._packed, layer._copied_version = None, -1  # a copy made before is dropped (or made again, as needed)
    groups: dict[str, list[PackedLinear | PackedEmbedding]] = {}
    for layer in layers:
        groups.setdefault(_shape(layer), []).append(layer)
    weights = {shape: [m.weight.detach() for m in group] for shape, group in groups.items()}
    # The tied head's MKL product is tied_head_product, which takes another route for 8 to 32 rows.
    tied = isinstance(body, GPT2) and body.lm_head is None
    heads = {_shape(body.wte): tied_head_product} if tied else {}
    # gpt2lite's own kernel is chosen by rule where it serves: nothing to measure on a busy machine.
    native = one_row == "auto" and kernels == "native" and kernels_for(kernels) is not None \
        and all(NativeKernels.fits(w[0]) for w in weights.values())
    one_row = "native" if native else one_row
    with torch.no_grad():
        choices = choose_kernels(weights, kernel_cache) if one_row == "auto" else {}
        batches = choose_kernels(weights, kernel_cache, rows, heads) if not copy and batch == "auto" else {}
    for shape, group in groups.items():
        for layer in group:
            if choices:
                layer.one_row, layer.choice = str(choices[shape]["kernel"]), choices[shape]
            else:
                layer.one_row, layer.choice = one_row, None
            if batches:
                layer.batch, layer.batch_choice = str(batches[shape]["kernel"]), batches[shape]
            else:  # as asked; unmeasured "auto" means copies, which batches take instead (`batch` unread)
                layer.batch, layer.batch_choice = "mkl" if batch == "auto" else batch, None
    return model


def can_prepack(model: nn.Module) -> bool:
    """Whether ``prepack`` serves ``model``: a float32 GPT-2 on the CPU, not quantized, with PyTorch's oneDNN."""
    body = getattr(model, "transformer", model)
    return isinstance(body, GPT2) and _refusal(body) is None


def _refusal(body: nn.Module) -> str | None:
    """Why ``prepack`` cannot serve ``body``, or None."""
    weight = next(body.parameters())
    if is_quantized(body) or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return "prepack is for float32 models on the CPU (not quantized, not on a GPU)"
    if not torch.backends.mkldnn.is_available():
        return "prepack needs PyTorch's oneDNN (mkldnn) backend, which this build lacks"
    return None


def _shape(layer: PackedLinear | PackedEmbedding) -> str:
    """``"in x out"`` of the product the layer computes."""
    out_features, in_features = layer.weight.shape
    return f"{in_features}x{out_features}"


def kernel_report(model: nn.Module) -> list[str]:
    """A line per product shape of a prepacked model: the kernels of one row and of batches, and why."""
    lines: dict[str, str] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, (PackedLinear, PackedEmbedding)):
            shape = _shape(layer)
            why = "gpt2lite's own kernel, by rule" if layer.one_row == "native" else "as asked" \
                if layer.choice is None else \
                f"measured: mkl {layer.choice['mkl_us']} us, onednn {layer.choice['onednn_us']} us"
            kind = name.rsplit(".", 1)[-1] if name != "wte" else "wte (tied LM head)"
            if layer.copy:
                batches = "onednn (reordered copy)"
            elif layer.batch_choice is None:
                batches = f"{layer.batch} (no copy)"
            else:
                batches = (f"{layer.batch} (no copy; measured at {layer.rows} rows: mkl {layer.batch_choice['mkl_us']} "
                           f"us, onednn {layer.batch_choice['onednn_us']} us)")
            lines.setdefault(shape, f"{shape:>10} ({kind}): 1-row products via {layer.one_row} ({why}); "
                                    f"{MIN_ROWS}+ rows via {batches}")
    return list(lines.values())
