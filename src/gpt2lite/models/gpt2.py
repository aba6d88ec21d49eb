"""The GPT-2 decoder-only transformer in plain PyTorch.

Parameter names are GPT-2's own (``wte``, ``wpe``, ``h.N.ln_1``,
``h.N.attn.c_attn``, ``h.N.mlp.c_fc``, ``ln_f``), so a published checkpoint
maps onto the state dict without renaming; ``gpt2lite.models.weights`` reads
and writes the files, and transposes the Conv1D weights on the way.

``GPT2`` implements the decoding protocol of ``gpt2lite.models.protocol``:
``new_state`` makes a ``KVCache``, ``feed`` runs new tokens through it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from gpt2lite.models.cache import KVCache, StepPlan, visible_slots
from gpt2lite.models.config import GPT2Config
from gpt2lite.models.weights import load_checkpoint, save_checkpoint

__all__ = ["ACTIVATION_FUNCTIONS", "GPT2", "tied_head_product"]


def tied_head_product(x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Logits ``x @ embedding.T`` for hidden states ``(..., C)`` against a ``(vocab, C)`` embedding."""
    rows = x.numel() // x.shape[-1]
    if x.device.type == "cpu" and 8 <= rows <= 32:
        # MKL picks a slow kernel for 8..32 rows times the (50257, C) embedding; the
        # transposed product runs 11 ms instead of 17 at 8 rows (2 cores, AVX-512). Larger
        # inputs (training) keep the contiguous layout that the loss wants.
        return (embedding @ x.reshape(rows, x.shape[-1]).T).T.view(*x.shape[:-1], -1)  # (..., vocab)
    return F.linear(x, embedding)  # (..., vocab)


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention."""

    # A kernel for a decode step's attention (one query row, no mask): (q, k, v, scale) -> (B, nh, 1, hs),
    # or None where it does not serve. Set from outside (transforms.native.use_kernels); None: SDPA.
    one_row_attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor | None] | None = None

    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        # Scores are q.k / sqrt(hs) (scale_attn_weights), also / (layer + 1) in some GPT-2 variants.
        scale = 1.0 / math.sqrt(config.head_dim) if config.scale_attn_weights else 1.0
        self.scale = scale / (layer + 1) if config.scale_attn_by_inverse_layer_idx else scale
        self.upcast = config.reorder_and_upcast_attn  # attention in float32 whatever the model's dtype

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, state: KVCache | None,
        plan: StepPlan | None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        if state is not None:
            k, v = state.write(self.layer, k, v, plan)  # (B, nh, S, hs): the cached slots and these
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        y = None
        if T == 1 and mask is None and self.one_row_attention is not None and not self.training:
            y = self.one_row_attention(q, k, v, self.scale)  # (B, nh, 1, hs), or None
        if y is None:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.attn_pdrop if self.training else 0.0,
                scale=self.scale,
            )  # (B, nh, T, hs)
        if self.upcast:
            y = y.to(dtype)
        y = self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        # Dropout called only when on (its own mode): a decode step is short enough that each call counts.
        return self.resid_dropout(y) if self.resid_dropout.training else y


# GPT-2 was trained with the tanh approximation of GELU ("gelu_new"); variants name others, as transformers does.
ACTIVATION_FUNCTIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
}


class MLP(nn.Module):
    """Position-wise feed-forward layer."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_dim)
        self.c_proj = nn.Linear(config.mlp_dim, config.n_embd)
        self.act = ACTIVATION_FUNCTIONS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c_proj(self.act(self.c_fc(x)))
        return self.dropout(y) if self.dropout.training else y


