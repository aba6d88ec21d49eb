"""Which float32 product kernel serves a decode step's products best on this CPU, by measurement, cached per CPU model.

A decode step of one row multiplies a vector by every weight matrix: the speed is
the memory bandwidth the kernel reaches, and that depends on the machine. MKL's
GEMV (``F.linear``) reaches about 12 GB/s on an AMD EPYC (Zen 3) where oneDNN's
product (``mkldnn._linear_pointwise``) over the same weight, as it is, with no
reordered copy, ran 1.2 to 1.75 times faster per shape; on Intel CPUs MKL has
been the faster one. A batch of rows is measured on its own: on that EPYC, MKL's
products of 2 to 512 rows took 1.2 to 2.1 times oneDNN's over the plain weights
(GPT-2 124M's 49 products at 8 rows: 126 against 68 ms). So the choice is
measured: each distinct weight shape is timed with both kernels over the model's
own weights of that shape (all of them, as a decode step reads them, so caches do
not flatter either), and the faster one is kept.

Choices are cached in a JSON file (default ``~/.cache/gpt2lite/kernels.json``)
under a key naming the CPU model, the PyTorch version and the thread count, each
shape's one-row choice under its name (``"768x2304"``) and its batch choice beside
it (``"768x2304 @8 rows"``), so a second load on the same machine measures nothing. The file is written atomically
after merging what is there; a deleted, damaged or foreign file only means the
shapes are measured again.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2lite.io.files import read_json, write_json

__all__ = ["KERNELS", "Choice", "Product", "choose_kernels", "cpu_key", "default_cache", "measure"]

KERNELS = ("mkl", "onednn")
_REPEATS = 5
_MAX_CACHE_BYTES = 2**20  # the file holds a few shapes' choices per CPU: a few KB

Choice = dict[str, float | str]  # {"kernel": "onednn", "mkl_us": ..., "onednn_us": ...}


def default_cache() -> Path:
    """``~/.cache/gpt2lite/kernels.json``."""
    return Path.home() / ".cache" / "gpt2lite" / "kernels.json"


def cpu_key() -> str:
    """The CPU model, PyTorch version and thread count: what a measured choice holds for."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    # "rows": timed over (out, in) rows as prepack stores them (earlier: a reordered copy, then transposed views).
    return f"{name} | torch {torch.__version__} | {torch.get_num_threads()} threads | rows"


def _timed(products: Sequence[Callable[[], object]]) -> float:
    """Median seconds for one pass over ``products`` (after one pass to warm up)."""
    for product in products:
        product()
    times = []
    for _ in range(_REPEATS):
        start = time.perf_counter()
        for product in products:
            product()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / len(products)


Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.inference_mode()
def measure(weights: Sequence[torch.Tensor], rows: int = 1, mkl_product: Product = F.linear) -> Choice:
    """Time a product of ``rows`` rows through ``weights`` with MKL (``mkl_product``) and with oneDNN (no copy)."""
    # Its own generator: loading a model must not move the caller's random state.
    x = torch.randn(rows, weights[0].shape[1], generator=torch.Generator().manual_seed(0))
    mkl = _timed([lambda w=w: mkl_product(x, w) for w in weights])
    onednn = _timed([lambda w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for w in weights])
    return {"kernel": "onednn" if onednn < mkl else "mkl", "mkl_us": round(mkl * 1e6, 1),
            "onednn_us": round(onednn * 1e6, 1)}


def choose_kernels(
    groups: dict[str, Sequence[torch.Tensor]], cache: str | os.PathLike[str] | None = None, rows: int = 1,
    mkl_products: dict[str, Product] | None = None,
) -> dict[str, Choice]:
    """The kernel for products of ``rows`` rows for each shape of ``groups`` (``"768x2304"`` -> its weights).

    Measured, or read from ``cache``, the JSON file of earlier choices (None:
    ``default_cache()``); an unreadable one is ignored and replaced. The MKL side
    of a shape is timed as the model runs it: ``mkl_products[shape]``, else ``F.linear``.
    """
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    path = Path(cache) if cache is not None else default_cache()
    key = cpu_key()
    known = _read(path).get(key, {})
    # One-row choices keep the plain shape as their name in the file (as older files have them).
    name = {shape: shape if rows == 1 else f"{shape} @{rows} rows" for shape in groups}
    choices = {shape: known[name[shape]] for shape in groups if _valid(known.get(name[shape]))}
    missing = [shape for shape in groups if shape not in choices]
    for shape in missing:
        choices[shape] = measure(groups[shape], rows, (mkl_products or {}).get(shape, F.linear))
    if missing:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            everything = _read(path)  # again: another process may have written since
            everything.setdefault(key, {}).update({name[shape]: choices[shape] for shape in missing})
            write_json(path, everything)
        except OSError:
            pass  # a read-only home: the choices still hold for this process
    return choices


def _read(path: Path) -> dict[str, dict[str, Choice]]:
    try:  # a regular file of bounded size only: a symlink to /dev/zero or a FIFO is never opened
        data = read_json(path, max_bytes=_MAX_CACHE_BYTES)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()) else {}


def _valid(choice: object) -> bool:
    return isinstance(choice, dict) and choice.get("kernel") in KERNELS
