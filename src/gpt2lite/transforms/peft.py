"""LoRA adapters in the PEFT file format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's (``base_model.model.transformer.h.N.attn.c_attn.lora_A.weight``,
...), so an adapter trained here loads with ``peft`` onto ``transformers``' GPT-2,
and one made with ``peft`` loads here. The adapter layer itself is ``lora.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from gpt2lite.errors import CheckpointError
from gpt2lite.io.files import atomic_write, read_json, write_json
from gpt2lite.io.tensors import open_tensors
from gpt2lite.transforms.lora import TARGETS, LoraConfig, LoraLinear, add_lora, has_lora, target_layers

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterWeights",
    "adapter_base",
    "adapter_labels",
    "load_adapter",
    "read_adapter",
    "read_adapter_config",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_OLD_ADAPTER_WEIGHTS = "adapter_model.bin"  # older peft versions saved a pickle (read without running code)
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
    write_json(directory / ADAPTER_CONFIG, peft_config)
    return directory


def read_adapter_config(directory: str | os.PathLike[str]) -> LoraConfig:
    """The ``LoraConfig`` of a PEFT adapter directory, refusing PEFT options gpt2lite does not implement.

    Every field is checked for its type too: a problem is one ``CheckpointError``
    naming the file and the field.
    """
    path = Path(directory) / ADAPTER_CONFIG
    try:
        d = read_json(path)
    except FileNotFoundError:
        raise CheckpointError(f"{str(directory)!r} is not a LoRA adapter: it has no {ADAPTER_CONFIG}") from None
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{str(path)!r} holds a JSON {type(d).__name__}, not an object of settings")
    if d.get("peft_type") != "LORA":
        raise CheckpointError(f"{str(path)!r} is not a LoRA adapter (peft_type {d.get('peft_type')!r})")
    unsupported = {"use_dora": False, "lora_bias": False, "bias": "none", "layers_to_transform": None,
                   "rank_pattern": {}, "alpha_pattern": {}, "trainable_token_indices": None,
                   "target_parameters": None, "layer_replication": None}
    for key, default in unsupported.items():
        allowed = (default, None) if default == {} else (default,)  # an empty pattern may be written as null
        if d.get(key, default) not in allowed:
            raise CheckpointError(f"{str(path)!r} sets {key}={d[key]!r:.100}, which gpt2lite's LoRA does not support")
    _modules_to_save(d, path)  # type-checked here; which names apply depends on the model (load_adapter)
    targets = d.get("target_modules")
    if isinstance(targets, str):
        raise CheckpointError(f"{str(path)!r} gives target_modules as a pattern ({targets!r:.100}); "
                              f"gpt2lite needs a list of layer names from {TARGETS}")
    fields = {"r": int, "lora_alpha": (int, float), "lora_dropout": (int, float), "use_rslora": bool,
              "base_model_name_or_path": (str, type(None)), "target_modules": (list, type(None))}
    for key, kind in fields.items():
        value = d.get(key)
        if key in d and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
            raise CheckpointError(f"{str(path)!r}: {key} must be {_kind_name(kind)}, got {value!r:.100}")
    if "r" not in d or "lora_alpha" not in d:
        raise CheckpointError(f"{str(path)!r} is not a usable LoRA config: it needs r and lora_alpha")
    try:
        return LoraConfig(r=d["r"], lora_alpha=d["lora_alpha"], lora_dropout=d.get("lora_dropout", 0.0),
                          target_modules=tuple(targets or ()), use_rslora=d.get("use_rslora", False),
                          base_model_name_or_path=d.get("base_model_name_or_path"))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a usable LoRA config: {exc}") from None


def _modules_to_save(d: dict[str, Any], path: Path) -> tuple[str, ...]:
    """The config's ``modules_to_save``: whole modules the adapter replaces, by name or name suffix."""
    saved = d.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        raise CheckpointError(f"{str(path)!r}: modules_to_save must be a list of module names")
    return tuple(saved)


def _check_saved_modules(model: nn.Module, directory: Path, stored: set[str]) -> None:
    """Refuse whole saved modules other than the classifier's ``score``, by name, as far as they apply.

    PEFT writes a task's usual head names for every architecture (``SEQ_CLS``
    lists ``classifier``, ``score`` and ``pre_classifier``) and wraps only those
    the model has; so does this: a name that matches none of the model's modules
    and has no tensors in the weights file is ignored.
    """
    path = directory / ADAPTER_CONFIG
    names = [_peft_key(model, n)[len(_PEFT_PREFIX):] for n, _ in model.named_modules() if n]
    refused = []
    for saved in _modules_to_save(read_json(path), path):
        if saved == "score":
            continue
        in_model = any(n == saved or n.endswith("." + saved) for n in names)
        in_file = any(k.startswith(_PEFT_PREFIX) and f".{saved}." in "." + k[len(_PEFT_PREFIX):] for k in stored)
        if in_model or in_file:
            refused.append(saved)
    if refused:
        raise CheckpointError(f"{str(path)!r} saves whole modules {refused}; gpt2lite supports only 'score' "
                              "(the classifier's head)")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an int", float: "a number", bool: "true or false", str: "a string", list: "a list",
             type(None): "null"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(dict.fromkeys(names[k] for k in kinds if not (k is int and float in kinds)))


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


