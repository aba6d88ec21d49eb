"""The ``gpt2lite`` command line: ``gpt2lite generate "prompt"`` streams a continuation to stdout.

One module per command (``generate``, ``finetune``, ``serve``; the smaller ones
in ``commands``); what they share is in ``common``. Nothing here imports torch
before a command runs, so ``gpt2lite --help`` starts at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from gpt2lite.cli.commands import (
    add_classify,
    add_evaluate,
    add_perplexity,
    add_prepare,
    add_push,
    add_train_tokenizer,
)
from gpt2lite.cli.common import QUANTIZE_CHOICES
from gpt2lite.cli.finetune import add_finetune
from gpt2lite.cli.generate import add_generate, as_flags
from gpt2lite.cli.serve import add_serve

__all__ = ["QUANTIZE_CHOICES", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: the message says what is wrong, --help says the rest.
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subparser per command."""
    from gpt2lite import __version__

    parser = _Parser(prog="gpt2lite", description="GPT-2 text generation in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"gpt2lite {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    for add in (add_generate, add_finetune, add_prepare, add_train_tokenizer, add_classify, add_serve, add_evaluate,
                add_perplexity, add_push):
        add(commands)
    return parser


def _flags(command: str) -> set[str]:
    """The option strings of one command (``--top-p``, ...), to name an option at fault by its flag."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(commands.choices[command]._option_string_actions)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        from gpt2lite.errors import ModelNotFoundError, NonFiniteError, OptionError

        try:
            return args.run(args)
        except BrokenPipeError:
            return 0  # the reader went away (`| head`): not an error
        except (ModelNotFoundError, NonFiniteError, ValueError, TypeError, OSError, RuntimeError,
                ImportError) as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            if args.command == "generate":  # whose flags are GenerationOptions' fields
                message = as_flags(message)
            flag = "--" + exc.param.replace("_", "-") if isinstance(exc, OptionError) else None
            if flag is not None and flag in _flags(args.command) and flag not in message:
                # The option at fault, named as this command's flag.
                named = message.startswith(exc.param + " ")
                message = flag + message[len(exc.param):] if named else f"{flag}: {message}"
            print(f"gpt2lite: error: {message}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        # Also during start-up (imports, loading): a quiet exit, no traceback.
        print("gpt2lite: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
