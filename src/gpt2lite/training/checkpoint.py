"""The training checkpoint (``checkpoint.pt``): written atomically, read without running any code.

It is a ``torch.save`` file of tensors, numbers, strings, lists and dicts only,
and it is read back with ``torch.load(weights_only=True)``, whose unpickler
refuses every other object: a crafted file cannot execute code. Anything
unreadable, truncated, incomplete or of the wrong shape is one
``CheckpointError`` naming the file.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from gpt2lite.errors import CheckpointError
from gpt2lite.io.files import atomic_write

__all__ = ["load_training_checkpoint", "save_training_checkpoint"]

# Every key a checkpoint holds, with the type its value must have.
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "model_config": dict,
    "train_config": dict,
    "data_fingerprint": str,
    "optimizer": dict,
    "scheduler": dict,
    "batch_rng": torch.Tensor,
    "torch_rng": torch.Tensor,
    "cuda_rng": (list, type(None)),
    "step": int,
    "losses": list,
    "val_losses": list,
}


def save_training_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` (the keys of ``_FIELDS``) to ``path`` atomically: a failed write keeps the old file."""
    missing = sorted(set(_FIELDS) - set(state))
    if missing:
        raise ValueError(f"a training checkpoint needs {missing}")
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_training_checkpoint(path: str | os.PathLike[str], *, map_location: torch.device | str | None = None) -> dict:
    """Read a checkpoint written by ``save_training_checkpoint``; never executes code from the file."""
    path = Path(path)
    what = f"training checkpoint {str(path)!r}"
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)  # read as used
    except FileNotFoundError:
        raise CheckpointError(f"{what} does not exist") from None
    except pickle.UnpicklingError as exc:
        # weights_only refuses any object that is not plain data; its message names the object.
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{what} is not a plain-data checkpoint and was not loaded, since loading it could run code ({reason})"
        ) from None
    except Exception as exc:  # truncated or not a torch file: zip, EOF and runtime errors of several kinds
        raise CheckpointError(f"{what} is unreadable (truncated or not a checkpoint): {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} holds a {type(state).__name__}, not a checkpoint")
    for key, kind in _FIELDS.items():
        if key not in state:
            raise CheckpointError(f"{what} lacks {key!r}: it was not written by this version of gpt2lite's trainer")
        if not isinstance(state[key], kind):
            raise CheckpointError(f"{what} holds a {type(state[key]).__name__} as {key!r}")
    return state
