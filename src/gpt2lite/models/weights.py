"""Reading and writing GPT-2 checkpoints in the published (hub) layout: safetensors, or ``pytorch_model.bin``.

This module deals in files, configs and state dicts; ``GPT2.from_pretrained``
builds the model from what it returns. ``gpt2lite.io.tensors`` reads the files:
safetensors (preferred where both are there) and PyTorch pickles, which are read
without running code.

The hub files store the four Conv1D weights of each block as ``[in, out]``;
``nn.Linear`` wants ``[out, in]``, so exactly those are transposed on the way in
and out. The ``h.N.attn.bias`` / ``masked_bias`` causal-mask buffers are
ignored, and ``transformers``' ``transformer.`` prefix and tied ``lm_head`` are
accepted; an untied ``lm_head`` is read when the config says so.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import save_file

from gpt2lite.errors import CheckpointError, ModelNotFoundError
from gpt2lite.io.files import atomic_write, read_json
from gpt2lite.io.hub import resolve_files
from gpt2lite.io.tensors import TensorFile, open_tensors
from gpt2lite.models.config import PRESETS, GPT2Config

__all__ = [
    "CONV1D_WEIGHTS",
    "check_config",
    "expected_shapes",
    "infer_config",
    "load_checkpoint",
    "own_memory",
    "resolve_dtype",
    "save_checkpoint",
]

# Stored [in, out] in the hub files, [out, in] in nn.Linear.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# Per-layer causal-mask buffers that old checkpoints carry; the model builds its mask itself.
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")

# In this order: safetensors first where a repo holds both (DialoGPT's and others' older branches hold only .bin).
_CHECKPOINT_FILES = [("config.json", "model.safetensors"), ("config.json", "model.safetensors.index.json"),
                     ("config.json", "pytorch_model.bin"), ("config.json", "pytorch_model.bin.index.json")]
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


# The safetensors metadata key under which save_checkpoint stores config.json, so that a
# lone model.safetensors file still says what model it is.
CONFIG_METADATA_KEY = "gpt2lite.config"

def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accept ``torch.float16`` or a name such as ``"fp16"`` / ``"bfloat16"``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}") from None


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint in the hub layout, with its shape."""
    C, M = config.n_embd, config.mlp_dim
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (config.vocab_size, C),
        "wpe.weight": (config.n_positions, C),
        "ln_f.weight": (C,),
        "ln_f.bias": (C,),
    }
    for i in range(config.n_layer):
        shapes.update({
            f"h.{i}.ln_1.weight": (C,), f"h.{i}.ln_1.bias": (C,),
            f"h.{i}.attn.c_attn.weight": (C, 3 * C), f"h.{i}.attn.c_attn.bias": (3 * C,),
            f"h.{i}.attn.c_proj.weight": (C, C), f"h.{i}.attn.c_proj.bias": (C,),
            f"h.{i}.ln_2.weight": (C,), f"h.{i}.ln_2.bias": (C,),
            f"h.{i}.mlp.c_fc.weight": (C, M), f"h.{i}.mlp.c_fc.bias": (M,),
            f"h.{i}.mlp.c_proj.weight": (M, C), f"h.{i}.mlp.c_proj.bias": (C,),
        })
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, C)
    return shapes


def _is_conv1d(key: str) -> bool:
    return key.endswith(CONV1D_WEIGHTS)


def _normalize_key(key: str) -> str:
    return key.removeprefix("transformer.")


def _entries(handles: list[TensorFile]) -> list[tuple[str, str, TensorFile, tuple[int, ...], str]]:
    """(normalized key, key as stored, file, shape, dtype name) of every tensor of a (possibly sharded) checkpoint.

    No tensor data is read: safetensors' headers, or a pickle's mapped tensors, say it all.
    """
    return [(_normalize_key(key), key, f, f.shape(key), f.dtype(key)) for f in handles for key in f.names()]


def _shard_names(index_file: Path) -> list[str]:
    """The shard files an index names; each must be a plain file name in the index's own directory."""
    try:
        index = read_json(index_file)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{str(index_file)!r} has no weight_map")
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        # A name with a directory part ("../x", "/etc/x", "sub/x") could read any file on the machine.
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise CheckpointError(
                f"{str(index_file)!r} names shard {name!r}, which is not a file name in the model's own directory; "
                "refusing to read it"
            )
    return names


