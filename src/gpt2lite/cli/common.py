"""What the commands share: devices, model loading flags, reading text from arguments, files and stdin."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpt2lite.text.generator import TextGenerator

__all__ = ["QUANTIZE_CHOICES", "add_model_options", "check_device", "load_text_generator", "port", "positive",
           "read_input", "seconds", "split_lines", "utf8_text"]


def port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number in 0..65535, got {value!r}")
    return int(value)


def seconds(value: str) -> float:
    """An argparse type: a finite number of seconds >= 0."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {value!r}")
    return number


def positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return number


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default: float32)")
    parser.add_argument("--offline", action="store_true", help="use only files already in the hub cache")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                        help="int8 weights (faster inference), int4 (smallest) or f16 (float16 weights; default: off)")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter directory (PEFT format) to apply")
    parser.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=None,
                        help="float32 on the CPU: faster batches for twice the weight memory (default: only the "
                             "one-row kernel measured fastest on this CPU; --no-prepack: F.linear everywhere)")
    parser.add_argument("--cjk-spaces", action="store_true",
                        help="a BERT (WordPiece) vocabulary: keep the space transformers writes between every two "
                             "Chinese characters (default: none, as Chinese is written)")
    parser.add_argument("--kernels", choices=KERNEL_CHOICES, default="native",
                        help="CPU products: native = gpt2lite's own kernels, compiled at first use (default; "
                             "PyTorch's where none can be built), torch = PyTorch's routes only")


# gpt2lite.transforms.quantize.QUANTIZE_MODES, spelled out so that parsing arguments needs no torch.
QUANTIZE_CHOICES = ("int8", "int4", "f16")
KERNEL_CHOICES = ("native", "torch")  # gpt2lite.transforms.native.KERNEL_ROUTES


def load_text_generator(args: argparse.Namespace, name_or_path: str, *, draft: bool = False) -> TextGenerator:
    """The model (``--adapter`` applied, except to a draft model) and tokenizer the options of ``args`` ask for."""
    from gpt2lite.text.generator import TextGenerator

    return TextGenerator.from_pretrained(name_or_path, device=check_device(args.device), dtype=args.dtype,
                                         local_files_only=args.offline, quantize=args.quantize,
                                         adapter=None if draft else args.adapter, prepack=args.prepack,
                                         cjk_spaces=args.cjk_spaces, kernels=args.kernels)


def check_device(name: str) -> str:
    """Check a --device value against this machine; 'auto' is CUDA when there is one."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available (this torch is built without it, or no GPU "
                             "is visible); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu" and not getattr(torch, device.type).is_available():
        raise ValueError(f"--device {name}: {device.type} is not available here; use --device cpu")
    return name


def split_lines(text: str) -> list[str]:
    """One entry per line, split at newlines only (a U+2028 or form feed inside a line stays in it); CRLF too."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line.removesuffix("\r") for line in lines]


def read_input(value: str | None, what: str, *, is_file: bool) -> str:
    """The text of an argument, a file or stdin, as written: UTF-8 (a byte-order mark dropped), newlines kept."""
    if value is None or value == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError(f"no {what}: give one as an argument or pipe it on stdin")
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:  # a text stream without bytes underneath (a test's StringIO)
            return sys.stdin.read()
        return utf8_text(stream.read(), "stdin")
    if is_file:
        try:
            with open(value, "rb") as f:
                return utf8_text(f.read(), repr(value))
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            raise type(exc)(f"{what}: cannot read {value!r}: {exc.strerror.lower()}") from None
    return value


def utf8_text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")  # Excel and Notepad begin UTF-8 with a byte-order mark
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8") from None
