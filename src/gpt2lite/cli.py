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

    ft = commands.add_parser("finetune", help="train a model (or fine-tune a checkpoint) on your text")
    ft.add_argument("--data", required=True, help="a text file, a folder of text files")
    ft.add_argument("--out", required=True, help="output directory: data cache, checkpoint.pt, final/")
    start = ft.add_mutually_exclusive_group()
    start.add_argument("--model", help="checkpoint to fine-tune: hub id or local path (default: gpt2)")
    start.add_argument("--preset", help="train from scratch from a config preset (gpt2, ..., tiny)")
    ft.add_argument("--steps", type=int, default=1000)
    ft.add_argument("--batch-size", type=int, default=8, help="windows per micro-batch per process")
    ft.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ft.add_argument("--block-size", type=int, default=None, help="tokens per window (default: min(context, 256))")
    ft.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 6e-4, 1e-4 fine-tuning)")
    ft.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: lr / 10)")
    ft.add_argument("--warmup-steps", type=int, default=100)
    ft.add_argument("--weight-decay", type=float, default=0.1)
    ft.add_argument("--grad-clip", type=float, default=1.0)
    ft.add_argument("--eval-interval", type=int, default=100)
    ft.add_argument("--save-interval", type=int, default=100)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--autocast", choices=["bf16", "fp16"], default=None, help="mixed precision on CUDA")
    ft.add_argument("--compile", action="store_true", help="torch.compile the model")
    ft.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ft.add_argument("--device", default="auto")
    ft.add_argument("--offline", action="store_true", help="use only files already in the hub cache")
    ft.set_defaults(run=_finetune)

    ppl = commands.add_parser("perplexity", help="perplexity of a model on a text file")
    ppl.add_argument("text", nargs="?", help="text file; stdin when omitted or '-'")
    ppl.add_argument("--model", default="gpt2", help="hub id or local path (default: gpt2)")
    ppl.add_argument("--max-length", type=int, default=None, help="window length (default: the context)")
    ppl.add_argument("--stride", type=int, default=None, help="window step (default: half a window)")
    ppl.add_argument("--device", default="auto")
    ppl.add_argument("--dtype", default="float32")
    ppl.add_argument("--offline", action="store_true", help="use only files already in the hub cache")
    ppl.set_defaults(run=_perplexity)
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


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _read_input(value: str | None, what: str, *, is_file: bool) -> str:
    if value is None or value == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError(f"no {what}: give one as an argument or pipe it on stdin")
        return sys.stdin.read()
    if is_file:
        with open(value, encoding="utf-8", errors="replace") as f:
            return f.read()
    return value


def _generate(args: argparse.Namespace) -> int:
    from gpt2lite.pipeline import TextGenerator

    prompt = _read_input(args.prompt, "prompt", is_file=False)
    device = _device(args.device)
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


def _finetune(args: argparse.Namespace) -> int:
    import os

    import torch

    from gpt2lite.config import GPT2Config
    from gpt2lite.data import prepare_data
    from gpt2lite.model import GPT2
    from gpt2lite.train import TrainConfig, check_output_dir, train

    scratch = args.preset is not None
    lr = args.lr if args.lr is not None else (6e-4 if scratch else 1e-4)
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, block_size=args.block_size,
        lr=lr, min_lr=args.min_lr if args.min_lr is not None else lr / 10, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_interval=args.eval_interval,
        save_interval=args.save_interval, seed=args.seed, autocast=args.autocast, compile=args.compile,
    )  # bad values fail here, before any data is read
    if not os.path.exists(args.data):
        raise FileNotFoundError(f"no such file or folder: {args.data!r}")
    check_output_dir(args.out)
    # Under torchrun each process learns its rank from the environment: join the group.
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    device = _device(args.device)
    if distributed:
        backend = "nccl" if device == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    try:
        if scratch:
            torch.manual_seed(args.seed)
            model = GPT2(GPT2Config.from_preset(args.preset)).to(device)
        else:
            model = GPT2.from_pretrained(args.model or "gpt2", device=device, local_files_only=args.offline)
        if args.block_size is not None and args.block_size > model.config.n_positions:
            raise ValueError(f"--block-size {args.block_size} exceeds the model's context "
                             f"({model.config.n_positions} positions)")
        # One process tokenizes; the others then find its manifest and reuse the tokens.
        rank = torch.distributed.get_rank() if distributed else 0
        if rank == 0:
            data = prepare_data(args.data, os.path.join(args.out, "data"))
        if distributed:
            torch.distributed.barrier()
        if rank != 0:
            data = prepare_data(args.data, os.path.join(args.out, "data"))
        result = train(model, data, args.out, config, resume=args.resume)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if rank == 0 and result.val_losses:
        step, val = result.val_losses[-1]
        print(f"step {step}: train loss {result.losses[-1]:.4f}, validation loss {val:.4f}")
    if rank == 0 and result.final_dir is not None:
        print(f"saved {result.final_dir}")
    return 0


def _perplexity(args: argparse.Namespace) -> int:
    from gpt2lite.pipeline import TextGenerator

    text = _read_input(args.text, "text", is_file=True)
    scorer = TextGenerator.from_pretrained(args.model, device=_device(args.device), dtype=args.dtype,
                                           local_files_only=args.offline)
    print(f"{scorer.perplexity(text, max_length=args.max_length, stride=args.stride):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