def infer_config(handles: list[TensorFile]) -> GPT2Config:
    """The config of a bare weights file that has no ``config.json`` beside it.

    A file written by ``save_pretrained`` carries its config in its metadata.
    Otherwise the shapes are matched against the published GPT-2 models: the
    number of heads is in no shape, so any other shape is an error that asks for
    ``config=`` rather than a guess that would silently give other logits.
    """
    where = str(handles[0].path)
    stored = handles[0].metadata().get(CONFIG_METADATA_KEY)
    if stored is not None:
        try:
            return GPT2Config.from_dict(json.loads(stored))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where!r} carries an unreadable config in its metadata: {exc}") from None
    shapes = {key: shape for key, _, _, shape, _ in _entries(handles)}
    try:
        vocab_size, n_embd = shapes["wte.weight"]
        n_positions = shapes["wpe.weight"][0]
        mlp_dim = shapes["h.0.mlp.c_fc.weight"][1]
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(f"cannot infer a GPT-2 config from {where!r}: it has no GPT-2 tensor {exc}") from None
    n_layer = 1 + max(int(m.group(1)) for k in shapes if (m := _LAYER.match(k)))
    for name, preset in PRESETS.items():
        published = (preset.vocab_size, preset.n_positions, preset.n_embd, preset.n_layer, preset.mlp_dim)
        if name != "tiny" and published == (vocab_size, n_positions, n_embd, n_layer, mlp_dim):
            return preset
    raise CheckpointError(
        f"{where!r} has no config.json beside it and its shapes (n_layer={n_layer}, n_embd={n_embd}, "
        f"n_positions={n_positions}, vocab_size={vocab_size}) are not those of a published GPT-2, so its number "
        "of attention heads is unknown: put its config.json beside it or pass config=GPT2Config(...)"
    )


_LAYER = re.compile(r"h\.(\d+)\.")


