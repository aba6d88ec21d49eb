"""The one walk over a model's linear layers that LoRA, quantization and prepacking share.

They find layers by type, as gpt-fast's quantizer does, not by GPT-2's names
(``c_attn``, ``c_proj``, ``c_fc``), so they work on any model built of
``nn.Linear`` layers; what is GPT-2's own (its tied embedding and head) each
handles beside the walk.
"""

from __future__ import annotations

from torch import nn

__all__ = ["linear_layers"]


def linear_layers(model: nn.Module, types: tuple[type[nn.Module], ...] = (nn.Linear,),
                  ) -> list[tuple[str, nn.Module, str]]:
    """(full name, parent module, attribute) of each layer of ``types`` under ``model``, in module order.

    The walk does not go inside a layer it found (a LoRA layer's own ``lora_A``
    is not a layer of the model), so replacing each found layer is safe.

    >>> mlp = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 1)))
    >>> [name for name, _, _ in linear_layers(mlp)]
    ['0', '2.0']
    """
    found: list[tuple[str, nn.Module, str]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for attr, child in module.named_children():
            name = f"{prefix}.{attr}" if prefix else attr
            if isinstance(child, types):
                found.append((name, module, attr))
            else:
                visit(child, name)

    visit(model, "")
    return found
