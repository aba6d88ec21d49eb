"""Random-weight checkpoints in the exact layout of the published GPT-2 files, made once per session."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=96, vocab_size=50257)


def pytest_report_header(config) -> list[str]:
    """The installed versions that differ from constraints.txt, the last green run's (the oracles are unpinned)."""
    from importlib import metadata

    pinned = Path(__file__).resolve().parent.parent / "constraints.txt"
    if not pinned.is_file():
        return []
    moved = []
    for line in pinned.read_text(encoding="utf-8").splitlines():
        name, _, version = line.partition("==")
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "absent"
        if version and installed != version:
            moved.append(f"{name} {version} -> {installed}")
    return [f"versions moved since constraints.txt: {', '.join(moved) or 'none'}"]


def _hf_model(seed: int, **config):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**config)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    # Random LayerNorm parameters and biases too, so that a swapped or untransposed tensor shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def write_hub_layout(model, directory: Path) -> Path:
    """Save a transformers GPT-2 the way the hub files are: no prefix, Conv1D as [in, out], mask buffers."""
    directory.mkdir(parents=True, exist_ok=True)
    n = model.config.n_positions
    tensors = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" or re.fullmatch(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)", key):
            continue
        tensors[key.removeprefix("transformer.")] = t.detach().clone().contiguous()
    for i in range(model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    return directory


@pytest.fixture(scope="session")
def hf_tiny():
    return _hf_model(0, **TINY)


@pytest.fixture(scope="session")
def hf_124m():
    return _hf_model(1)


@pytest.fixture(scope="session")
def tiny_dir(hf_tiny, tmp_path_factory) -> Path:
    return write_hub_layout(hf_tiny, tmp_path_factory.mktemp("tiny-hub"))


@pytest.fixture(scope="session")
def gpt2_124m_dir(hf_124m, tmp_path_factory) -> Path:
    return write_hub_layout(hf_124m, tmp_path_factory.mktemp("gpt2-124m-hub"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """The tiny checkpoint loaded by gpt2lite (read-only: tests must not change its weights)."""
    from gpt2lite import GPT2

    return GPT2.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def model_124m(gpt2_124m_dir):
    """The 124M checkpoint loaded by gpt2lite (read-only)."""
    from gpt2lite import GPT2

    return GPT2.from_pretrained(gpt2_124m_dir)


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache_in_a_temporary_folder(tmp_path_factory):
    """prepack's measured kernel choices go to a file of the session's, never to the home folder."""
    from gpt2lite.transforms import kernels

    saved = kernels.default_cache
    path = tmp_path_factory.mktemp("kernels") / "kernels.json"
    kernels.default_cache = lambda: path
    yield path
    kernels.default_cache = saved


@pytest.fixture(autouse=True, scope="session")
def _native_kernels_in_a_temporary_folder(tmp_path_factory):
    """gpt2lite's compiled CPU kernels are built into a folder of the session's, never into the home folder."""
    from gpt2lite.transforms import native

    saved = native.default_cache_dir
    path = tmp_path_factory.mktemp("native")
    native.default_cache_dir = lambda: path
    yield path
    native.default_cache_dir = saved
