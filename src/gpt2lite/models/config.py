"""GPT-2 hyperparameters: a frozen dataclass and the published presets."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from gpt2lite.errors import CheckpointError
from gpt2lite.io.files import read_json

__all__ = ["ACTIVATIONS", "MAX_LABELS", "PRESETS", "GPT2Config"]

# The MLP activations transformers' GPT-2 takes (its ACT2FN names), all of which models/gpt2.py computes.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "quick_gelu", "relu", "silu", "swish", "tanh",
               "sigmoid", "linear")

MAX_LABELS = 100_000  # class names a classifier may have: a bound on what a config file can make us build


@dataclass(frozen=True)
class GPT2Config:
    """Shape and numerics of a GPT-2 model; field names follow Hugging Face's ``config.json``."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None  # read by transformers' sequence classifier to find each row's last token
    labels: tuple[str, ...] | None = None  # class names of a sequence classifier, by id (id2label)
    # Variants transformers' GPT-2 supports (codeparrot, Cerebras-GPT, Mistral's GPT-2s use some of them):
    scale_attn_weights: bool = True  # attention scores divided by sqrt(head width)
    scale_attn_by_inverse_layer_idx: bool = False  # ... and by the layer's number (from 1)
    reorder_and_upcast_attn: bool = False  # attention computed in float32 whatever the model's dtype
    tie_word_embeddings: bool = True  # the LM head is the token embedding; False: an lm_head of its own

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is not None and (not _is_int(self.n_inner) or self.n_inner <= 0):
            raise ValueError(f"GPT2Config.n_inner must be a positive int or null (4 * n_embd), got {self.n_inner!r}")
        eps = self.layer_norm_epsilon
        if not _is_number(eps) or not 0 < eps < 1:
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be a number in (0, 1), got {eps!r}")
        if not isinstance(self.activation_function, str) or self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"activation_function {self.activation_function!r} is not supported; use one of {ACTIVATIONS}"
            )
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                     "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPT2Config.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"GPT2Config.{name} must be a number in [0, 1), got {value!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"GPT2Config.{name} must be null or a token id (an int >= 0), got {value!r}")
        if self.labels is not None:
            labels = self.labels
            if isinstance(labels, (str, bytes)) or not all(isinstance(n, str) and n for n in labels):
                raise ValueError(f"GPT2Config.labels must be a sequence of non-empty names, got {labels!r:.200}")
            if len(labels) > MAX_LABELS:
                raise ValueError(f"GPT2Config.labels names {len(labels)} classes; gpt2lite takes at most {MAX_LABELS}")
            object.__setattr__(self, "labels", tuple(labels))
            if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
                raise ValueError(f"GPT2Config.labels must name at least 2 distinct classes, got {labels!r:.200}")

    @property
    def num_labels(self) -> int:
        """Number of classes of a sequence classifier (0 for a language model)."""
        return len(self.labels) if self.labels else 0

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        """Width of the MLP's hidden layer."""
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPT2Config:
        """The config of a published model (``"gpt2"``, ``"gpt2-medium"``, ...), optionally changed."""
        key = name.rsplit("/", 1)[-1]
        if key not in PRESETS:
            raise ValueError(f"no preset named {name!r}; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[key], **overrides)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPT2Config:
        """Build from a Hugging Face ``config.json`` dict; keys that do not concern the model are ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"a GPT-2 config must be a JSON object of settings, got a {type(d).__name__}")
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"config is for model_type {model_type!r}; gpt2lite loads GPT-2 models only")
        if d.get("add_cross_attention", False) is not False:
            raise ValueError(f"config sets add_cross_attention={d['add_cross_attention']!r}: an encoder-decoder "
                             "GPT-2, which gpt2lite does not support")
        names = {f.name for f in dataclasses.fields(cls)} - {"labels"}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "id2label" in d and any("ForSequenceClassification" in a for a in d.get("architectures") or ()):
            kwargs["labels"] = _labels_from_id2label(d["id2label"])
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ValueError(f"config does not describe a GPT-2: {exc}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> GPT2Config:
        """Read a Hugging Face ``config.json``; any problem is one error naming the file and the field."""
        settings = read_json(path)  # its errors name the file already
        try:
            return cls.from_dict(settings)
        except ValueError as exc:
            raise CheckpointError(f"{str(path)!r}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that Hugging Face ``transformers`` also reads."""
        d = dataclasses.asdict(self)
        labels = d.pop("labels")
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=self.n_positions)
        if labels:
            d.update(
                architectures=["GPT2ForSequenceClassification"],
                id2label={str(i): name for i, name in enumerate(labels)},
                label2id={name: i for i, name in enumerate(labels)},
            )
        return d


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # not NaN


def _labels_from_id2label(id2label: Any) -> tuple[str, ...]:
    """Class names in id order from a ``config.json`` ``id2label`` (keys are ids as strings)."""
    if not isinstance(id2label, dict) or not id2label:
        raise ValueError(f"id2label must be a non-empty object of id -> name, got {id2label!r:.200}")
    if len(id2label) > MAX_LABELS:
        raise ValueError(f"id2label names {len(id2label)} classes; gpt2lite takes at most {MAX_LABELS}")
    try:
        by_id = {int(k): v for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ValueError(f"id2label keys must be class ids 0..n-1, got {list(id2label)!r:.200}") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError(f"id2label keys must be the class ids 0..{len(by_id) - 1}, got {sorted(by_id)!r:.200}")
    return tuple(str(by_id[i]) for i in range(len(by_id)))


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": GPT2Config(n_layer=6, n_head=12, n_embd=768),
    # Not published: a few-hundred-K-parameter model for tests and training from scratch.
    "tiny": GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128),
}
