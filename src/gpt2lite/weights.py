"""Reading and writing GPT-2 safetensors checkpoints in the published (hub) layout.

The hub files store the four Conv1D weights of each block as ``[in, out]``;
``nn.Linear`` wants ``[out, in]``, so exactly those are transposed on the way in
and out. The ``h.N.attn.bias`` / ``masked_bias`` causal-mask buffers are
ignored, and ``transformers``' ``transformer.`` prefix and tied ``lm_head`` are
accepted.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gpt2lite.config import PRESETS, GPT2Config
from gpt2lite.hub import ModelNotFoundError, resolve_files
from gpt2lite.model import GPT2

__all__ = [
    "CONV1D_WEIGHTS",
    "CheckpointError",
    "expected_shapes",
    "infer_config",
    "load_pretrained",
    "resolve_dtype",
    "save_pretrained",
]

# Stored [in, out] in the hub files, [out, in] in nn.Linear.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# Per-layer causal-mask buffers that old checkpoints carry; the model builds its mask itself.
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")

_CHECKPOINT_FILES = [("config.json", "model.safetensors"), ("config.json", "model.safetensors.index.json")]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


class CheckpointError(ValueError):
    """A checkpoint's tensors do not fit the model: missing, unexpected or misshapen keys."""


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
    return shapes


def _is_conv1d(key: str) -> bool:
    return key.endswith(CONV1D_WEIGHTS)


def _normalize_key(key: str) -> str:
    return key.removeprefix("transformer.")


def _iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, str, Path, tuple[int, ...]]]:
    """(normalized key, key as stored, file, shape) for every tensor of a (possibly sharded) checkpoint.

    Only the headers are read: each file is opened once, and no tensor data is touched.
    """
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                entries = [(key, tuple(f.get_slice(key).get_shape())) for key in f.keys()]  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None
        for key, shape in entries:
            yield _normalize_key(key), key, path, shape


def _shard_files(index_file: Path, fetch) -> list[Path]:
    with open(index_file, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{str(index_file)!r} has no weight_map")
    return [fetch(name) for name in dict.fromkeys(weight_map.values())]


def infer_config(files: list[Path]) -> GPT2Config:
    """Work out a config from tensor shapes alone (for a bare ``.safetensors`` file).

    The number of heads is not in any shape: it is taken from the published
    model of that size, else ``n_embd // 64`` (GPT-2's head width throughout).
    """
    shapes = {key: shape for key, _, _, shape in _iter_checkpoint(files)}
    try:
        vocab_size, n_embd = shapes["wte.weight"]
        n_positions = shapes["wpe.weight"][0]
        mlp_dim = shapes["h.0.mlp.c_fc.weight"][1]
    except KeyError as exc:
        raise CheckpointError(f"cannot infer a GPT-2 config: the checkpoint has no {exc.args[0]!r} tensor") from None
    n_layer = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"h\.(\d+)\.", k)))
    n_head = next(
        (p.n_head for p in PRESETS.values() if (p.n_layer, p.n_embd) == (n_layer, n_embd)),
        max(1, n_embd // 64),
    )
    return GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_inner=None if mlp_dim == 4 * n_embd else mlp_dim,
    )


def load_state_dict(
    files: list[Path], config: GPT2Config, *, device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Read a checkpoint into a state dict for ``GPT2``, checking every key and shape first."""
    expected = expected_shapes(config)
    found: dict[str, tuple[str, Path]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    lm_head: tuple[str, Path] | None = None
    unexpected = []
    for key, stored, path, shape in _iter_checkpoint(files):
        if key == "lm_head.weight":
            lm_head = (stored, path)
        elif key in expected:
            found[key] = (stored, path)
            shapes[key] = shape
        elif not _IGNORED.fullmatch(key):
            unexpected.append(stored)
    missing = [k for k in expected if k not in found]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        raise CheckpointError(
            f"checkpoint does not match a GPT-2 with {config.n_layer} layers, n_embd={config.n_embd}: "
            + "; ".join(parts)
        )

    for key, (stored, _) in found.items():
        if shapes[key] != expected[key]:
            raise CheckpointError(f"tensor {stored!r} has shape {shapes[key]}, expected {expected[key]}")

    # safetensors hands out tensors that map the file (no copy), and a transposed view
    # multiplies as fast as a contiguous copy, so a float32 load on the CPU copies nothing;
    # a dtype or device change converts one tensor at a time.
    state: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles = {p: stack.enter_context(safe_open(str(p), framework="pt")) for p in dict.fromkeys(files)}
        for key, (stored, path) in found.items():
            t = handles[path].get_tensor(stored)
            if _is_conv1d(key):
                t = t.t()  # [in, out] -> [out, in], as a view
            if dtype is not None and t.dtype != dtype:
                t = t.to(dtype)
            state[key] = t.to(device) if device is not None else t
        if lm_head is not None:
            stored, path = lm_head
            head = handles[path].get_tensor(stored)
            wte = state["wte.weight"]
            if head.shape != wte.shape or not torch.equal(head.to(wte), wte):
                raise CheckpointError(
                    f"{stored!r} differs from wte.weight; gpt2lite ties the LM head to the token embedding"
                )
    return state


def load_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    config: GPT2Config | None = None,
) -> GPT2:
    """See ``GPT2.from_pretrained``."""
    dtype = resolve_dtype(dtype)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelNotFoundError(f"{str(path)!r} is not a .safetensors file")
        files = [path]
        config = config or infer_config(files)
    else:
        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        config_file, weights_file = resolve_files(name_or_path, _CHECKPOINT_FILES, what="GPT-2 checkpoint", **hub)
        config = config or GPT2Config.from_json_file(config_file)
        if weights_file.name.endswith(".index.json"):
            files = _shard_files(
                weights_file, lambda name: resolve_files(name_or_path, [(name,)], what="checkpoint shard", **hub)[0]
            )
        else:
            files = [weights_file]

    state = load_state_dict(files, config, device=device, dtype=dtype)
    # Parameters on the meta device take no memory and skip the random initialisation;
    # assign=True then adopts the loaded tensors as they are, with no second copy.
    with torch.device("meta"):
        model = GPT2(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save_pretrained(model: GPT2, directory: str | os.PathLike[str]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` in the hub layout; return the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, t in model.state_dict().items():
        t = t.detach()
        tensors[key] = (t.t() if _is_conv1d(key) else t).contiguous().cpu()
    # Write to temporary names, then rename: an interrupted save never leaves a torn checkpoint.
    tmp_weights = directory / "model.safetensors.tmp"
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    tmp_config = directory / "config.json.tmp"
    tmp_config.write_text(json.dumps(model.config.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_weights, directory / "model.safetensors")
    os.replace(tmp_config, directory / "config.json")
    return directory
