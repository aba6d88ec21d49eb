"""gpt2lite's own CPU kernels (``native/gemv.c``), compiled at first use and cached; PyTorch's routes elsewhere.

A batch-1 decode step multiplies one activation row by every weight matrix, so
its speed is the memory bandwidth the product reaches. PyTorch's CPU routes
reach about half of it there (MKL's GEMV, fbgemm's int8 with its per-call
packing of the activations); a plain loop reading each weight row start to end
reaches the rest (AMD EPYC, AVX2, 2 threads, GPT-2 124M's 49 products: int8
4.2 against fbgemm's 8.5 ms, float32 16.5 against MKL's 39.5 ms). The kernels:

- ``linear_f32``: float32 rows times float32 weight rows;
- ``linear_f16``: float32 rows times float16 weight rows (``quantize="f16"``),
  widened to float32 as they are read;
- ``attend_one_row``: a decode step's attention (one query row, no mask) over
  the cache's strided views;
- ``linear_int8``: each activation row rounded to int8 with its own scale
  (``max|x| / 127``), an exact integer dot with ``Int8Linear``'s int8 weight rows,
  times both scales; a row's output never depends on the rows beside it;
- ``linear_int4``: ``Int4Linear``'s 4-bit codes (plain rows, a bfloat16 scale and
  offset per group of inputs) against activations rounded to int8 in blocks of
  32 inputs, a scale each (as llama.cpp's q8_0 against its q4_0).

The C source is compiled with the system's C compiler (``gcc`` or ``cc``) into
a shared library loaded with ``ctypes``: no PyTorch headers, about a second.
The library is cached under ``~/.cache/gpt2lite/kernels/`` (or the
``cache_dir`` given to ``load_kernels``) under a name made of the hash of the
source, the compiler flags, the CPU's features and the PyTorch version; it is
written atomically (built to a temporary file, renamed), so two processes
building at once each rename a whole library, and a damaged, foreign or
non-regular file is built again. The AVX-512 (VNNI) variants are used where the
CPU has those features, the AVX2 ones elsewhere.

Where nothing can be built (not x86-64, no AVX2, no compiler, a failed build or
self-test) ``load_kernels`` returns None after one INFO log line, and the layers
take PyTorch's routes, as they do with ``use_kernels(model, "torch")``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from gpt2lite.errors import NonFiniteError
from gpt2lite.io.files import atomic_write
from gpt2lite.models.gpt2 import ACTIVATION_FUNCTIONS  # the table GPT-2's MLP takes its activation from

__all__ = ["KERNEL_ROUTES", "OVERFLOWED", "KernelRoute", "NativeKernels", "NativeOperands", "block_step",
           "cpu_features", "default_cache_dir", "kernels_for", "load_kernels", "native_f32_operands",
           "one_row_attention", "use_kernels"]

log = logging.getLogger(__name__)

KernelRoute = Literal["native", "torch"]
KERNEL_ROUTES: tuple[str, ...] = get_args(KernelRoute)

SOURCE = Path(__file__).with_name("native") / "gemv.c"
FLAGS = ("-O3", "-shared", "-fPIC", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp")
ALIGN = 64  # the kernels take input widths that are multiples of this
_AVX2 = {"avx2", "fma", "f16c"}
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
_MAX_LIBRARY_BYTES = 64 * 2**20  # a cached library is ~30 KB; anything far larger is not ours
_BUILD_SECONDS = 120
OVERFLOWED = ("the model's activations overflowed (NaN or inf) in its int8 layers; load the model without "
              "quantize, or check the checkpoint")


def cpu_features() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (``/proc/cpuinfo``); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


class NativeKernels:
    """The loaded library: products over CPU float32 activations, each a fresh ``(..., N)`` tensor."""

    def __init__(self, library: ctypes.CDLL, isa: str, path: Path) -> None:
        """Wrap a loaded library; ``isa`` ("avx2" or "avx512") picks the variant of each kernel."""
        self.isa, self.path = isa, path
        p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._f32 = getattr(library, f"gl_linear_f32_{isa}")
        self._f32.argtypes, self._f32.restype = [p, p, p, p, i64, i64, i64, c_int], None
        self._i8 = getattr(library, f"gl_linear_i8_{isa}")
        self._i8.argtypes, self._i8.restype = [p, p, p, p, p, i64, i64, i64, c_int], c_int
        self._f16 = getattr(library, f"gl_linear_f16_{isa}")
        self._f16.argtypes, self._f16.restype = [p, p, p, p, i64, i64, i64, c_int], None
        self._i4 = getattr(library, f"gl_linear_i4_{isa}")
        self._i4.argtypes, self._i4.restype = [p, p, p, p, p, i64, i64, i64, i64, c_int], c_int
        self._block = getattr(library, f"gl_block_step_{isa}")
        self._block.argtypes, self._block.restype = [p, p, p, p, *[i64] * 5, c_int], c_int
        self._attend = library.gl_attend_one_row
        self._attend.argtypes, self._attend.restype = [p, p, p, p, *[i64] * 10, ctypes.c_float, c_int], None
        self._library = library  # kept alive with the functions

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        """Whether the kernels take this ``(N, K)`` weight: contiguous CPU rows, ``K`` a multiple of 64."""
        return weight.device.type == "cpu" and weight.dim() == 2 and weight.shape[1] % ALIGN == 0 \
            and weight.is_contiguous()

    def linear_f32(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ weight.T + bias`` for float32 ``x`` ``(..., K)`` and ``weight`` ``(N, K)``."""
        return self._float_product(self._f32, x, weight, torch.float32, bias)

    def linear_f16(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ weight.T + bias`` for float32 ``x`` ``(..., K)`` and float16 ``weight`` ``(N, K)``, in float32."""
        return self._float_product(self._f16, x, weight, torch.float16, bias)

    @staticmethod
    def _float_product(kernel: Callable[..., None], x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype,
                       bias: torch.Tensor | None) -> torch.Tensor:
        """One of the float kernels (weights of ``dtype``) on ``x``'s rows, the output float32."""
        rows = _rows(x, weight, dtype, bias)  # (M, K)
        y = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.float32)  # (M, N)
        kernel(rows.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
               rows.shape[0], weight.shape[0], weight.shape[1], torch.get_num_threads())
        return y.view(*x.shape[:-1], weight.shape[0])  # (..., N)

    def linear_int8(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    *, check: bool = False) -> torch.Tensor:
        """``x``'s rows rounded to int8 (a scale each) times int8 ``weight`` ``(N, K)`` rows, times both scales, + bias.

        A row holding NaN or inf gives NaN outputs; with ``check`` it is refused (``NonFiniteError``).
        """
        rows = _rows(x, weight, torch.int8, bias)  # (M, K)
        if scale.dtype != torch.float32 or scale.shape != weight.shape[:1] or not scale.is_contiguous():
            raise ValueError("the int8 kernel needs one contiguous float32 scale per weight row")
        if check and not bool(torch.isfinite(rows).all()):
            raise NonFiniteError(OVERFLOWED)
        y = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.float32)  # (M, N)
        if self._i8(rows.data_ptr(), weight.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(),
                    y.data_ptr(), rows.shape[0], weight.shape[0], weight.shape[1], torch.get_num_threads()):
            raise MemoryError("gpt2lite's int8 kernel could not allocate its rounded activations")
        return y.view(*x.shape[:-1], weight.shape[0])  # (..., N)

    def linear_int4(self, x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor,
                    bias: torch.Tensor | None, out_features: int, group_size: int) -> torch.Tensor:
        """``x`` times the first ``out_features`` rows of a 4-bit ``weight`` ``(N, K / 2)`` (plain rows), + bias.

        ``w = (q - 8) * scale + zero`` with ``scales_and_zeros`` ``(K / group_size, N, 2)`` bfloat16, stored
        row after row (the transposed view of a contiguous ``(N, K / group_size, 2)``);
        ``x``'s rows are rounded to int8 in blocks of 32 inputs, a scale each (see ``gemv.c``).
        """
        K = 2 * weight.shape[1] if weight.dim() == 2 else 0
        if (x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != K or weight.dtype != torch.uint8
                or not weight.is_contiguous() or K % ALIGN or group_size % 32 or group_size & (group_size - 1)
                or K % group_size or scales_and_zeros.dtype != torch.bfloat16
                or not scales_and_zeros.transpose(0, 1).is_contiguous()
                or scales_and_zeros.shape != (K // group_size, weight.shape[0], 2)
                or not 0 < out_features <= weight.shape[0]
                or (bias is not None and (bias.dtype != torch.float32 or bias.shape != (out_features,)
                                          or not bias.is_contiguous()))):
            raise ValueError("the int4 kernel needs float32 CPU rows (..., K), a contiguous uint8 (N, K / 2) weight "
                             f"with K a multiple of {ALIGN}, bfloat16 (K / group_size, N, 2) scales stored row after "
                             "row, group_size a power of two from 32, and a float32 (out_features,) bias or None")
        rows = x.reshape(-1, K).contiguous()  # (M, K)
        y = torch.empty(rows.shape[0], out_features, dtype=torch.float32)  # (M, out)
        if self._i4(rows.data_ptr(), weight.data_ptr(), scales_and_zeros.data_ptr(),
                    None if bias is None else bias.data_ptr(), y.data_ptr(), rows.shape[0], out_features, K,
                    group_size, torch.get_num_threads()):
            raise MemoryError("gpt2lite's int4 kernel could not allocate its rounded activations")
        return y.view(*x.shape[:-1], out_features)  # (..., out)

    def attend_one_row(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """``softmax(q @ k.T * scale) @ v`` for one query row: ``q`` ``(B, H, 1, D)``, ``k``, ``v`` ``(B, H, S, D)``.

        ``k`` and ``v`` may be any strided view (the cache's slots) whose last dimension is contiguous;
        ``D`` a multiple of 8, at most 256.
        """
        B, H, _, D = q.shape
        if (q.shape[2] != 1 or D % 8 or D > 256 or k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D
                or not q.dtype == k.dtype == v.dtype == torch.float32 or k.stride(-1) != 1 or v.stride(-1) != 1):
            raise ValueError("the attention kernel needs float32 q (B, H, 1, D), k and v (B, H, S, D) with "
                             "contiguous rows, D a multiple of 8 up to 256")
        rows = q.contiguous()  # (B, H, 1, D)
        y = torch.full((B, H, 1, D), float("nan"))  # (B, H, 1, D); stays NaN only if the kernel could not allocate
        self._attend(rows.data_ptr(), k.data_ptr(), v.data_ptr(), y.data_ptr(), B, H, k.shape[2], D,
                     *k.stride()[:3], *v.stride()[:3], scale, torch.get_num_threads())
        return y


    def block_step(self, prepared: _Prepared, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: int) -> None:
        """One block's decode step for one row, in place: ``x`` ``(C,)`` float32; ``k``, ``v`` ``(H, S, D)`` caches."""
        error = self._block(ctypes.addressof(prepared.block), x.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0),
                            k.stride(1), v.stride(0), v.stride(1), slot, torch.get_num_threads())
        if error:
            raise MemoryError("gpt2lite's block kernel could not allocate its buffers") if error == -1 else \
                ValueError("gpt2lite's block kernel does not take these shapes")


def _rows(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` as contiguous float32 rows ``(M, K)``, once the operands are checked (the kernels read raw memory)."""
    if (x.dtype != torch.float32 or x.device.type != "cpu" or weight.dtype != dtype or not NativeKernels.fits(weight)
            or x.shape[-1] != weight.shape[1]
            or (bias is not None and (bias.dtype != torch.float32 or bias.shape != weight.shape[:1]
                                      or not bias.is_contiguous()))):
        raise ValueError(f"the kernel needs float32 CPU rows (..., K), a contiguous {dtype} (N, K) weight with K a "
                         f"multiple of {ALIGN}, and a float32 (N,) bias or None")
    return x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)


_LOADED: dict[tuple[str | None, str | None], NativeKernels | None] = {}
_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    """``~/.cache/gpt2lite/kernels``."""
    return Path.home() / ".cache" / "gpt2lite" / "kernels"


def load_kernels(cache_dir: str | os.PathLike[str] | None = None, *, isa: str | None = None) -> NativeKernels | None:
    """This process's kernels: built (or found in ``cache_dir``) at the first call, None where they cannot be.

    ``isa`` forces a variant (``"avx2"``, ``"avx512"``; default: the best this CPU
    runs). The first call decides for the process (later calls with the same
    arguments return the same object); each reason for None is logged once, at INFO.
    """
    asked = (None if cache_dir is None else os.fspath(cache_dir), isa)
    if asked in _LOADED:  # the products ask before each call: the answer is a dictionary lookup
        return _LOADED[asked]
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    features = cpu_features()
    isa = isa or ("avx512" if features >= _AVX2 | _AVX512 else "avx2")
    key = (str(directory.resolve()), isa)
    with _LOCK:
        if key not in _LOADED:
            why = _unsupported(features, isa)
            kernels = None if why else _build_and_load(directory, features, isa)
            if why:
                log.info("gpt2lite's CPU kernels are off (%s); products take PyTorch's routes", why)
            _LOADED[key] = kernels
        _LOADED[asked] = _LOADED[key]
        return _LOADED[key]


def _unsupported(features: frozenset[str], isa: str) -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU: {platform.machine()}"
    if isa not in ("avx2", "avx512"):
        raise ValueError(f"isa must be 'avx2' or 'avx512', got {isa!r}")
    need = _AVX2 | (_AVX512 if isa == "avx512" else set())
    if not need <= features:
        return f"the CPU lacks {', '.join(sorted(need - features))}"
    return None


def _compiler() -> str | None:
    return shutil.which("gcc") or shutil.which("cc")


def _build_and_load(directory: Path, features: frozenset[str], isa: str) -> NativeKernels | None:
    compiler = _compiler()
    if compiler is None:
        log.info("gpt2lite's CPU kernels are off (no C compiler: gcc or cc); products take PyTorch's routes")
        return None
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), " ".join(sorted(features)).encode(),
                                        torch.__version__.encode(), compiler.encode()])).hexdigest()
    gl_key = int(digest[:15], 16)
    path = directory / f"gemv-{digest[:20]}.so"
    for attempt in range(2):
        if not _regular_file(path):
            error = _build(compiler, path, gl_key)
            if error:
                log.info("gpt2lite's CPU kernels are off (the build failed: %s); products take PyTorch's routes", error)
                return None
        try:
            library = ctypes.CDLL(str(path))
            library.gl_key.restype = ctypes.c_uint64
            if library.gl_key() != gl_key:
                raise OSError("another build's library")
            kernels = NativeKernels(library, isa, path)
        except (OSError, AttributeError) as error:  # damaged, truncated or foreign: build it again
            if attempt:
                log.info("gpt2lite's CPU kernels are off (%s); products take PyTorch's routes", error)
                return None
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        why = _self_test(kernels)
        if why:
            log.info("gpt2lite's CPU kernels are off (self-test: %s); products take PyTorch's routes", why)
            return None
        return kernels
    return None


def _regular_file(path: Path) -> bool:
    """Whether ``path`` is a plain file of plausible size (a symlink, FIFO or device is removed, to be rebuilt)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISREG(info.st_mode) and 0 < info.st_size <= _MAX_LIBRARY_BYTES:
        return True
    with contextlib.suppress(OSError):
        path.unlink()
    return False


def _build(compiler: str, path: Path, gl_key: int) -> str | None:
    """Compile the library to ``path`` atomically; the first line of the error, or None."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            done = subprocess.run([compiler, *FLAGS, f"-DGL_KEY=UINT64_C({gl_key})", "-o", str(tmp), str(SOURCE)],
                                  capture_output=True, text=True, timeout=_BUILD_SECONDS, check=False)
            if done.returncode:
                lines = (done.stderr or done.stdout or f"exit status {done.returncode}").strip().splitlines()
                raise RuntimeError(next((line for line in lines if "error" in line), lines[0]))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
        return str(error)
    return None


def _self_test(kernels: NativeKernels) -> str | None:
    """A product of each kernel against PyTorch's, on small random values: what a miscompiled library fails."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 128, generator=g), torch.randn(40, 128, generator=g), torch.randn(40, generator=g)
    if not torch.allclose(kernels.linear_f32(x, w, b), x @ w.T + b, rtol=1e-4, atol=1e-4):
        return "float32 product"
    if not torch.allclose(kernels.linear_f16(x, w.half(), b), x @ w.half().float().T + b, rtol=1e-4, atol=1e-4):
        return "float16-weight product"
    q = torch.randint(-127, 128, (40, 128), generator=g, dtype=torch.int8)
    scale = torch.rand(40, generator=g)
    expected = (x @ (q.float() * scale[:, None]).T) + b
    bound = 0.05 * float(expected.abs().max())
    if not torch.allclose(kernels.linear_int8(x, q, scale, b), expected, rtol=0.05, atol=bound):
        return "int8 product"
    codes = torch.randint(0, 256, (40, 64), generator=g, dtype=torch.int32)  # two 4-bit codes a byte
    scales = (torch.rand(40, 4, 2, generator=g) * 0.1).bfloat16().transpose(0, 1)  # groups of 32: (K / 32, N, 2)
    nibbles = torch.stack([codes & 15, codes >> 4], -1).view(40, 4, 32).float()  # (N, G, 32)
    w4 = ((nibbles - 8) * scales[..., 0].float().T[..., None] + scales[..., 1].float().T[..., None]).view(40, 128)
    expected = x @ w4.T + b
    bound = 0.05 * float(expected.abs().max())
    if not torch.allclose(kernels.linear_int4(x, codes.to(torch.uint8), scales, b, 40, 32), expected, rtol=0.05,
                          atol=bound):
        return "int4 product"
    return None


def kernels_for(route: KernelRoute) -> NativeKernels | None:
    """The process's kernels for a layer set to ``route`` (None for ``"torch"`` or where none could be built)."""
    return load_kernels() if route == "native" else None


def one_row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """A decode step's attention ``(B, H, 1, D)`` through gpt2lite's kernel, or None where it does not serve.

    It serves eager float32 CPU inference with a head size that is a multiple of 8
    (at most 256); elsewhere (and inside ``torch.compile``, whose own code serves)
    the caller takes ``scaled_dot_product_attention``.
    """
    if (q.device.type != "cpu" or not q.dtype == k.dtype == v.dtype == torch.float32 or q.shape[2] != 1
            or q.shape[3] % 8 or q.shape[3] > 256 or k.stride(-1) != 1 or v.stride(-1) != 1
            or torch.compiler.is_compiling() or (torch.is_grad_enabled() and q.requires_grad)):
        return None
    kernels = load_kernels()
    return None if kernels is None else kernels.attend_one_row(q, k, v, scale)


def use_kernels(model: nn.Module, route: KernelRoute = "native") -> nn.Module:
    """Set the product route of every layer of ``model`` that has one (quantized and prepacked layers); return it.

    ``"native"`` (the default of ``load_model``): gpt2lite's compiled kernels where
    they serve, PyTorch's elsewhere (a decode step's one-row attention too);
    ``"torch"``: PyTorch's routes only.
    """
    if route not in KERNEL_ROUTES:
        raise ValueError(f"kernels must be one of {KERNEL_ROUTES}, got {route!r}")
    for module in model.modules():
        if getattr(type(module), "kernels", None) in KERNEL_ROUTES:
            module.kernels = route
            if hasattr(module, "follow_route"):  # int4: the weight's layout is the route's
                module.follow_route()
        if hasattr(type(module), "one_row_attention"):  # GPT-2's attention: a hook for a decode step's attention
            module.one_row_attention = one_row_attention if route == "native" else None
        if hasattr(type(module), "decode_step"):  # GPT-2's block: a hook for a whole decode step of one row
            module.decode_step = block_step if route == "native" else None
    return model


@dataclass(frozen=True)
class NativeOperands:
    """What the kernels read for a layer's product: ``kind`` ("f32", "f16", "int8", "int4"), the weight and bias,
    and the int8 scales or the int4 scales and offsets (``Int4Linear``'s, stored row after row) and group size."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: torch.Tensor | None = None
    scales_and_zeros: torch.Tensor | None = None
    group_size: int = 0


def native_f32_operands(layer: nn.Linear) -> NativeOperands | None:
    """A float32 ``nn.Linear``'s operands for the kernels, or None where they do not take it."""
    weight, bias = layer.weight, layer.bias
    if weight.dtype != torch.float32 or not NativeKernels.fits(weight) \
            or (bias is not None and bias.dtype != torch.float32):
        return None
    return NativeOperands("f32", weight, bias)


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("unused", ctypes.c_int32), ("w", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("sz", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("G", ctypes.c_int64)]


class _Block(ctypes.Structure):
    _fields_ = [("ln1_w", ctypes.c_void_p), ("ln1_b", ctypes.c_void_p), ("ln2_w", ctypes.c_void_p),
                ("ln2_b", ctypes.c_void_p), ("eps1", ctypes.c_float), ("eps2", ctypes.c_float),
                ("scale", ctypes.c_float), ("unused", ctypes.c_int32), ("qkv", _Linear), ("proj", _Linear),
                ("fc", _Linear), ("out", _Linear), ("C", ctypes.c_int64), ("H", ctypes.c_int64), ("D", ctypes.c_int64)]


_KINDS = {"f32": 0, "f16": 1, "int8": 2, "int4": 3}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # GPT-2's activation: the one the block kernel has


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@dataclass
class _Prepared:
    """A block's operands for the block kernel (None where it does not serve the block), and what they were read
    from: (mapping, key, value) entries, each still ``mapping[key] is value`` while the operands hold."""

    block: _Block | None
    held: list[tuple[dict, str, object]]

    def holds(self) -> bool:
        """Whether the block still has the sub-layers, tensors and routes the operands were read from (~2 us)."""
        return all(mapping.get(key) is value for mapping, key, value in self.held)


def _held(block: nn.Module) -> list[tuple[dict, str, object]]:
    """The sub-layers a block step reads, their tensors and routes, each where it is found."""
    held: list[tuple[dict, str, object]] = []
    for parent, names in ((block, ("ln_1", "attn", "ln_2", "mlp")), (block.attn, ("c_attn", "c_proj")),
                          (block.mlp, ("c_fc", "c_proj"))):
        for name in names:
            module = parent._modules[name]
            held.append((parent._modules, name, module))
            if name in ("attn", "mlp"):
                continue
            held += [(module._parameters, key, t) for key, t in module._parameters.items()]
            held += [(module._buffers, key, t) for key, t in module._buffers.items()]
            held += [(module.__dict__, key, module.__dict__.get(key)) for key in ("kernels", "one_row")]
    held.append((block.mlp.__dict__, "act", block.mlp.__dict__.get("act")))
    return held


def _prepare(block: nn.Module) -> _Prepared:
    """The block kernel's operands for ``block`` (None where it does not serve it: it then runs as written)."""
    held = _held(block)  # read first: what changes after this is seen by the next step
    unsupported = _Prepared(None, held)
    attn, mlp, ln_1, ln_2 = block.attn, block.mlp, block.ln_1, block.ln_2
    activation = _activation_of(block)
    if activation not in _GELU_TANH or attn.upcast:
        return unsupported
    layers = []
    for layer in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj):
        if type(layer) is nn.Linear:  # a model loaded without prepack: its weights as they are
            operands = native_f32_operands(layer)
        else:  # the layers that declare what the kernels read (prepacked, f16, int8, int4); LoRA's do not
            operands = layer.native_operands() if hasattr(layer, "native_operands") else None
        if operands is None or operands.weight.device.type != "cpu":
            return unsupported
        layers.append(operands)
    for ln in (ln_1, ln_2):
        if type(ln) is not nn.LayerNorm or ln.weight is None or ln.bias is None or ln.weight.dtype != torch.float32 \
                or ln.bias.dtype != torch.float32:
            return unsupported
    C = ln_1.weight.shape[0]
    H = attn.n_head
    D = C // H if H else 0
    def width(o: NativeOperands) -> int:  # the input width K (int4: two codes a byte)
        return o.weight.shape[1] * (2 if o.kind == "int4" else 1)

    if (C % 64 or D * H != C or D % 8 or D > 256 or layers[0].weight.shape[0] < 3 * C
            or [width(o) for o in layers[:3]] != [C, C, C]
            or layers[1].weight.shape[0] < C or layers[3].weight.shape[0] < C):
        return unsupported

    def linear(o: NativeOperands, n: int) -> _Linear:
        return _Linear(_KINDS[o.kind], 0, o.weight.data_ptr(), _pointer(o.scale), _pointer(o.scales_and_zeros),
                       _pointer(o.bias), n, width(o), o.group_size)

    fc = layers[2]
    fc_width = fc.bias.shape[0] if fc.bias is not None else fc.weight.shape[0]  # int4 pads its rows
    widths = (3 * C, C, fc_width, C)
    if any(o.bias is not None and o.bias.shape[0] != n for o, n in zip(layers, widths, strict=True)) \
            or fc_width % 64 or width(layers[3]) != fc_width or fc.weight.shape[0] < fc_width:
        return unsupported
    structure = _Block(ln_1.weight.data_ptr(), ln_1.bias.data_ptr(), ln_2.weight.data_ptr(), ln_2.bias.data_ptr(),
                       ln_1.eps, ln_2.eps, attn.scale, 0, *(linear(o, n) for o, n in zip(layers, widths, strict=True)),
                       C, H, D)
    return _Prepared(structure, held)


_PREPARED: weakref.WeakKeyDictionary[nn.Module, _Prepared] = weakref.WeakKeyDictionary()


def block_step(block: nn.Module, x: torch.Tensor, state: object, plan: object) -> torch.Tensor | None:
    """A GPT-2 block's decode step through the block kernel, or None where it does not serve.

    It serves one row of one new token (``x`` ``(1, 1, C)``, float32, CPU) at a
    plain cache slot, in eager inference with every sub-layer one the kernels read
    (float32, f16, int8 or int4 weights; not LoRA-wrapped) and GPT-2's GELU; the
    caller runs the block as written elsewhere (batches, prompts, training,
    ``torch.compile``).
    """
    if (torch.compiler.is_compiling() or x.shape[0] != 1 or x.shape[1] != 1 or x.dtype != torch.float32
            or x.device.type != "cpu" or state is None or plan.slot is None or plan.mask is not None
            or plan.rows is not None or plan.width != plan.slot + 1 or block.training or torch.is_grad_enabled()):
        return None
    k, v = state.k[block.attn.layer], state.v[block.attn.layer]  # (1, H, max, D)
    if k.shape[0] != 1 or k.dtype != torch.float32 or v.dtype != torch.float32 or k.stride(-1) != 1 \
            or v.stride(-1) != 1:
        return None
    prepared = _PREPARED.get(block)
    if prepared is None or not prepared.holds():
        prepared = _PREPARED[block] = _prepare(block)
    kernels = load_kernels()
    if prepared.block is None or kernels is None:
        return None
    y = x.reshape(-1).clone()  # (C,): the block's input stays as it was
    kernels.block_step(prepared, y, k[0], v[0], plan.slot)
    return y.view(1, 1, -1)


def _activation_of(block: nn.Module) -> str | None:
    """The name of the block's MLP activation, where it is one of GPT-2's tanh-form GELUs."""
    return next((name for name in _GELU_TANH if ACTIVATION_FUNCTIONS.get(name) is block.mlp.act), None)


# The kernels as ops that torch.compile traces into its graph (an opaque call to each), so a
# compiled decode step keeps them. Eager code calls the library directly: an op costs ~10 us a call.
if not hasattr(torch.ops.gpt2lite, "native_linear_f32"):  # defined once per process (a reload must not redo it)
    @torch.library.custom_op("gpt2lite::native_linear_f32", mutates_args=())
    def _linear_f32_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kernels = load_kernels()
        if kernels is None:
            return torch.nn.functional.linear(x, weight, bias)
        return kernels.linear_f32(x, weight, bias)

    @_linear_f32_op.register_fake
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.custom_op("gpt2lite::native_linear_f16", mutates_args=())
    def _linear_f16_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kernels = load_kernels()
        if kernels is None:
            return torch.nn.functional.linear(x, weight.to(x.dtype), bias)
        return kernels.linear_f16(x, weight, bias)

    @_linear_f16_op.register_fake
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.custom_op("gpt2lite::native_linear_int8", mutates_args=())
    def _linear_int8_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                        check: bool) -> torch.Tensor:
        kernels = load_kernels()
        if kernels is None:  # traced where the kernels were built; run where they cannot be
            if check and not bool(torch.isfinite(x).all()):
                raise NonFiniteError(OVERFLOWED)
            y = torch.nn.functional.linear(x, weight.to(x.dtype)) * scale
            return y if bias is None else y + bias
        return kernels.linear_int8(x, weight, scale, bias, check=check)

    @_linear_int8_op.register_fake
    def _(x, weight, scale, bias, check):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.custom_op("gpt2lite::native_linear_int4", mutates_args=())
    def _linear_int4_op(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor,
                        bias: torch.Tensor | None, out_features: int, group_size: int) -> torch.Tensor:
        kernels = load_kernels()
        if kernels is None:  # traced where the kernels were built; run where they cannot be
            codes = weight[:out_features].to(torch.int32)  # (out, K / 2): plain rows, two codes a byte
            codes = torch.stack([codes & 15, codes >> 4], dim=-1).view(out_features, -1, group_size)  # (out, G, gs)
            scale, zero = scales_and_zeros[:, :out_features].float().permute(2, 1, 0)  # (out, G) each
            w = ((codes - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).flatten(1)  # (out, K)
            return torch.nn.functional.linear(x, w, bias)
        return kernels.linear_int4(x, weight, scales_and_zeros, bias, out_features, group_size)

    @_linear_int4_op.register_fake
    def _(x, weight, scales_and_zeros, bias, out_features, group_size):
        return x.new_empty(*x.shape[:-1], out_features)
