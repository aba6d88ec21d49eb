"""Reading checkpoint files: safetensors, or PyTorch's pickles (``pytorch_model.bin``) without running code.

``open_tensors(path)`` gives one interface over both: the names, shapes and
dtypes of the tensors (for safetensors, from the header alone), the tensors
themselves, and the file's metadata. A ``.bin`` is read with
``torch.load(weights_only=True, mmap=True)``: its unpickler builds tensors and
plain containers only, so a file that would run code is refused, never run, and
the tensors stay mapped from the file.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from gpt2lite.errors import CheckpointError

__all__ = ["TensorFile", "open_tensors"]

# torch dtypes by the names safetensors' headers use, so both formats report dtypes alike.
_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class TensorFile(Protocol):
    """The tensors of one checkpoint file."""

    path: Path

    def names(self) -> list[str]:
        """The names of the tensors."""
        ...

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, without reading it."""
        ...

    def dtype(self, key: str) -> str:
        """A tensor's dtype as safetensors names it (``F32``, ``F16``, ``BF16``, ``I64`` ...)."""
        ...

    def tensor(self, key: str) -> torch.Tensor:
        """A tensor (mapped from the file where the format allows)."""
        ...

    def metadata(self) -> dict[str, str]:
        """The file's string metadata (safetensors' header; empty for a pickle)."""
        ...


class _Safetensors:
    def __init__(self, path: Path, handle: object) -> None:
        self.path, self._f = path, handle

    def names(self) -> list[str]:
        return list(self._f.keys())  # type: ignore[attr-defined]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())  # type: ignore[attr-defined]

    def dtype(self, key: str) -> str:
        return self._f.get_slice(key).get_dtype()  # type: ignore[attr-defined]

    def tensor(self, key: str) -> torch.Tensor:
        return self._f.get_tensor(key)  # type: ignore[attr-defined]

    def metadata(self) -> dict[str, str]:
        return self._f.metadata() or {}  # type: ignore[attr-defined]


class _Pickled:
    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        self.path, self._tensors = path, tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> str:
        return _DTYPE_NAMES.get(self._tensors[key].dtype, str(self._tensors[key].dtype))

    def tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def metadata(self) -> dict[str, str]:
        return {}


@contextlib.contextmanager
def open_tensors(path: str | os.PathLike[str]) -> Iterator[TensorFile]:
    """Open a ``.safetensors`` or ``.bin`` checkpoint file; anything unreadable or unsafe is a ``CheckpointError``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None
        with handle as f:
            yield _Safetensors(path, f)
        return
    yield _Pickled(path, _load_pickled(path))


def _load_pickled(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save`` state dict, unpickled with ``weights_only=True`` (mapped when the file is a zip)."""
    what = f"{str(path)!r}"
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{what} holds more than tensors, and loading it could run code, so it was not "
                              f"loaded ({reason}); ask for a .safetensors file") from None
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated, not a torch file: zip, EOF and runtime errors of several kinds
        raise CheckpointError(f"{what} is not a readable PyTorch checkpoint: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{what} is not a state dict (a mapping of names to tensors)")
    return state
