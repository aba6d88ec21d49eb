"""Many LoRA adapters over one base model, chosen per row of a batch (punica's idea, in plain PyTorch).

``LoraSlots`` is the slot table: up to ``max_loras`` adapters by name over one
loaded model (float, int8, int4 or prepacked). It swaps each layer an adapter
targets for a ``MultiLoraLinear``, which holds every adapter's ``A`` and ``B``
side by side in slots 1 .. ``max_loras`` (0 means none) and adds, to the base layer's output,
each row's own low-rank update ``s * x A.T B.T`` (``s`` folded into ``B``). The
products stay in floating point whatever the base layer's weights are; no
merged copy of the base is ever made, and the model's own class knows nothing
of it.

Before each forward the caller routes the batch's rows to slots
(``LoraSlots.route``): a one-hot mask of each row's slot, made once per forward,
lets every layer run two products for the whole batch (``MultiLoraLinear``).
``benchmarks/bench_lora.py`` measured it against the two ways punica's idea is
usually written, at GPT-2 124M's four layer widths with 4 adapters of rank 8,
one decode step at batch 8 and 16 (2-core AMD EPYC, AVX-512): its update took
55 to 108 us per layer, a loop over the batch's adapters (``index_select``, two
products, ``index_add``) 185 to 318 us, ``torch.bmm`` over per-row gathered
``A`` and ``B`` 62 to 249 us, beside base products of 138 to 1055 us. Inference only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gpt2lite.transforms.lora import LoraLinear
from gpt2lite.transforms.peft import AdapterWeights, read_adapter
from gpt2lite.transforms.quantize import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear

__all__ = ["LoraRouting", "LoraSlots", "MultiLoraLinear"]


class LoraRouting:
    """Which adapter slot each row of the next forward uses, worked out once and read by every layer."""

    def __init__(self, slots: int) -> None:
        """Routing over ``slots`` adapter slots (numbered 1 .. ``slots``; 0 is the base model alone)."""
        self.slots = slots
        self.rows = 0
        self.single: int | None = None  # the one slot every row uses, if so (0: no adapter at all)
        self.mask: torch.Tensor | None = None  # (rows, 1, slots, 1): 1 where a row uses a slot

    def set(self, slots: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        """Route the next forward: row ``i`` of its batch uses slot ``slots[i]`` (0: the base model alone)."""
        self.rows = len(slots)
        self.single = slots[0] if slots and all(s == slots[0] for s in slots) else None
        self.mask = None
        if self.single is None:
            one_hot = torch.zeros(len(slots), self.slots + 1, device=device, dtype=dtype)
            one_hot[torch.arange(len(slots)), torch.tensor(slots)] = 1
            self.mask = one_hot[:, 1:, None].unsqueeze(1)  # (rows, 1, slots, 1): slot 0 adds nothing


class MultiLoraLinear(nn.Module):
    """A base linear layer (any kind) plus, for each row of the batch, the low-rank update of the row's adapter.

    Every slot's ``A`` and ``B`` sit side by side, so that all rows take two
    products: ``x @ A`` over every slot's rank (``(rows, T, slots * r)``), the
    columns of other slots than the row's zeroed, then ``@ B``. It costs a few
    more columns per slot held, no gather and no loop.
    """

    def __init__(self, base_layer: nn.Module, routing: LoraRouting, dtype: torch.dtype) -> None:
        """Wrap ``base_layer`` with ``routing.slots`` empty adapter slots."""
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        held = next(base_layer.buffers(), None)
        device = held.device if held is not None else next(base_layer.parameters()).device
        slots = routing.slots
        # Padded to the largest rank held: A (in, slots, r), B (slots, r, out) scaled by s; zeros add nothing.
        self.register_buffer("lora_A", torch.zeros(self.in_features, slots, 0, device=device, dtype=dtype),
                             persistent=False)
        self.register_buffer("lora_B", torch.zeros(slots, 0, self.out_features, device=device, dtype=dtype),
                             persistent=False)
        self.ranks = [0] * (slots + 1)  # each slot's rank in this layer (0: its adapter leaves the layer alone)

    def put(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Hold ``A`` ``(r, in)`` and ``B`` ``(out, r)`` in ``slot``, growing the stacks to rank ``r`` if needed."""
        r, held = a.shape[0], self.lora_A.shape[2]
        if r > held:
            slots = self.routing.slots
            self.lora_A = torch.cat([self.lora_A, self.lora_A.new_zeros(self.in_features, slots, r - held)], 2)
            self.lora_B = torch.cat([self.lora_B, self.lora_B.new_zeros(slots, r - held, self.out_features)], 1)
        self.clear(slot)
        self.lora_A[:, slot - 1, :r] = a.T.to(self.lora_A)
        self.lora_B[slot - 1, :r] = (b.float() * scaling).T.to(self.lora_B)
        self.ranks[slot] = r

    def clear(self, slot: int) -> None:
        """Empty ``slot``."""
        self.lora_A[:, slot - 1].zero_()
        self.lora_B[slot - 1].zero_()
        self.ranks[slot] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base_layer(x)`` plus each row's update; ``x`` is ``(rows, T, in)`` as the routing says."""
        y = self.base_layer(x)
        routing = self.routing
        if routing.single is not None:  # one adapter (or none) for the whole batch: its own columns only
            r = self.ranks[routing.single]
            if r:
                a = self.lora_A[:, routing.single - 1, :r]  # (in, r)
                y = y + (x @ a.to(x.dtype)) @ self.lora_B[routing.single - 1, :r].to(x.dtype)
            return y
        if x.shape[0] != routing.rows:
            raise RuntimeError(f"the adapters were routed for {routing.rows} rows, but the batch has {x.shape[0]}")
        rows, steps, slots, r = x.shape[0], x.shape[1], routing.slots, self.lora_A.shape[2]
        if not r:
            return y
        xa = (x @ self.lora_A.view(self.in_features, slots * r).to(x.dtype)).view(rows, steps, slots, r)
        xa = xa * routing.mask.to(x.dtype)  # (rows, T, slots, r): only the row's own slot left
        return y + xa.view(rows, steps, slots * r) @ self.lora_B.view(slots * r, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"slots={self.routing.slots}, held={sum(r > 0 for r in self.ranks)}"


# The layers an adapter may target: float (prepacked ones are nn.Linear too), int8, int4, already wrapped.
_LAYERS = (nn.Linear, Int8Linear, Int4Linear, MultiLoraLinear)


class LoraSlots:
    """The slot table: up to ``max_loras`` adapters over one model, by name, and the routing their layers read.

    ``add``/``remove`` change the model's layers: call them where nothing runs the
    model at the same time (the serving loop's thread, between steps). Example::

        slots = LoraSlots(model, max_loras=4)
        slots.add("french", slots.read("runs/french/final"))
        slots.route(["french", None])  # row 0 with the adapter, row 1 without
        logits = model(ids)  # ids: (2, T)
    """

    def __init__(self, model: nn.Module, max_loras: int) -> None:
        """A table of ``max_loras`` empty slots over ``model`` (no layer changes until an adapter is added)."""
        if isinstance(max_loras, bool) or not isinstance(max_loras, int) or max_loras < 1:
            raise ValueError(f"max_loras must be an int >= 1, got {max_loras!r}")
        if any(isinstance(m, LoraLinear) for m in model.modules()):
            raise ValueError("the model carries a trainable LoRA adapter: merge_lora() it first")
        self.model, self.max_loras = model, max_loras
        self.routing = LoraRouting(max_loras)
        self.slots: dict[str, int] = {}  # adapter name -> slot (1 .. max_loras)
        floats = [p for p in model.parameters() if p.is_floating_point()] + \
                 [b for b in model.buffers() if b.is_floating_point()]
        self.dtype = floats[0].dtype if floats else torch.float32
        self.device = floats[0].device if floats else torch.device("cpu")

    def read(self, directory: str) -> AdapterWeights:
        """An adapter directory (PEFT's format) read and checked against this model; touches no layer."""
        weights = read_adapter(self.model, directory, _LAYERS)
        if weights.score is not None:
            raise ValueError(f"{directory!r} holds a classifier's adapter (a score head), not a language model's")
        return weights

    def add(self, name: str, weights: AdapterWeights) -> int:
        """Put an adapter in a free slot under ``name``; return the slot."""
        if name in self.slots:
            raise ValueError(f"an adapter named {name!r} is loaded already")
        free = [s for s in range(1, self.max_loras + 1) if s not in self.slots.values()]
        if not free:
            raise ValueError(f"all {self.max_loras} adapter slots are taken (max_loras)")
        slot = free[0]
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for layer_name, (a, b) in weights.layers.items():
                layer = modules[layer_name]
                if not isinstance(layer, MultiLoraLinear):
                    layer = self._wrap(layer_name, layer)
                layer.put(slot, a, b, weights.config.scaling)
        self.slots[name] = slot
        return slot

    def remove(self, name: str) -> None:
        """Empty the slot of adapter ``name``."""
        slot = self.slots.pop(name)
        for module in self.model.modules():
            if isinstance(module, MultiLoraLinear):
                module.clear(slot)

    def route(self, names: Sequence[str | None]) -> None:
        """Route the next forward's rows: row ``i`` uses adapter ``names[i]`` (None: the base model)."""
        self.routing.set([0 if n is None else self.slots[n] for n in names], self.device, self.dtype)

    def _wrap(self, name: str, layer: nn.Module) -> MultiLoraLinear:
        if isinstance(layer, (Int8Embedding, Int4Embedding)):
            raise ValueError(f"{name} is an embedding, which LoRA here does not adapt")
        parent_name, _, attr = name.rpartition(".")
        wrapped = MultiLoraLinear(layer, self.routing, self.dtype)
        setattr(self.model.get_submodule(parent_name), attr, wrapped)
        return wrapped
