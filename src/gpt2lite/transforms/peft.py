"""LoRA adapters in the PEFT file format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's (``base_model.model.transformer.h.N.attn.c_attn.lora_A.weight``,
...), so an adapter trained here loads with ``peft`` onto ``transformers``' GPT-2,
and one made with ``peft`` loads here. The adapter layer itself is ``lora.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from gpt2lite.errors import CheckpointError
from gpt2lite.io.files import atomic_write
from gpt2lite.transforms.lora import TARGETS, LoraConfig, add_lora, has_lora

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "adapter_base",
    "adapter_labels",
    "load_adapter",
    "read_adapter_config",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
LABELS_METADATA_KEY = "gpt2lite.labels"


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
