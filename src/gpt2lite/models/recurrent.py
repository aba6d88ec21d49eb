"""Recurrent language models (tanh RNN, LSTM, GRU) that decode through the same engine as GPT-2.

As in PyTorch's ``word_language_model`` example: an embedding, a stack of
recurrent layers with dropout between them, and an output layer tied to the
embedding. The decoding state is the hidden state of every layer (``h``, and
``c`` for an LSTM), one per row; it is reset, reordered and fed like a key/value
cache, but it cannot be cut back to an earlier length.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gpt2lite.errors import CheckpointError
from gpt2lite.io.files import atomic_write, read_json, write_json
from gpt2lite.io.tensors import open_tensors

__all__ = [
    "MODEL_TYPE", "RecurrentConfig", "RecurrentLM", "RecurrentState", "expected_shapes", "is_recurrent_checkpoint",
]

MODEL_TYPE = "gpt2lite-recurrent"  # config.json's model_type for these models
_CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def is_recurrent_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a local directory holding a recurrent model's ``config.json``."""
    config = Path(path).expanduser() / "config.json"
    try:
        return read_json(config).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class RecurrentConfig:
    """Shape of a recurrent language model; ``n_embd`` is both the embedding and the hidden width (tied)."""

    cell: Literal["rnn", "lstm", "gru"] = "lstm"
    vocab_size: int = 50257
    n_embd: int = 256
    n_layer: int = 2
    dropout: float = 0.2
    eos_token_id: int | None = 50256

    def __post_init__(self) -> None:
        if not isinstance(self.cell, str) or self.cell not in _CELLS:
            raise ValueError(f"cell must be one of {sorted(_CELLS)}, got {self.cell!r}")
        for name in ("vocab_size", "n_embd", "n_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RecurrentConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"RecurrentConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        eos = self.eos_token_id
        if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or eos < 0):
            raise ValueError(f"RecurrentConfig.eos_token_id must be null or a token id (an int >= 0), got {eos!r}")

    @property
    def n_positions(self) -> None:
        """No context limit: a recurrent model reads any length."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict."""
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecurrentConfig:
        """Read a ``config.json`` dict written by ``to_dict``."""
        if not isinstance(d, dict) or d.get("model_type") != MODEL_TYPE:
            raise ValueError(f"not a {MODEL_TYPE} config")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


_GATES = {"rnn": 1, "lstm": 4, "gru": 3}  # weight rows per hidden unit, as torch's recurrent layers stack them


