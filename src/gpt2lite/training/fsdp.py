"""FSDP2 for training: a GPT-2 sharded block by block, and its state gathered into one process's form.

``shard_model`` applies ``torch.distributed.fsdp.fully_shard`` to every block and
then to the whole model, so each process holds 1/world of the parameters,
gradients and AdamW state, and gathers a block's weights only while it runs.
``full_state`` gathers the weights and optimizer state into the form a single
process's ``state_dict()`` has (optimizer state keyed by parameter index), and
``load_full_state`` scatters that form back into the shards, so a checkpoint
written by N processes resumes in M, with or without FSDP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["full_state", "load_full_state", "plain_copy", "shard_model"]


def shard_model(model: nn.Module) -> None:
    """Shard ``model`` (a GPT-2 or GPT-2 classifier) in place across the initialised process group."""
    from torch.distributed.fsdp import fully_shard

    body = getattr(model, "transformer", model)
    if not hasattr(body, "h"):
        raise ValueError(f"fsdp shards GPT-2 models block by block; a {type(model).__name__} has no blocks")
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("fsdp does not shard LoRA adapters (they are small: train them with DDP)")
    for block in body.h:
        fully_shard(block)
    fully_shard(model)


def _names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its order: index i of a plain ``state_dict()`` is names[i]."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole model's and optimizer's state dicts, on the CPU, as one process has them.

    Every process must call; process 0 gets them, the others empty dicts.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not weights:  # gathered on process 0 only
        return {}, {}
    index = {name: i for i, name in enumerate(_names(model, optimizer))}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in by_name["param_groups"]]
    return weights, {"state": {index[name]: s for name, s in by_name["state"].items()}, "param_groups": groups}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, Any],
                    optimizer_state: dict[str, Any]) -> None:
    """Load state dicts of ``full_state``'s form (a checkpoint of any number of processes) into the shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    names = _names(model, optimizer)
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in optimizer_state["param_groups"]]
    by_name = {"state": {names[i]: s for i, s in optimizer_state["state"].items()}, "param_groups": groups}
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def plain_copy(model: nn.Module) -> nn.Module | None:
    """An unsharded copy of a sharded ``model``, on the CPU, to save: on process 0; None on the others.

    Every process must call (they gather the shards together).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not weights:  # gathered on process 0 only
        return None
    copy = type(model)(model.config)
    copy.load_state_dict(weights)
    return copy.train(model.training)
