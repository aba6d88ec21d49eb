"""LoRA: low-rank adapters on GPT-2's linear layers, saved and loaded in the PEFT format.

A target layer ``y = x W.T + b`` becomes ``y = x W.T + b + s * dropout(x) A.T B.T``
with ``A`` ``(r, in)``, ``B`` ``(out, r)`` and ``s = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``). ``W`` and ``b`` stay frozen;
only ``A``, ``B`` (and a classifier's ``score`` head) train, so the optimizer
keeps state for a few hundred thousand numbers instead of the whole model.

The files are PEFT's (``adapter_config.json`` + ``adapter_model.safetensors``,
keys ``base_model.model.transformer.h.N.attn.c_attn.lora_A.weight``, ...), so an
adapter trained here loads with ``peft`` onto ``transformers``' GPT-2, and one
made with ``peft`` loads here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from gpt2lite.errors import CheckpointError
from gpt2lite.files import atomic_write

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoraConfig",
    "LoraLinear",
    "adapter_base",
    "adapter_labels",
    "add_lora",
    "has_lora",
    "load_adapter",
    "merge_lora",
    "read_adapter_config",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# GPT-2's linear layers, by the names PEFT matches ("c_proj" is both attention's and the MLP's).
TARGETS = ("c_attn", "c_proj", "c_fc")
_PEFT_PREFIX = "base_model.model."
LABELS_METADATA_KEY = "gpt2lite.labels"


@dataclass(frozen=True)
class LoraConfig:
    """Rank, scale, dropout and target layers of LoRA adapters (PEFT's names and defaults)."""

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("c_attn",)
    use_rslora: bool = False
    base_model_name_or_path: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be an int >= 1, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
        if not targets:
            raise ValueError(f"target_modules must name at least one of {TARGETS}")
        for t in targets:
            if not isinstance(t, str) or t.rsplit(".", 1)[-1] not in TARGETS:
                raise ValueError(f"LoRA target {t!r} is not a GPT-2 linear layer; use names from {TARGETS} "
                                 "(or attn.c_proj / mlp.c_proj)")
        object.__setattr__(self, "target_modules", targets)

    @property
    def scaling(self) -> float:
        """The factor ``s`` on the low-rank update."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) plus a trainable low-rank update ``lora_B(lora_A(x))``."""

    def __init__(self, base_layer: nn.Linear, config: LoraConfig) -> None:
        """Wrap ``base_layer``; ``B`` starts at zero, so the layer's output is unchanged until it trains."""
        super().__init__()
        self.base_layer = base_layer
        self.scaling = config.scaling
        device, dtype = base_layer.weight.device, base_layer.weight.dtype
        self.lora_A = nn.Linear(base_layer.in_features, config.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(config.r, base_layer.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(config.lora_dropout)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's (and nn.Linear's) default
        nn.init.zeros_(self.lora_B.weight)
        base_layer.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base_layer(x)`` plus the scaled low-rank update."""
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight: ``W + s * B @ A``."""
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)
            self.base_layer.weight.data = (self.base_layer.weight.float() + delta).to(self.base_layer.weight.dtype)
        return self.base_layer


def _body(model: nn.Module) -> nn.Module:
    """The GPT-2 body of a language model or a classifier."""
    from gpt2lite.models.gpt2 import GPT2  # here: gpt2 imports this module

    body = getattr(model, "transformer", model)
    if not isinstance(body, GPT2):
        raise TypeError(f"LoRA adapters go on GPT-2 models, not {type(model).__name__}")
    return body


def _targets(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, full name) of every linear layer a target names, as PEFT matches them."""
    found = []
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            full = f"{name}.{attr}" if name else attr
            if isinstance(child, (nn.Linear, LoraLinear)) and any(full == t or full.endswith("." + t) for t in targets):
                found.append((module, attr, full))
    if not found:
        raise ValueError(f"no layer of the model matches the LoRA targets {list(targets)}")
    return found


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters."""
    return any(isinstance(m, LoraLinear) for m in model.modules())


def add_lora(model: nn.Module, config: LoraConfig = LoraConfig()) -> nn.Module:
    """Put fresh adapters on the target layers of a GPT-2 (or classifier) in place and freeze the rest.

    Afterwards only the adapters, and a classifier's ``score`` head, have
    ``requires_grad``. Example::

        model = add_lora(GPT2.from_pretrained("gpt2"), LoraConfig(r=8, target_modules=("c_attn", "c_proj")))
    """
    from gpt2lite.models.quantize import is_quantized

    _body(model)
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge_lora() them first")
    if is_quantized(model):
        raise ValueError("LoRA trains in floating point: load the model without quantize")
    if config.base_model_name_or_path is None:
        config = dataclasses.replace(config, base_model_name_or_path=getattr(_body(model), "name_or_path", None))
    model.requires_grad_(False)
    for parent, attr, _ in _targets(model, config.target_modules):
        # New modules start in training mode: follow the model's, or a loaded adapter would apply dropout.
        setattr(parent, attr, LoraLinear(getattr(parent, attr), config).train(model.training))
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
    score = getattr(model, "score", None)
    if score is not None:
        score.requires_grad_(True)
    model.lora_config = config  # type: ignore[assignment]  # save_adapter writes it
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight in place (plain ``nn.Linear`` layers again); return the model."""
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoraLinear):
                setattr(module, attr, child.merged())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def _peft_key(model: nn.Module, name: str) -> str:
    """PEFT's key for one of our parameter names (a GPT-2 LM's body is ``transformer`` in transformers)."""
    return _PEFT_PREFIX + (name if hasattr(model, "transformer") else "transformer." + name)


def save_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write the model's adapters (and classifier head) in the PEFT format; return the directory."""
    config: LoraConfig | None = getattr(model, "lora_config", None)
    if config is None or not has_lora(model):
        raise ValueError("the model has no LoRA adapters to save (see add_lora)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        _peft_key(model, name): p.detach().contiguous().cpu()
        for name, p in model.named_parameters()
        if ".lora_A." in name or ".lora_B." in name or name == "score.weight"
    }
    classifier = hasattr(model, "score")
    peft_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
        "base_model_name_or_path": config.base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": list(config.target_modules),
        "use_rslora": config.use_rslora,
        "fan_in_fan_out": True,  # transformers' GPT-2 stores these layers as Conv1D, [in, out]
        "bias": "none",
        "modules_to_save": ["score"] if classifier else None,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    metadata = {"format": "pt"}
    labels = getattr(getattr(model, "config", None), "labels", None)
    if classifier and labels:  # PEFT keeps no class names; they travel in the file's metadata
        metadata[LABELS_METADATA_KEY] = json.dumps(list(labels))
    with atomic_write(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    with atomic_write(directory / ADAPTER_CONFIG) as tmp:
        tmp.write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
    return directory


def read_adapter_config(directory: str | os.PathLike[str]) -> LoraConfig:
    """The ``LoraConfig`` of a PEFT adapter directory, refusing PEFT options gpt2lite does not implement."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{str(directory)!r} is not a LoRA adapter: it has no {ADAPTER_CONFIG}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(d, dict) or d.get("peft_type") != "LORA":
        raise CheckpointError(f"{str(path)!r} is not a LoRA adapter (peft_type {d.get('peft_type')!r})")
    unsupported = {"use_dora": False, "lora_bias": False, "bias": "none", "layers_to_transform": None,
                   "rank_pattern": {}, "alpha_pattern": {}, "trainable_token_indices": None,
                   "target_parameters": None, "layer_replication": None}
    for key, default in unsupported.items():
        allowed = (default, None) if default == {} else (default,)  # an empty pattern may be written as null
        if d.get(key, default) not in allowed:
            raise CheckpointError(f"{str(path)!r} sets {key}={d[key]!r}, which gpt2lite's LoRA does not support")
    extra = set(d.get("modules_to_save") or ()) - {"score", "classifier"}
    if extra:
        raise CheckpointError(f"{str(path)!r} saves whole modules {sorted(extra)}; gpt2lite supports only 'score'")
    targets = d.get("target_modules")
    if isinstance(targets, str):
        raise CheckpointError(f"{str(path)!r} gives target_modules as a pattern ({targets!r}); "
                              f"gpt2lite needs a list of layer names from {TARGETS}")
    try:
        return LoraConfig(r=d["r"], lora_alpha=d["lora_alpha"], lora_dropout=d.get("lora_dropout", 0.0),
                          target_modules=tuple(targets or ()), use_rslora=bool(d.get("use_rslora", False)),
                          base_model_name_or_path=d.get("base_model_name_or_path"))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a usable LoRA config: {exc}") from None


def adapter_base(path: str | os.PathLike[str]) -> str | None:
    """For a directory that holds only a LoRA adapter, the base model it names; otherwise None."""
    directory = Path(path)
    if not (directory / ADAPTER_CONFIG).is_file() or (directory / "config.json").is_file():
        return None
    base = read_adapter_config(directory).base_model_name_or_path
    if not base:
        raise CheckpointError(f"{str(directory)!r} holds a LoRA adapter that names no base model "
                              "(base_model_name_or_path): load the base with adapter=this directory")
    return base


def adapter_labels(directory: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """The class names a classifier's adapter was saved with (None for others, and for ``peft``'s files)."""
    try:
        with safe_open(str(Path(directory) / ADAPTER_WEIGHTS), framework="pt") as f:
            stored = (f.metadata() or {}).get(LABELS_METADATA_KEY)
    except Exception as exc:  # safetensors raises its own error types for a bad file
        raise CheckpointError(f"{str(directory)!r} has no readable {ADAPTER_WEIGHTS}: {exc}") from None
    return tuple(json.loads(stored)) if stored else None


def load_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Add the adapters saved in a PEFT directory (ours or ``peft``'s) to ``model`` in place; return it."""
    config = read_adapter_config(directory)
    add_lora(model, config)
    expected = {_peft_key(model, name): name for name, p in model.named_parameters()
                if ".lora_A." in name or ".lora_B." in name}
    if hasattr(model, "score"):
        expected[_peft_key(model, "score.weight")] = "score.weight"
    path = Path(directory) / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {_without_adapter_name(k): k for k in f.keys()}  # noqa: SIM118
            missing = [k for k in expected if k not in stored and not k.endswith("score.weight")]
            unexpected = [k for k in stored if k not in expected]
            if missing or unexpected:
                raise CheckpointError(f"{str(path)!r} does not fit this model: missing {missing[:4]}, "
                                      f"unexpected {unexpected[:4]}")
            params = dict(model.named_parameters())
            with torch.no_grad():
                for key, name in expected.items():
                    if key not in stored:
                        continue
                    t = f.get_tensor(stored[key])
                    p = params[name]
                    if tuple(t.shape) != tuple(p.shape):
                        raise CheckpointError(f"{key!r} in {str(path)!r} has shape {tuple(t.shape)}, "
                                              f"the model needs {tuple(p.shape)}")
                    p.copy_(t)
    except FileNotFoundError:
        raise CheckpointError(f"{str(directory)!r} has no {ADAPTER_WEIGHTS}") from None
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a bad file
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None
    return model


def _without_adapter_name(key: str) -> str:
    """PEFT drops the adapter name ("default") when it saves; older files may keep it."""
    return key.replace(".default.", ".").replace("modules_to_save.", "")