def expected_shapes(config: RecurrentConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a saved model of ``config`` holds, with its shape (the tied output weight is not saved)."""
    V, C, G = config.vocab_size, config.n_embd, _GATES[config.cell] * config.n_embd
    shapes: dict[str, tuple[int, ...]] = {"encoder.weight": (V, C), "decoder.bias": (V,)}
    for k in range(config.n_layer):
        shapes.update({f"rnn.weight_ih_l{k}": (G, C), f"rnn.weight_hh_l{k}": (G, C), f"rnn.bias_ih_l{k}": (G,),
                       f"rnn.bias_hh_l{k}": (G,)})
    return shapes


class RecurrentState:
    """The hidden state of every layer for ``batch_size`` rows: ``h`` ``(n_layer, B, H)`` (and ``c`` for an LSTM)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        """Wrap zeroed tensors made by ``RecurrentLM.new_state``."""
        self.tensors = tensors

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return self.tensors[0].shape[1]

    @property
    def device(self) -> torch.device:
        """Where the state lives."""
        return self.tensors[0].device

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Zero ``rows`` (default: all)."""
        for t in self.tensors:
            t[:, slice(None) if rows is None else list(rows)] = 0

    def reorder(self, index: Sequence[int] | torch.Tensor) -> None:
        """Make row ``i`` a copy of row ``index[i]``."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        for t in self.tensors:
            t.copy_(t[:, index])

    def truncate(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        """Not possible: a recurrent state does not keep its past tokens."""
        raise NotImplementedError("a recurrent model's state cannot be cut back (no speculative decoding)")


class RecurrentLM(nn.Module):
    """A tanh-RNN, LSTM or GRU language model with tied input and output embeddings."""

    def __init__(self, config: RecurrentConfig) -> None:
        """A randomly initialised model (uniform in [-0.1, 0.1], as the PyTorch example does)."""
        super().__init__()
        self.config = config
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.Embedding(config.vocab_size, config.n_embd)
        self.rnn = _CELLS[config.cell](config.n_embd, config.n_embd, config.n_layer, batch_first=True,
                                       dropout=config.dropout if config.n_layer > 1 else 0.0)
        self.decoder = nn.Linear(config.n_embd, config.vocab_size)
        self.decoder.weight = self.encoder.weight  # tied
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        return self.encoder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self.encoder.weight.dtype

    def num_parameters(self) -> int:
        """Number of parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for whole sequences from an empty state (training, scoring)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError("input_ids must be a non-empty 2-D tensor of token ids (batch, time)")
        if attention_mask is not None and not bool(attention_mask.all()):
            state = self.new_state(input_ids.shape[0], input_ids.shape[1])
            return self.feed(input_ids, state, input_mask=attention_mask, last_only=False)
        out, _ = self.rnn(self.drop(self.encoder(input_ids)))  # (B, T, H)
        return self.decoder(self.drop(out))  # (B, T, vocab)

    # the decoding protocol ---------------------------------------------------------

    def new_state(self, batch_size: int, max_length: int, *, static: bool = False) -> RecurrentState:
        """An empty (zero) hidden state for ``batch_size`` rows; lengths are unlimited."""
        shape = (self.config.n_layer, batch_size, self.config.n_embd)
        count = 2 if self.config.cell == "lstm" else 1
        return RecurrentState([torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(count)])

    def feed(
        self,
        input_ids: torch.Tensor,
        state: RecurrentState,
        *,
        input_mask: torch.Tensor | None = None,
        rows: Sequence[int] | None = None,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Feed ``input_ids`` ``(R, T)`` to ``rows`` of ``state``; logits ``(R, T or 1, vocab)``.

        Padding (``input_mask`` 0) leaves a row's state as it was.
        """
        index = slice(None) if rows is None else list(rows)
        hidden = [t[:, index] for t in state.tensors]  # each (n_layer, R, H)
        x = self.drop(self.encoder(input_ids))  # (R, T, C)
        if input_mask is None:
            out, new = self.rnn(x, tuple(hidden) if len(hidden) == 2 else hidden[0])  # (R, T, H)
            hidden = list(new) if isinstance(new, tuple) else [new]
        else:  # token by token, so that padding can leave the state untouched
            outs = []
            for t in range(x.shape[1]):
                o, new = self.rnn(x[:, t : t + 1], tuple(hidden) if len(hidden) == 2 else hidden[0])
                new = list(new) if isinstance(new, tuple) else [new]
                keep = input_mask[:, t].bool()[None, :, None]  # (1, R, 1)
                hidden = [torch.where(keep, n, h) for n, h in zip(new, hidden, strict=True)]
                outs.append(o)
            out = torch.cat(outs, dim=1)  # (R, T, H)
        for t, h in zip(state.tensors, hidden, strict=True):
            t[:, index] = h
        if last_only:
            out = out[:, -1:]  # (R, 1, H)
        return self.decoder(self.drop(out))  # (R, T, vocab)

    # loading and saving ---------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k != "decoder.weight"}
        with atomic_write(directory / "model.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        write_json(directory / "config.json", self.config.to_dict())
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], *, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> RecurrentLM:
        """Load a directory written by ``save_pretrained``; the config is checked against the weights first."""
        directory = Path(directory)
        config_file, weights = directory / "config.json", directory / "model.safetensors"
        try:
            config = RecurrentConfig.from_dict(read_json(config_file))
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{str(config_file)!r}: {exc}") from None
        # The shapes the config implies, against those the file's header declares: nothing is built before.
        expected = expected_shapes(config)
        with open_tensors(weights) as f:
            found = {k: f.shape(k) for k in f.names()}
        if found != expected:
            odd = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
            raise CheckpointError(f"{str(config_file)!r} does not describe the weights in {str(weights)!r} "
                                  f"(a {config.cell} of n_embd={config.n_embd}, n_layer={config.n_layer}, "
                                  f"vocab_size={config.vocab_size}); they differ at {odd[:4]}")
        model = cls(config)
        state = load_file(str(weights))
        model.load_state_dict({**state, "decoder.weight": state["encoder.weight"]}, strict=True)
        return model.to(device=device, dtype=dtype).eval()
