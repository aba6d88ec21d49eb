"""The GPT-2 decoder-only transformer in plain PyTorch.

Parameter names are GPT-2's own (``wte``, ``wpe``, ``h.N.ln_1``,
``h.N.attn.c_attn``, ``h.N.mlp.c_fc``, ``ln_f``), so a published checkpoint
maps onto the state dict without renaming; the only change made at load time is
transposing the Conv1D weights (see ``gpt2lite.weights``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gpt2lite.config import GPT2Config

__all__ = ["GPT2", "KVCache"]


class KVCache:
    """Keys and values of every layer, allocated once for ``max_length`` positions.

    Each forward pass writes its new keys/values in place at positions
    ``[length, length + T)`` and attends over ``[0, length + T)``: nothing is
    concatenated or copied as the sequence grows.
    """

    def __init__(
        self,
        config: GPT2Config,
        batch_size: int,
        max_length: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Allocate zeroed buffers of shape ``(n_layer, batch, n_head, max_length, head_dim)``."""
        if max_length > config.n_positions:
            raise ValueError(f"max_length {max_length} exceeds the model's n_positions ({config.n_positions})")
        shape = (config.n_layer, batch_size, config.n_head, max_length, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far

    @classmethod
    def wrap(cls, k: torch.Tensor, v: torch.Tensor, length: int = 0) -> KVCache:
        """A cache over existing buffers of shape ``(n_layer, B, nh, max_length, hs)``."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.length = k, v, length
        return cache

    @property
    def max_length(self) -> int:
        """How many positions the buffers hold."""
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` of shape ``(B, nh, T, hs)`` after the cached ones; return all of them as views."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, end, hs)

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's ``k``/``v`` ``(B, nh, 1, hs)`` at tensor ``position``; return the whole buffers.

        Shapes never change, so a compiled decode step can be captured once as a CUDA graph.
        """
        self.k[layer].index_copy_(2, position, k)
        self.v[layer].index_copy_(2, position, v)
        return self.k[layer], self.v[layer]  # (B, nh, max_length, hs)


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention."""

    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None,
        position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if position is not None:
            k, v = kv_cache.write(self.layer, k, v, position)  # (B, nh, max_length, hs)
        elif kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, nh, S, hs), S = cached + T
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.attn_pdrop if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward layer."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_dim)
        self.c_proj = nn.Linear(config.mlp_dim, config.n_embd)
        # GPT-2 was trained with the tanh approximation of GELU ("gelu_new").
        self.approximate = "none" if config.activation_function == "gelu" else "tanh"
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """One pre-LayerNorm transformer block."""

    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None,
        position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, is_causal, kv_cache, position)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2: token and learned position embeddings, pre-LN blocks, final LayerNorm, tied LM head."""

    def __init__(self, config: GPT2Config) -> None:
        """A model with GPT-2's random initialisation; use ``from_pretrained`` for trained weights."""
        super().__init__()
        self.config = config
        # Embeddings get an empty weight (filled by _init_weights below): their own random init
        # would, on the meta device that from_pretrained uses, pull in ~1 s of torch imports.
        self.wte = nn.Embedding(config.vocab_size, config.n_embd, _weight=torch.empty(config.vocab_size, config.n_embd))
        self.wpe = nn.Embedding(
            config.n_positions, config.n_embd, _weight=torch.empty(config.n_positions, config.n_embd)
        )
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)
            # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) so the residual stream
            # does not grow with depth.
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self.wte.weight.dtype

    def num_parameters(self) -> int:
        """Number of parameters (the tied LM head counted once)."""
        return sum(p.numel() for p in self.parameters())

    # forward ------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for token ids ``(B, T)``.

        ``attention_mask`` ``(B, cached + T)`` marks real tokens with 1 and left
        padding with 0; positions then follow the mask, as in ``transformers``.
        With ``kv_cache`` the new tokens attend to the cached ones and are
        appended to the cache. ``last_only`` computes logits for the last
        position only, ``(B, 1, vocab_size)``.
        """
        self._check_inputs(input_ids, attention_mask, position_ids, kv_cache)
        return self._forward(input_ids, attention_mask, position_ids, kv_cache, last_only)

    def _check_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        kv_cache: KVCache | None,
    ) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a 2-D tensor of token ids (batch, time)")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold integers (int64), got {input_ids.dtype}")
        B, T = input_ids.shape
        if T == 0 or B == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(
                f"sequence of {past + T} positions exceeds the model's context of {self.config.n_positions}"
            )
        if kv_cache is not None and past + T > kv_cache.max_length:
            raise ValueError(f"kv_cache holds {kv_cache.max_length} positions; {past + T} needed")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(
                f"attention_mask must have shape (batch, cached + new) = {(B, past + T)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if position_ids is not None and tuple(position_ids.shape) not in ((B, T), (1, T)):
            raise ValueError(f"position_ids must have shape {(B, T)}, got {tuple(position_ids.shape)}")

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        # The unchecked forward, for the generation loop, whose inputs are valid by construction.
        T = input_ids.shape[1]
        past = kv_cache.length if kv_cache is not None else 0
        device = input_ids.device
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=device)[None]  # (1, T)
            else:
                position_ids = positions_from_mask(attention_mask)[:, past:]  # (B, T)
        mask, is_causal = _attention_bias(attention_mask, past, T, device)

        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, T, C)
        for block in self.h:
            x = block(x, mask, is_causal, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        if last_only:
            x = x[:, -1:]
        return self._lm_head(self.ln_f(x))  # (B, T, vocab)

    def decode_step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        write_position: torch.Tensor,
        key_mask: torch.Tensor,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """One token per row with fixed shapes, for ``torch.compile`` / CUDA graphs: logits ``(B, vocab)``.

        ``input_ids`` and ``position_ids`` are ``(B, 1)``, ``write_position`` the
        cache slot ``(1,)``, and ``key_mask`` ``(B, max_length)`` the slots each row
        may attend to (this one included). The caller advances ``kv_cache.length``.
        """
        x = self.wte(input_ids) + self.wpe(position_ids)  # (B, 1, C)
        mask = key_mask[:, None, None, :]  # (B, 1, 1, max_length)
        for block in self.h:
            x = block(x, mask, False, kv_cache, write_position)
        return self._lm_head(self.ln_f(x))[:, -1]  # (B, vocab)

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states ``(B, T, C)``; the head is the token embedding itself."""
        B, T, C = x.shape
        if x.device.type == "cpu" and 8 <= B * T <= 32:
            # MKL picks a slow kernel for 8..32 rows times the (50257, C) embedding; the
            # transposed product runs 11 ms instead of 17 at 8 rows (2 cores, AVX-512). Larger
            # inputs (training) keep the contiguous layout that the loss wants.
            return (self.wte.weight @ x.reshape(B * T, C).T).T.view(B, T, -1)  # (B, T, vocab)
        return F.linear(x, self.wte.weight)  # (B, T, vocab)

    # loading and saving ---------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        config: GPT2Config | None = None,
    ) -> GPT2:
        """Load a hub id (``"gpt2"``), a directory, a sharded directory or a bare ``.safetensors`` file."""
        from gpt2lite.weights import load_pretrained

        return load_pretrained(
            name_or_path, device=device, dtype=dtype, revision=revision, cache_dir=cache_dir,
            local_files_only=local_files_only, config=config,
        )

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` in the hub layout (``transformers`` loads them too)."""
        from gpt2lite.weights import save_pretrained

        return save_pretrained(self, directory)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens: ``[0, 0, 1, 1] -> [0, 0, 0, 1]`` (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def _attention_bias(
    attention_mask: torch.Tensor | None, past: int, T: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """The boolean mask (or ``is_causal``) for ``T`` queries after ``past`` cached positions."""
    if attention_mask is None:
        if past == 0:
            return None, T > 1
        if T == 1:
            return None, False  # one new token may see everything cached
    q_pos = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(past + T, device=device)[None, :]  # (1, S)
    allowed = k_pos <= q_pos  # (T, S)
    if attention_mask is None:
        return allowed[None, None], False  # (1, 1, T, S)
    # Every query also sees itself, so a padding query has a non-empty row: an all-masked
    # row would give NaN, which would then leak through its value vector into later steps.
    allowed = (allowed & attention_mask.bool()[:, None, :]) | (k_pos == q_pos)  # (B, T, S)
    return allowed[:, None], False  # (B, 1, T, S)