def check_config(config: GPT2Config, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Refuse a config that does not describe the checkpoint's tensors, naming the field, before anything is built.

    The tensor shapes come from the files' headers (cheap to read), so a config
    that claims a million layers is refused at once instead of allocating them.
    """
    layers = {int(m.group(1)) for key in shapes if (m := _LAYER.match(key))}
    held = max(layers) + 1 if layers else 0
    problems = []
    if held != config.n_layer:
        problems.append(f"n_layer is {config.n_layer} but the weights hold {held} layers")
    wte, wpe, fc = shapes.get("wte.weight"), shapes.get("wpe.weight"), shapes.get("h.0.mlp.c_fc.weight")
    if wte is not None and wte != (config.vocab_size, config.n_embd):
        problems.append(f"vocab_size x n_embd is {config.vocab_size} x {config.n_embd} but wte.weight is {wte}")
    if wpe is not None and wpe[:1] != (config.n_positions,):
        problems.append(f"n_positions is {config.n_positions} but wpe.weight has {wpe[0]} rows")
    if fc is not None and fc[1:] != (config.mlp_dim,):
        problems.append(f"the MLP width (n_inner) is {config.mlp_dim} but h.0.mlp.c_fc.weight is {fc}")
    if problems:
        raise CheckpointError(f"the config does not describe {where!r}: " + "; ".join(problems))


def load_state_dict(
    files: list[Path], config: GPT2Config, *, device: torch.device | str | None = None,
    dtype: torch.dtype | None = None, heads: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a state dict for ``GPT2``, checking every key and shape first.

    ``heads`` names extra tensors a task head may find in the checkpoint (for
    example ``{"score.weight": (num_labels, n_embd)}``), with their shapes: they
    are returned when present and may be absent.
    """
    with ExitStack() as stack:
        handles = [stack.enter_context(open_tensors(p)) for p in files]
        return _read_state(handles, config, device, dtype, heads or {})


def _read_state(handles: list[TensorFile], config: GPT2Config, device: torch.device | str | None,
                dtype: torch.dtype | None, heads: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    where = str(handles[0].path) if len(handles) == 1 else str(handles[0].path.parent)
    entries = _entries(handles)
    check_config(config, {key: shape for key, _, _, shape, _ in entries}, where)  # before building anything
    expected = {**expected_shapes(config), **heads}
    found: dict[str, tuple[str, TensorFile]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    tied_head: tuple[str, TensorFile] | None = None
    unexpected = []
    dtypes: dict[str, str] = {}
    for key, stored, handle, shape, dtype_name in entries:
        dtypes[key] = dtype_name
        if key == "lm_head.weight" and config.tie_word_embeddings:
            tied_head = (stored, handle)
        elif key in expected:
            found[key] = (stored, handle)
            shapes[key] = shape
        elif not _IGNORED.fullmatch(key):
            unexpected.append(stored)
    missing = [k for k in expected if k not in found and k not in heads]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        if "score.weight" in unexpected:
            parts.append("it is a sequence classifier: load it with load_model(..., kind='classifier')")
        raise CheckpointError(
            f"{where!r} does not match a GPT-2 with {config.n_layer} layers, n_embd={config.n_embd}: "
            + "; ".join(parts)
        )

    for key, (stored, _) in found.items():
        if shapes[key] != expected[key]:
            raise CheckpointError(f"tensor {stored!r} has shape {shapes[key]}, expected {expected[key]}")
        if dtypes[key] not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"tensor {stored!r} holds {dtypes[key]} values; GPT-2 weights are floating point (F32, F16, BF16)"
            )
    if dtype is None:
        first = dtypes["wte.weight"]
        odd = next((found[k][0] for k in found if dtypes[k] != first), None)
        if odd is not None:
            raise CheckpointError(
                f"tensor {odd!r} is {dtypes[_normalize_key(odd)]} while wte.weight is {first}: the checkpoint mixes "
                "dtypes; load it with dtype='float32' (or another) to convert every tensor to one"
            )

    # Both formats hand out tensors that map the file (no copy), so a float32 load on the CPU
    # copies nothing (the Conv1D weights become transposed views); a dtype or device change
    # converts one tensor at a time. Transforms that want other layouts copy (``own_memory``).
    state: dict[str, torch.Tensor] = {}
    for key, (stored, handle) in found.items():
        t = handle.tensor(stored)
        if _is_conv1d(key):
            t = t.t()  # [in, out] -> [out, in], as a view
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        state[key] = t.to(device) if device is not None else t
    if tied_head is not None:
        stored, handle = tied_head
        head = handle.tensor(stored)
        wte = state["wte.weight"]
        if head.shape != wte.shape or not torch.equal(head.to(wte), wte):
            raise CheckpointError(f"{stored!r} differs from wte.weight, but the config ties the LM head to the "
                                  "token embedding; set tie_word_embeddings: false in its config.json")
    return state


def own_memory(module: torch.nn.Module) -> None:
    """Give each parameter of ``module`` a contiguous copy of its own, so that none is a view of the mapped file.

    A loaded checkpoint's tensors map its file (and the Conv1D weights are transposed
    views of it); a transform that replaces some of them calls this so that the
    rest do not keep the whole file mapped beside the new copies.
    """
    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.clone(memory_format=torch.contiguous_format)


def load_checkpoint(
    name_or_path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    config: GPT2Config | None = None,
    heads: Callable[[GPT2Config], dict[str, tuple[int, ...]]] | None = None,
) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """Find a checkpoint and read it: its config and a state dict for ``GPT2`` (see ``GPT2.from_pretrained``).

    A directory or hub repo holds ``config.json`` and ``model.safetensors`` (or its
    sharded index), else ``pytorch_model.bin`` (or its index); a bare weights file
    takes the config beside it or in its metadata. ``heads(config)`` gives the
    optional task-head tensors to read as well (see ``load_state_dict``).
    """
    dtype = resolve_dtype(dtype)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix not in _WEIGHT_SUFFIXES:
            raise ModelNotFoundError(f"{str(path)!r} is not a weights file ({', '.join(_WEIGHT_SUFFIXES)})")
        files = [path]
        beside = path.with_name("config.json")
        if config is None and beside.is_file():
            config = GPT2Config.from_json_file(beside)
    else:
        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        config_file, weights_file = resolve_files(name_or_path, _CHECKPOINT_FILES, what="GPT-2 checkpoint", **hub)
        config = config or GPT2Config.from_json_file(config_file)
        if weights_file.name.endswith(".index.json"):
            files = [
                resolve_files(name_or_path, [(name,)], what="checkpoint shard", **hub)[0]
                for name in _shard_names(weights_file)
            ]
        else:
            files = [weights_file]
    with ExitStack() as stack:
        handles = [stack.enter_context(open_tensors(p)) for p in files]
        config = config or infer_config(handles)
        return config, _read_state(handles, config, device, dtype, heads(config) if heads else {})


def save_checkpoint(
    state_dict: dict[str, torch.Tensor], config: GPT2Config, directory: str | os.PathLike[str]
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` in the hub layout; return the directory.

    The weights file also carries the config in its metadata, so it describes
    itself when copied alone.
    """
    expected = {**expected_shapes(config), "score.weight": (config.num_labels, config.n_embd)}
    odd = [k for k, t in state_dict.items() if not t.is_floating_point()
           or tuple(t.shape[::-1] if _is_conv1d(k) else t.shape) != expected.get(_normalize_key(k))]
    if odd:
        raise ValueError(f"the model holds tensors that GPT-2's checkpoint layout has no place for ({odd[:4]}); "
                         "a model with LoRA adapters or quantized layers is saved with gpt2lite.save_model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, t in state_dict.items():
        t = t.detach()
        tensors[key] = (t.t() if _is_conv1d(key) else t).contiguous().cpu()
    config_json = json.dumps(config.to_dict(), indent=2) + "\n"
    with atomic_write(directory / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", CONFIG_METADATA_KEY: config_json})
    with atomic_write(directory / "config.json") as tmp:
        tmp.write_text(config_json, encoding="utf-8")
    return directory
