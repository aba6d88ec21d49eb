"""LoRA: low-rank adapters on GPT-2's linear layers (the layer; ``peft.py`` holds the file format).

A target layer ``y = x W.T + b`` becomes ``y = x W.T + b + s * dropout(x) A.T B.T``
with ``A`` ``(r, in)``, ``B`` ``(out, r)`` and ``s = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``). ``W`` and ``b`` stay frozen;
only ``A``, ``B`` (and a classifier's ``score`` head) train, so the optimizer
keeps state for a few hundred thousand numbers instead of the whole model.

``add_lora`` swaps target ``nn.Linear`` layers for ``LoraLinear`` in place; the
model's own class knows nothing of it. ``merge_lora`` folds them back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from gpt2lite.transforms.layers import linear_layers
from gpt2lite.transforms.quantize import is_quantized

__all__ = ["TARGETS", "LoraConfig", "LoraLinear", "add_lora", "has_lora", "merge_lora", "target_layers"]

# GPT-2's linear layers, by the names PEFT matches ("c_proj" is both attention's and the MLP's).
TARGETS = ("c_attn", "c_proj", "c_fc")


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
        d = self.lora_dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {d!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be True or False, got {self.use_rslora!r}")
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"target_modules must name linear layers (GPT-2's: {TARGETS}), got "
                             f"{self.target_modules!r}")
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
            # In place: the weight's version counter moves, so a copy made from it (prepack) is made again.
            self.base_layer.weight.copy_(self.base_layer.weight.float() + delta)
        return self.base_layer


def target_layers(model: nn.Module, targets: tuple[str, ...],
                  types: tuple[type[nn.Module], ...] = (nn.Linear, LoraLinear)) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, full name) of every layer of ``types`` a target names, as PEFT matches them."""
    found = [(parent, attr, name) for name, parent, attr in linear_layers(model, types)
             if any(name == t or name.endswith("." + t) for t in targets)]
    if not found:
        names = [name for name, _, _ in linear_layers(model)][:6]
        raise ValueError(f"no linear layer of the model matches the LoRA targets {list(targets)} (its layers: "
                         f"{names}{' ...' if len(names) == 6 else ''})")
    return found


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters."""
    return any(isinstance(m, LoraLinear) for m in model.modules())


def add_lora(model: nn.Module, config: LoraConfig = LoraConfig()) -> nn.Module:
    """Put fresh adapters on the target linear layers of a model (GPT-2, its classifier, any other) in place.

    Targets match layer names as PEFT matches them (a name, or the end of a
    dotted one). Afterwards only the adapters, and a classifier's ``score`` head,
    have ``requires_grad``. Example::

        model = add_lora(GPT2.from_pretrained("gpt2"), LoraConfig(r=8, target_modules=("c_attn", "c_proj")))
    """
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge_lora() them first")
    if is_quantized(model):
        raise ValueError("LoRA trains in floating point: load the model without quantize")
    if config.base_model_name_or_path is None:
        body = getattr(model, "transformer", model)
        config = dataclasses.replace(config, base_model_name_or_path=getattr(body, "name_or_path", None))
    model.requires_grad_(False)
    for parent, attr, _ in target_layers(model, config.target_modules):
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
