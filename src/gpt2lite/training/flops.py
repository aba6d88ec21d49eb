"""Model FLOPs utilization (MFU): the FLOPs a GPT-2 training step needs against what the device could do.

The count is the one nanoGPT reports (after PaLM, appendix B): a token costs
``6 N`` FLOPs in the weight matrices, forward and backward (N: the parameters
without the position embeddings, which are looked up, not multiplied), plus
``12 L H Q T`` in attention (L layers, H heads of Q dimensions, windows of T
tokens). Recomputation (gradient checkpointing) is not counted: MFU measures the
model's work, not the hardware's. The peak is the device's dense bf16 tensor-core
rate, known for common data-centre GPUs and otherwise given by the user; on a
device of unknown peak, MFU is unknown (None), never guessed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PEAK_FLOPS", "flops_per_token", "gpu_peak_flops", "mfu", "peak_flops"]

# Dense bf16 tensor-core FLOP/s per GPU, from NVIDIA's datasheets (the "with sparsity" figures halved),
# matched against torch.cuda.get_device_name(): the first entry whose words all occur wins.
PEAK_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("A100",), 312e12),
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),  # SXM
)


def flops_per_token(model: nn.Module, block: int) -> float | None:
    """Training FLOPs per token of a GPT-2 ``model`` on windows of ``block`` tokens; None for other models."""
    config = model.config
    if getattr(config, "n_positions", None) is None or not hasattr(config, "n_head"):
        return None  # recurrent models: no attention term to count
    body = getattr(model, "transformer", model)
    n_params = sum(p.numel() for p in model.parameters()) - body.wpe.weight.numel()
    L, H, Q, T = config.n_layer, config.n_head, config.n_embd // config.n_head, block
    return 6 * n_params + 12 * L * H * Q * T


def peak_flops(device: torch.device | str) -> float | None:
    """The dense bf16 peak FLOP/s of a CUDA ``device`` whose model is known (A100, H100, H200); else None."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device))


def gpu_peak_flops(name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a GPU by its name (``torch.cuda.get_device_name``); None if not known."""
    for words, flops in PEAK_FLOPS:
        if all(word in name for word in words):
            return flops
    return None


def mfu(flops_token: float | None, tokens_per_s: float, peak: float | None, devices: int = 1) -> float | None:
    """The share of ``devices`` devices' ``peak`` that ``tokens_per_s`` use; None if either count is unknown."""
    if flops_token is None or peak is None or not math.isfinite(tokens_per_s):
        return None
    return flops_token * tokens_per_s / (peak * devices)
