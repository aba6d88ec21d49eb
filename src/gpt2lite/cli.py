"""The ``gpt2lite`` command line: ``gpt2lite generate "prompt"`` streams a continuation to stdout."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: the message says what is wrong, --help says the rest.
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subparser per command."""
    parser = _Parser(prog="gpt2lite", description="GPT-2 text generation in plain PyTorch.")
    from gpt2lite import __version__

    parser.add_argument("--version", action="version", version=f"gpt2lite {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    gen = commands.add_parser("generate", help="continue a prompt, streaming the text to stdout")
    gen.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted or '-'")
    gen.add_argument("--model", default="gpt2", help="hub id or local path (default: gpt2)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add (default: 64)")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 for greedy (default: 1.0)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default: 0, off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0, off)")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--stop", action="append", default=None, help="stop before this string (repeatable)")
    gen.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    gen.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default: float32)")
    gen.add_argument("--offline", action="store_true", help="use only files already in the hub cache")
    gen.set_defaults(run=_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    from gpt2lite.hub import ModelNotFoundError

    try:
        return args.run(args)
    except (ModelNotFoundError, ValueError, TypeError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            return 0  # the reader went away (`| head`): not an error
        message = " ".join(str(exc).split())
        print(f"gpt2lite: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _generate(args: argparse.Namespace) -> int:
    import torch

    from gpt2lite.pipeline import TextGenerator

    prompt = args.prompt
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError("no prompt: give one as an argument or pipe it on stdin")
        prompt = sys.stdin.read()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    options = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed,
    )
    from gpt2lite.generation import GenerationOptions

    GenerationOptions(**options)  # bad values fail here, before the model is loaded
    generator = TextGenerator.from_pretrained(args.model, device=device, dtype=args.dtype,
                                              local_files_only=args.offline)
    for piece in generator.stream(prompt, stop=args.stop, **options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