def _weights_file(directory: str | os.PathLike[str]) -> Path:
    """The adapter's weights: ``adapter_model.safetensors``, else an older ``adapter_model.bin``."""
    directory = Path(directory)
    old = directory / _OLD_ADAPTER_WEIGHTS
    return old if old.is_file() and not (directory / ADAPTER_WEIGHTS).is_file() else directory / ADAPTER_WEIGHTS


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The tensor shapes and the metadata of a safetensors file, read from its header alone."""
    if not path.is_file():
        raise CheckpointError(f"{str(path.parent)!r} has no {path.name}")
    with open_tensors(path) as f:
        return {k: f.shape(k) for k in f.names()}, f.metadata()


def adapter_labels(directory: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """The class names a classifier's adapter was saved with (None for others, and for ``peft``'s files).

    They must be as many as the rows of the saved ``score`` head.
    """
    path = _weights_file(directory)
    shapes, metadata = _header(path)
    stored = metadata.get(LABELS_METADATA_KEY)
    if not stored:
        return None
    rows = next((shape[0] for key, shape in shapes.items() if key.endswith("score.weight")), None)
    if rows is None or len(stored) > 1024 * (rows + 1):  # names of at most about a KiB each
        raise CheckpointError(f"{str(path)!r}: its class names ({LABELS_METADATA_KEY}) do not fit its score head")
    try:
        labels = json.loads(stored)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{str(path)!r}: {LABELS_METADATA_KEY} is not valid JSON: {exc}") from None
    if not isinstance(labels, list) or len(labels) != rows or not all(isinstance(n, str) for n in labels):
        raise CheckpointError(f"{str(path)!r}: {LABELS_METADATA_KEY} must list {rows} class names, one per row of "
                              "the score head")
    return tuple(labels)


@dataclass(frozen=True)
class AdapterWeights:
    """A PEFT adapter read and checked against a model: its config, ``(A, B)`` per target layer, a ``score`` head."""

    config: LoraConfig
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # full layer name -> (A (r, in), B (out, r))
    score: torch.Tensor | None


def read_adapter(model: nn.Module, directory: str | os.PathLike[str],
                 types: tuple[type[nn.Module], ...] = (nn.Linear, LoraLinear)) -> AdapterWeights:
    """Read the adapters of a PEFT directory (ours or ``peft``'s) for ``model``, whose layers stay as they are.

    ``types``: the kinds of layer a target may be (a quantized model's too, for
    serving). The file's tensor shapes are checked against the config's rank and
    the model's layers before anything is read; a problem is one ``CheckpointError``.
    """
    config = read_adapter_config(directory)
    path = _weights_file(directory)
    shapes, _ = _header(path)
    stored = {_without_adapter_name(k): k for k in shapes}
    ranks = {shapes[k][0 if ".lora_A." in k else 1] for k in shapes if ".lora_A." in k or ".lora_B." in k}
    if ranks != {config.r}:
        raise CheckpointError(f"{str(path)!r} holds adapters of rank {sorted(ranks)[:4]}, but its "
                              f"{ADAPTER_CONFIG} says r={config.r}")
    _check_saved_modules(model, Path(directory), set(stored))
    try:
        layers = target_layers(model, config.target_modules, types)
    except ValueError as exc:
        raise CheckpointError(f"{str(path)!r} does not fit this model: {exc}") from None
    expected: dict[str, tuple[int, ...]] = {}  # PEFT's key -> the shape the model needs
    for parent, attr, name in layers:
        layer = getattr(parent, attr)
        expected[_peft_key(model, f"{name}.lora_A.weight")] = (config.r, layer.in_features)
        expected[_peft_key(model, f"{name}.lora_B.weight")] = (layer.out_features, config.r)
    score = getattr(model, "score", None)
    if score is not None:
        expected[_peft_key(model, "score.weight")] = tuple(score.weight.shape)
    missing = [k for k in expected if k not in stored and not k.endswith("score.weight")]
    unexpected = [k for k in stored if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r} does not fit this model: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    for key, shape in expected.items():
        if key in stored and tuple(shapes[stored[key]]) != shape:
            raise CheckpointError(f"{key!r} in {str(path)!r} has shape {tuple(shapes[stored[key]])}, "
                                  f"the model needs {shape}")
    with open_tensors(path) as f:
        tensors = {key: f.tensor(stored[key]) for key in expected if key in stored}
    weights = {name: (tensors[_peft_key(model, f"{name}.lora_A.weight")],
                      tensors[_peft_key(model, f"{name}.lora_B.weight")]) for _, _, name in layers}
    return AdapterWeights(config, weights, tensors.get(_peft_key(model, "score.weight")))


def load_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Add the adapters saved in a PEFT directory (ours or ``peft``'s) to ``model`` in place; return it.

    The file is read and checked (``read_adapter``) before any adapter is made.
    """
    weights = read_adapter(model, directory)
    add_lora(model, weights.config)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b) in weights.layers.items():
            modules[name].lora_A.weight.copy_(a)
            modules[name].lora_B.weight.copy_(b)
        if weights.score is not None:
            model.score.weight.copy_(weights.score)
    return model


def _without_adapter_name(key: str) -> str:
    """PEFT drops the adapter name ("default") when it saves; older files may keep it."""
    return key.replace(".default.", ".").replace("modules_to_save.", "")
