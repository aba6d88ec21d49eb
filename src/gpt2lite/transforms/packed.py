"""Faster float32 batch decoding on the CPU: linear weights also kept in oneDNN's blocked layout.

MKL's sgemm, which ``F.linear`` uses on the CPU, runs a decode step of 4 to 32
rows at about 50 GFLOP/s on 2 AVX-512 cores; oneDNN's matmul over a weight
reordered once into its blocked layout is about 30% faster end to end at batch 8
(GPT-2 124M: 239 against 183 tok/s) and slower for a single row (41 against
48). So ``prepack`` keeps each weight as it is, adds the reordered copy, and
uses it only for products of ``MIN_ROWS`` rows or more without gradients.

The copy costs as much memory as the float32 weights again (about 0.5 GB for
124M, the LM head included). It is rebuilt when the weight changes (its version
counter moves), so training or loading new weights never reads a stale copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpt2lite.models.gpt2 import GPT2
from gpt2lite.transforms.quantize import is_quantized

__all__ = ["MIN_ROWS", "PackedEmbedding", "PackedLinear", "prepack"]

MIN_ROWS = 4  # below this many rows the plain product is faster (measured: 1 row 48 vs 41 tok/s)


def _product(layer: PackedLinear | PackedEmbedding, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ layer.weight.T + bias``: through the reordered copy for float32 CPU batches without gradients."""
    weight = layer.weight
    rows = x.numel() // x.shape[-1]
    if (rows < MIN_ROWS or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != x.dtype
            or (torch.is_grad_enabled() and weight.requires_grad)):
        return F.linear(x, weight, bias)
    if layer._packed is None or layer._version != weight._version:  # new weights: reorder them again
        layer._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), layer.rows)
        layer._version = weight._version
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), layer._packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])  # (..., out)


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose batched CPU products use a oneDNN layout."""

    rows: int = 8
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


def prepack(model: nn.Module, rows: int = 8) -> nn.Module:
    """Give a float32 GPT-2's linear layers and LM head a oneDNN-reordered copy for CPU batches; return it.

    ``rows`` is the batch size the layout is tuned for (any size works). The
    state dict, saving and training are unchanged. Example::

        model = prepack(GPT2.from_pretrained("gpt2"))  # then generate() with batches of 4+ rows
    """
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
    return model