class Block(nn.Module):
    """One pre-LayerNorm transformer block."""

    # A kernel for a whole decode step of the block: (block, x, state, plan) -> its output, or None where it
    # does not serve. Set from outside (transforms.native.use_kernels); None: the layers below, as written.
    decode_step: Callable[[Block, torch.Tensor, KVCache | None, StepPlan | None], torch.Tensor | None] | None = None

    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, state: KVCache | None,
        plan: StepPlan | None,
    ) -> torch.Tensor:
        if self.decode_step is not None and mask is None:
            y = self.decode_step(self, x, state, plan)
            if y is not None:
                return y
        x = x + self.attn(self.ln_1(x), mask, is_causal, state, plan)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2: token and learned position embeddings, pre-LN blocks, final LayerNorm, tied LM head.

    With ``tie_word_embeddings=False`` the LM head is a weight of its own (``lm_head``).
    """

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
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Training option: recompute each block's activations in backward instead of storing them.
        self.gradient_checkpointing = False
        self.name_or_path: str | None = None  # where from_pretrained found it; LoRA adapters record it
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
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self.ln_f.weight.dtype  # not wte's: a quantized model keeps int8 there

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
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for whole sequences of token ids ``(B, T)`` (training, scoring).

        ``attention_mask`` ``(B, T)`` marks real tokens with 1 and padding with 0;
        positions then follow the mask, as in ``transformers``. ``segment_ids``
        ``(B, T)`` packs several documents in a row: a token sees only the earlier
        tokens of its own segment, and each segment's positions start at 0, so each
        document gets the logits it would get alone. For token-by-token decoding use
        ``new_state`` and ``feed``.
        """
        return self._lm_head(self.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                                segment_ids=segment_ids))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states ``(B, T, n_embd)`` (after ``ln_f``) that the heads read; arguments as ``forward``."""
        self._check_inputs(input_ids, attention_mask, position_ids)
        T = input_ids.shape[1]
        if segment_ids is not None:
            if attention_mask is not None or tuple(segment_ids.shape) != tuple(input_ids.shape):
                raise ValueError("segment_ids must have the shape of input_ids, and come without attention_mask")
            idx = torch.arange(T, device=input_ids.device)
            first = torch.ones_like(segment_ids, dtype=torch.bool)
            first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
            start = torch.where(first, idx, 0).cummax(dim=1).values  # (B, T): where each token's segment begins
            same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
            mask = (same & (idx[None, None, :] <= idx[None, :, None]))[:, None]  # (B, 1, T, T)
            return self._run(input_ids, position_ids if position_ids is not None else idx - start, mask, False,
                             None, None)
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(T, device=input_ids.device)[None]  # (1, T)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        mask, is_causal = None, T > 1
        if attention_mask is not None:
            slots = torch.arange(T, device=input_ids.device).expand(attention_mask.shape[0], T)  # (B, T)
            mask, is_causal = visible_slots(attention_mask.bool(), slots), False  # (B, 1, T, T)
        return self._run(input_ids, position_ids, mask, is_causal, None, None)

    def _check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a 2-D tensor of token ids (batch, time)")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold integers (int64), got {input_ids.dtype}")
        B, T = input_ids.shape
        if T == 0 or B == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
        if self.config.n_positions < T:
            raise ValueError(f"sequence of {T} positions exceeds the model's context of {self.config.n_positions}")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must have the shape of input_ids {(B, T)}, "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is not None and tuple(position_ids.shape) not in ((B, T), (1, T)):
            raise ValueError(f"position_ids must have shape {(B, T)}, got {tuple(position_ids.shape)}")
        # Checking values reads them back to the host: free on the CPU, a sync on a GPU, so a
        # GPU training step skips it (an out-of-range id still fails there, less clearly); so does
        # a compiled step, where reading a value would break the graph in two.
        if (self.training and input_ids.device.type != "cpu") or torch.compiler.is_compiling():
            return
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if attention_mask is not None and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")

    # the decoding protocol ---------------------------------------------------------

    def new_state(self, batch_size: int, max_length: int, *, static: bool = False) -> KVCache:
        """An empty ``KVCache`` for ``batch_size`` rows of up to ``max_length`` tokens, on the model's device.

        ``static=True`` gives every decode step the same shapes (for a compiled step).
        """
        c = self.config
        if max_length > c.n_positions:
            raise ValueError(f"max_length {max_length} exceeds the model's context of {c.n_positions} positions")
        return KVCache(
            n_layer=c.n_layer, batch_size=batch_size, n_head=c.n_head, max_length=max_length, head_dim=c.head_dim,
            device=self.device, dtype=self.dtype, static=static,
        )

    def feed(
        self,
        input_ids: torch.Tensor,
        state: KVCache,
        *,
        input_mask: torch.Tensor | None = None,
        rows: Sequence[int] | None = None,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Run new tokens ``(R, T)`` through ``state`` and append them to it; logits ``(R, T or 1, vocab)``.

        ``rows`` picks the state rows the tokens belong to (default: all, in
        order); ``input_mask`` ``(R, T)`` marks left padding with 0. The new
        tokens attend to everything their row holds. Ids must be valid: this is
        the unchecked path of the decoding loop.
        """
        plan = state.plan(input_ids.shape[1], input_mask, rows)
        x = self._run(input_ids, plan.position_ids, plan.mask, plan.is_causal, state, plan, last_only)
        state.commit(plan, input_mask)
        return self._lm_head(x)

    def _run(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
        state: KVCache | None, plan: StepPlan | None, last_only: bool = False,
    ) -> torch.Tensor:
        """Final hidden states ``(B, T or 1, C)`` of new tokens, through ``state`` when decoding."""
        x = self.wte(input_ids) + self.wpe(position_ids)  # (B, T, C)
        if self.drop.training:
            x = self.drop(x)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.h:
            if recompute:  # keep only each block's input; recompute the rest during backward
                x = torch.utils.checkpoint.checkpoint(block, x, mask, is_causal, state, plan, use_reentrant=False)
            else:
                x = block(x, mask, is_causal, state, plan)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.ln_f(x)

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states ``(B, T, C)``; the head is the token embedding itself, unless untied."""
        if self.lm_head is not None:
            return self.lm_head(x)  # (B, T, vocab)
        project = getattr(self.wte, "project", None)
        if project is not None:  # a quantized embedding multiplies with its own kernel
            return project(x)  # (B, T, vocab)
        return tied_head_product(x, self.wte.weight)  # (B, T, vocab)

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
        """Load a hub id (``"gpt2"``), a directory, a sharded directory or a bare ``.safetensors`` file.

        This reads the checkpoint alone; ``gpt2lite.load_model`` also puts a LoRA
        adapter on it, quantizes or prepacks it.
        """
        config, state = load_checkpoint(
            name_or_path, device=device, dtype=dtype, revision=revision, cache_dir=cache_dir,
            local_files_only=local_files_only, config=config,
        )
        # Parameters on the meta device take no memory and skip the random initialisation;
        # assign=True then adopts the loaded tensors as they are, with no second copy.
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, strict=True, assign=True)
        model.name_or_path = str(name_or_path)
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` in the hub layout (``transformers`` loads them too).

        A model with LoRA adapters or quantized layers has other tensors than
        GPT-2's: save it with ``gpt2lite.save_model``.
        """
        return save_checkpoint(self.state_dict(), self.config, directory)
