"""The ``gpt2lite`` command line: ``gpt2lite generate "prompt"`` streams a continuation to stdout."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from gpt2lite.text.generator import TextGenerator

__all__ = ["build_parser", "main"]


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
    for add in (_add_generate, _add_finetune, _add_train_tokenizer, _add_classify, _add_serve, _add_evaluate,
                _add_perplexity, _add_push):
        add(commands)
    return parser


def _add_generate(commands: Any) -> None:
    """The ``generate`` command's flags: one per generation option."""
    gen = commands.add_parser("generate", help="continue a prompt, streaming the text to stdout")
    gen.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted or '-'")
    gen.add_argument("--model", default="gpt2", help="hub id or local path (default: gpt2)")
    files = gen.add_argument_group("many prompts, from a file to a file")
    files.add_argument("--prompts", default=None,
                       help="a file of prompts, one per line (with --jsonl: JSON objects with 'prompt' and options)")
    files.add_argument("--out", default=None, help="where the completions go (with --prompts)")
    files.add_argument("--jsonl", action="store_true",
                       help="--prompts is JSONL, options per row; --out gets one JSON object per prompt")
    files.add_argument("--batch-size", type=_positive, default=8, help="prompts generated together (default: 8)")
    _add_generation_options(gen)
    _add_model_options(gen)
    gen.set_defaults(run=_generate)


# The flags that set a run up, with their defaults: OUT/run.json records them, and --resume takes them
# from there (a flag given again must agree). None in the parser marks a flag not given.
_RUN_FLAGS: dict[str, Any] = {
    "task": "lm", "data": None, "model": None, "preset": None, "arch": "gpt2", "n_embd": 256, "n_layer": 2,
    "dropout": 0.2, "char": False, "tokenizer": None, "text_column": "text", "label_column": "label",
    "labels": None, "val_data": None, "val_fraction": None, "encoding_errors": "strict", "lora_rank": None,
    "lora_alpha": None, "lora_dropout": 0.0, "lora_targets": "c_attn", "batch_size": 8, "grad_accum": 1,
    "block_size": None, "lr": None, "min_lr": None, "warmup_steps": 100, "weight_decay": 0.1, "grad_clip": 1.0,
    "seed": 0, "autocast": None, "freeze_blocks": 0, "gradient_checkpointing": False,
}
# Recorded too, but a resumed run may change them: a longer schedule, other evaluation and save intervals.
_RUN_CHANGEABLE: dict[str, Any] = {"steps": 1000, "eval_interval": 100, "save_interval": 100}
_PATH_FLAGS = ("data", "val_data", "tokenizer")  # recorded as absolute paths: a resume may run elsewhere


def _add_finetune(commands: Any) -> None:
    """The ``finetune`` command's flags: data, model, schedule, records, classification, LoRA."""
    ft = commands.add_parser("finetune", help="train a model (or fine-tune a checkpoint) on your text")
    flag = ft.add_argument
    flag("--task", choices=["lm", "classify", "sft"], default=None,
         help="lm: language modeling on text (default); classify: a classifier on labeled CSV/JSONL; "
              "sft: instruction tuning on JSONL prompt/completion (or messages) rows, the loss on completions")
    flag("--data", default=None,
         help="lm: a text file, a folder of text files, or a .csv/.jsonl corpus of one document per row; "
              "classify: a .csv/.tsv/.jsonl file; sft: a .jsonl file")
    flag("--out", required=True, help="output directory: data cache, checkpoint.pt, metrics.jsonl, best/, final/")
    start = ft.add_mutually_exclusive_group()
    start.add_argument("--model", default=None, help="checkpoint to fine-tune: hub id or local path (default: gpt2)")
    start.add_argument("--preset", default=None, help="train from scratch from a config preset (gpt2, ..., tiny)")
    flag("--arch", choices=["gpt2", "rnn", "lstm", "gru"], default=None,
         help="gpt2 (default), or a recurrent model trained from scratch")
    flag("--n-embd", type=int, default=None, help="recurrent models: hidden width (default: 256)")
    flag("--n-layer", type=int, default=None, help="recurrent models: layers (default: 2)")
    flag("--dropout", type=float, default=None, help="recurrent models: dropout (default: 0.2)")
    flag("--char", action="store_true", default=None,
         help="a character-level vocabulary read off the data (from scratch: --preset or --arch)")
    flag("--tokenizer", default=None,
         help="from scratch: a tokenizer folder (gpt2lite train-tokenizer's --out) instead of GPT-2's")
    flag("--text-column", default=None, help="column (CSV) or key (JSONL) of the text (default: text)")
    flag("--val-fraction", type=float, default=None,
         help="share of --data held out for validation (default: 0.05 for lm, 0.1 otherwise)")
    flag("--encoding-errors", choices=["strict", "replace"], default=None,
         help="what to do with text that is not UTF-8 (default: strict, an error)")
    sched = ft.add_argument_group("schedule")
    sched.add_argument("--steps", type=int, default=None,
                       help="optimizer steps (default: 1000; a resumed run: its own, or longer)")
    sched.add_argument("--batch-size", type=int, default=None, help="windows per micro-batch per process (default: 8)")
    sched.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default: 1)")
    sched.add_argument("--block-size", type=int, default=None, help="tokens per window (default: min(context, 256))")
    sched.add_argument("--lr", type=float, default=None,
                       help="peak learning rate (default: 6e-4 from scratch, 1e-4 fine-tuning, 1e-3 LoRA)")
    sched.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: lr / 10)")
    sched.add_argument("--warmup-steps", type=int, default=None, help="(default: 100)")
    sched.add_argument("--weight-decay", type=float, default=None, help="(default: 0.1)")
    sched.add_argument("--grad-clip", type=float, default=None, help="(default: 1.0)")
    sched.add_argument("--seed", type=int, default=None, help="(default: 0)")
    sched.add_argument("--autocast", choices=["bf16", "fp16"], default=None, help="mixed precision on CUDA")
    sched.add_argument("--compile", action="store_true", help="torch.compile the model")
    runs = ft.add_argument_group("the run's folder and records")
    runs.add_argument("--resume", action="store_true",
                      help="continue the run in OUT with its own model, tokenizer, data and settings")
    runs.add_argument("--overwrite", action="store_true", help="replace the run OUT holds (default: refuse)")
    runs.add_argument("--eval-interval", type=int, default=None, help="steps between evaluations (default: 100)")
    runs.add_argument("--save-interval", type=int, default=None, help="steps between checkpoints (default: 100)")
    runs.add_argument("--early-stopping", type=int, default=0, metavar="PATIENCE",
                      help="stop after PATIENCE evaluations without a lower validation loss (default: 0, never)")
    runs.add_argument("--sample-every", type=int, default=0, metavar="N",
                      help="generate a sample every N steps, shown and written to metrics.jsonl")
    runs.add_argument("--sample-prompt", default="", help="what the samples continue (default: from the start)")
    runs.add_argument("--sample-tokens", type=int, default=40, help="tokens per sample (default: 40)")
    runs.add_argument("--tensorboard", action="store_true",
                      help="also log to OUT/tensorboard (pip install tensorboard)")
    cls = ft.add_argument_group("classification (--task classify)")
    cls.add_argument("--labels", default=None,
                     help="class names in id order, comma-separated (default: the sorted names in the data)")
    cls.add_argument("--label-column", default=None, help="column (CSV) or key (JSONL) of the label (default: label)")
    cls.add_argument("--val-data", default=None, help="a separate validation file (default: hold out --val-fraction)")
    lora = ft.add_argument_group("LoRA and memory")
    lora.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank, not the model")
    lora.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: 2 x rank)")
    lora.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapters' input (default: 0)")
    lora.add_argument("--lora-targets", default=None,
                      help="comma-separated layers among c_attn, c_proj, c_fc (default: c_attn)")
    lora.add_argument("--freeze-blocks", type=int, default=None,
                      help="keep the first N blocks and the embeddings fixed")
    lora.add_argument("--gradient-checkpointing", action="store_true", default=None,
                      help="recompute activations in backward: less memory, ~30%% more time")
    flag("--device", default="auto")
    flag("--offline", action="store_true", help="use only files already in the hub cache")
    ft.set_defaults(run=_finetune)


def _add_classify(commands: Any) -> None:
    """The ``classify`` command's flags."""
    cl = commands.add_parser("classify", help="classify text with a fine-tuned classifier")
    cl.add_argument("text", nargs="?", help="the text; one text per line from stdin when omitted or '-'")
    cl.add_argument("--model", required=True, help="classifier directory (or LoRA adapter directory)")
    cl.add_argument("--batch-size", type=int, default=16)
    cl.add_argument("--json", action="store_true", help="one JSON object per text, with every probability")
    cl.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    cl.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default: float32)")
    cl.add_argument("--offline", action="store_true", help="use only files already in the hub cache")
    cl.set_defaults(run=_classify)


def _add_serve(commands: Any) -> None:
    """The ``serve`` command's flags: the model, the address, the limits, the shutdown."""
    srv = commands.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    srv.add_argument("--model", default="gpt2", help="hub id or local path (default: gpt2)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    srv.add_argument("--port", type=_port, default=8000, help="port (default: 8000)")
    srv.add_argument("--max-batch", type=_positive, default=16, help="requests decoded together (default: 16)")
    srv.add_argument("--max-queue", type=_positive, default=256,
                     help="requests that may wait; more get 429 (default: 256)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (not for /health)")
    srv.add_argument("--served-model-name", "--model-name", dest="served_model_name", default=None,
                     help="the model id clients send and /v1/models lists (default: the model folder's name)")
    srv.add_argument("--max-body-size", type=_positive, default=4 * 2**20,
                     help="largest request body in bytes; larger ones get 413 (default: 4 MiB)")
    srv.add_argument("--chat-template", default=None,
                     help="a Jinja chat template file for /v1/chat/completions (default: the model's own)")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="on SIGTERM or Ctrl-C, seconds to let running requests finish (default: 30)")
    srv.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (behind the key)")
    srv.add_argument("--no-prefix-cache", action="store_true",
                     help="always prefill whole prompts (default: reuse a cached shared prefix)")
    srv.add_argument("--no-playground", action="store_true", help="do not serve the playground page at /")
    _add_model_options(srv)
    srv.set_defaults(run=_serve)


def _add_train_tokenizer(commands: Any) -> None:
    """The ``train-tokenizer`` command's flags."""
    tt = commands.add_parser("train-tokenizer", help="learn a byte-level BPE vocabulary from your text")
    tt.add_argument("--data", required=True,
                    help="a text file, a folder of text files, or a .csv/.jsonl corpus of one document per row")
    tt.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, the end token included")
    tt.add_argument("--out", required=True, help="folder for vocab.json, merges.txt, tokenizer_config.json")
    tt.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often (default: 2)")
    tt.add_argument("--text-column", default="text", help="column (CSV) or key (JSONL) of the text (default: text)")
    tt.add_argument("--encoding-errors", choices=["strict", "replace"], default="strict",
                    help="what to do with text that is not UTF-8 (default: strict, an error)")
    tt.add_argument("--overwrite", action="store_true", help="replace a vocabulary already in --out")
    tt.set_defaults(run=_train_tokenizer)


def _train_tokenizer(args: argparse.Namespace) -> int:
    import os

    from gpt2lite.tokenizers.learn import train_bpe
    from gpt2lite.training.data import iter_text

    existing = [f for f in ("vocab.json", "merges.txt") if os.path.exists(os.path.join(args.out, f))]
    if existing and not args.overwrite:
        raise FileExistsError(f"{args.out!r} already holds a vocabulary ({', '.join(existing)}): --overwrite to "
                              "replace it, or choose another --out")
    texts = iter_text(args.data, args.encoding_errors, args.text_column)
    tokenizer = train_bpe(texts, args.vocab_size, min_frequency=args.min_frequency)
    tokenizer.save(args.out)
    print(f"saved a vocabulary of {tokenizer.n_vocab} tokens to {args.out} (use it: gpt2lite finetune --preset ... "
          f"--tokenizer {args.out})")
    return 0


def _add_push(commands: Any) -> None:
    """The ``push`` command's flags."""
    push = commands.add_parser("push", help="upload a saved model folder to the Hugging Face hub")
    push.add_argument("directory", help="a saved model: final/ of a training run, or save_model's folder")
    push.add_argument("repo_id", help="the hub repo, owner/name (made if missing)")
    push.add_argument("--private", action="store_true", help="make the repo private")
    push.add_argument("--token", default=None, help="a hub token (default: the one `hf auth login` saved)")
    push.set_defaults(run=_push)


def _push(args: argparse.Namespace) -> int:
    from gpt2lite.io.hub import push_to_hub

    print(push_to_hub(args.directory, args.repo_id, token=args.token, private=args.private))
    return 0


def _port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number in 0..65535, got {value!r}")
    return int(value)


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return number


def _add_evaluate(commands: Any) -> None:
    """The ``evaluate`` command's flags."""
    ev = commands.add_parser("evaluate", help="BLEU, chrF, ROUGE, distinct-n and self-BLEU of generated text")
    ev.add_argument("--predictions", required=True, help="a text file, one prediction per line")
    ev.add_argument("--references", required=True, nargs="+",
                    help="text files, one reference per line each (several files: several references)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(run=_evaluate)


def _add_perplexity(commands: Any) -> None:
    """The ``perplexity`` command's flags."""
    ppl = commands.add_parser("perplexity", help="perplexity of a model on a text file")
    ppl.add_argument("text", nargs="?", help="text file; stdin when omitted or '-'")
    ppl.add_argument("--model", default="gpt2", help="hub id or local path (default: gpt2)")
    ppl.add_argument("--max-length", type=int, default=None, help="window length (default: the context)")
    ppl.add_argument("--stride", type=int, default=None, help="window step (default: half a window)")
    _add_model_options(ppl)
    ppl.set_defaults(run=_perplexity)


# Options the CLI takes in another form: stop strings (--stop) and bad words (--bad-word) as text;
# Python hooks have no command-line form.
_NOT_FLAGS = {"stop": "--stop", "bad_words_ids": "--bad-word", "logits_processor": None}


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    """One flag per ``GenerationOptions`` field, typed from its annotation; unset flags keep the defaults."""
    from typing import Literal, get_args, get_origin, get_type_hints

    from gpt2lite.generation.options import GenerationOptions

    hints = get_type_hints(GenerationOptions)
    for f in dataclasses.fields(GenerationOptions):
        if f.name in _NOT_FLAGS:
            continue
        flags = ["--" + f.name.replace("_", "-")] + (["-n"] if f.name == "num_return_sequences" else [])
        kind = hints[f.name]
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {f.default})")
        if kind is bool:
            parser.add_argument(*flags, action="store_true", **common)
        elif get_origin(kind) is Literal:
            parser.add_argument(*flags, choices=get_args(kind), **common)
        elif f.name == "early_stopping":
            parser.add_argument(*flags, type=_bool_or_never, metavar="{true,false,never}", **common)
        elif f.name == "logit_bias":
            parser.add_argument(*flags, type=_token_bias, action="append", metavar="ID=BIAS", **common)
        elif kind in (int, int | None):
            parser.add_argument(*flags, type=int, **common)
        elif kind is float:
            parser.add_argument(*flags, type=float, **common)
        else:
            raise TypeError(f"GenerationOptions.{f.name} has no command-line form")
    parser.add_argument("--stop", dest="stop_strings", action="append", default=None,
                        help="stop before this string (repeatable)")
    parser.add_argument("--bad-word", dest="bad_words", action="append", default=None,
                        help="never generate this word, with or without a leading space (repeatable)")
    parser.add_argument("--draft-model", default=None,
                        help="speculative decoding: a smaller model with the same vocabulary proposes tokens")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per completion: text, tokens, logprobs, finish_reason")


def _bool_or_never(value: str) -> bool | str:
    choices = {"true": True, "false": False, "never": "never"}
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected true, false or never, got {value!r}")
    return choices[value.lower()]


def _token_bias(value: str) -> tuple[int, float]:
    token, _, bias = value.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS such as 50256=-100, got {value!r}") from None


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default: float32)")
    parser.add_argument("--offline", action="store_true", help="use only files already in the hub cache")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                        help="int8 weights (faster inference) or int4 (smallest; default: off)")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter directory (PEFT format) to apply")
    parser.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=None,
                        help="float32 on the CPU: faster batches for twice the weight memory (default: only the "
                             "one-row kernel measured fastest on this CPU; --no-prepack: F.linear everywhere)")


# gpt2lite.transforms.quantize.QUANTIZE_MODES, spelled out so that parsing arguments needs no torch.
QUANTIZE_CHOICES = ("int8", "int4")


def _load_text_generator(args: argparse.Namespace, name_or_path: str, *, draft: bool = False) -> TextGenerator:
    """The model (``--adapter`` applied, except to a draft model) and tokenizer the options of ``args`` ask for."""
    from gpt2lite.text.generator import TextGenerator

    return TextGenerator.from_pretrained(name_or_path, device=_device(args.device), dtype=args.dtype,
                                         local_files_only=args.offline, quantize=args.quantize,
                                         adapter=None if draft else args.adapter, prepack=args.prepack)


def _as_flags(message: str) -> str:
    """``message`` with the library's ``name=value`` advice in ``generate``'s words (``--name value``)."""
    from typing import get_type_hints

    from gpt2lite.generation.options import GenerationOptions

    hints = get_type_hints(GenerationOptions)
    # logit_bias takes ID=BIAS on the command line, not a dict: its advice stays as it is.
    names = "|".join(name for name in hints if name not in _NOT_FLAGS and name != "logit_bias")

    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        dashed = "--" + name.replace("_", "-")
        if value in ("True", "False"):  # a switch: only True has a flag, and only a plain bool is one
            return dashed if value == "True" and hints[name] is bool else match.group(0)
        return f"{dashed} {value if ' ' in value else value.strip(chr(39) + chr(34))}"

    # Not inside a path or URL (after / ? & =), nor part of a longer name.
    return re.sub(rf"(?<![\w/?&=-])({names})=('[^']*'|\"[^\"]*\"|[^\s,;:)/]+)", flag, message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        from gpt2lite.errors import ModelNotFoundError, NonFiniteError

        try:
            return args.run(args)
        except BrokenPipeError:
            return 0  # the reader went away (`| head`): not an error
        except (ModelNotFoundError, NonFiniteError, ValueError, TypeError, OSError, RuntimeError,
                ImportError) as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            if args.command == "generate":  # whose flags are GenerationOptions' fields
                message = _as_flags(message)
            print(f"gpt2lite: error: {message}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        # Also during start-up (imports, loading): a quiet exit, no traceback.
        print("gpt2lite: interrupted", file=sys.stderr)
        return 130


def _device(name: str) -> str:
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


def _lines(text: str) -> list[str]:
    """One entry per line, split at newlines only (a U+2028 or form feed inside a line stays in it); CRLF too."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line.removesuffix("\r") for line in lines]


def _read_input(value: str | None, what: str, *, is_file: bool) -> str:
    """The text of an argument, a file or stdin, as written: UTF-8 (a byte-order mark dropped), newlines kept."""
    if value is None or value == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError(f"no {what}: give one as an argument or pipe it on stdin")
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:  # a text stream without bytes underneath (a test's StringIO)
            return sys.stdin.read()
        return _decode(stream.read(), "stdin")
    if is_file:
        with open(value, "rb") as f:
            return _decode(f.read(), repr(value))
    return value


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")  # Excel and Notepad begin UTF-8 with a byte-order mark
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8") from None


def _generation_options(args: argparse.Namespace) -> Any:
    from gpt2lite.generation.options import GenerationOptions

    names = {f.name for f in dataclasses.fields(GenerationOptions)}
    return GenerationOptions(**{k: dict(v) if k == "logit_bias" else v for k, v in vars(args).items() if k in names})


def _generate(args: argparse.Namespace) -> int:
    import json

    options = _generation_options(args)  # bad values fail here, before the model is loaded
    if (args.prompts is None) != (args.out is None):
        raise ValueError("--prompts and --out go together: a file of prompts, and where the completions go")
    if args.prompts is not None:
        if args.prompt is not None:
            raise ValueError("give a prompt or --prompts FILE, not both")
        jobs = _prompt_file(args.prompts, args.jsonl)  # read and checked before the model loads
        return _generate_to_file(args, options, jobs)
    prompt = _read_input(args.prompt, "prompt", is_file=False)
    text_generator = _load_text_generator(args, args.model)
    draft = _load_text_generator(args, args.draft_model, draft=True).model if args.draft_model else None
    call = dict(stop=args.stop_strings, bad_words=args.bad_words, draft_model=draft)
    if args.json:
        for completion in text_generator.complete(prompt, options, **call):
            sys.stdout.write(json.dumps(completion.to_dict(), ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return 0
    if options.num_return_sequences > 1 or options.num_beams > 1 or draft is not None \
            or options.prompt_lookup_num_tokens:
        texts = text_generator(prompt, options, **call)
        texts = texts if isinstance(texts, list) else [texts]
        for i, text in enumerate(texts):
            header = f"=== {i + 1} ===\n" if len(texts) > 1 else ""
            sys.stdout.write(f"{'' if i == 0 else chr(10)}{header}{text}\n")
        sys.stdout.flush()
        return 0
    for piece in text_generator.stream(prompt, options, stop=args.stop_strings, bad_words=args.bad_words):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


_DELIMITER = "=" * 20  # between completions in a text --out file, as gpt-2-simple writes them


def _prompt_file(path: str, jsonl: bool) -> list[tuple[str, dict[str, Any]]]:
    """(prompt, options) per row of a prompt file; every row is checked before anything is generated."""
    from gpt2lite.generation.options import GenerationOptions
    from gpt2lite.io.records import jsonl_records

    lines = _lines(_read_input(path, "prompts", is_file=True))
    if not jsonl:
        rows = [(line, {}) for line in lines]  # multi-line prompts: --jsonl
    else:
        fields = {f.name for f in dataclasses.fields(GenerationOptions)} | {"stop", "bad_words"}
        rows = []
        for where, row in jsonl_records(lines, path):
            if not isinstance(row.get("prompt"), str):
                raise ValueError(f"{where}: each row is an object with a 'prompt' string")
            unknown = sorted(set(row) - fields - {"prompt"})
            if unknown:
                raise ValueError(f"{where}: unknown option(s) {unknown}")
            rows.append((row.pop("prompt"), row))
    if not rows:
        raise ValueError(f"{path!r} holds no prompts")
    return rows


def _generate_to_file(args: argparse.Namespace, options: Any, jobs: list[tuple[str, dict[str, Any]]]) -> int:
    """Complete every prompt of a file, batched (rows with the same options together), to ``--out`` as it goes."""
    import json

    from tqdm.auto import tqdm

    from gpt2lite.generation.options import GenerationOptions

    text_generator = _load_text_generator(args, args.model)
    groups: dict[str, list[int]] = {}
    for i, (_, extra) in enumerate(jobs):
        groups.setdefault(json.dumps(extra, sort_keys=True), []).append(i)
    results: dict[int, list[str]] = {}
    written = 0
    with open(args.out, "w", encoding="utf-8") as out, tqdm(total=len(jobs), desc="generate", unit="prompt") as bar:
        for key, members in groups.items():
            extra = json.loads(key)
            stop, bad_words = extra.pop("stop", args.stop_strings), extra.pop("bad_words", args.bad_words)
            try:
                row_options = GenerationOptions.build(options, extra, "a --prompts row")
            except (TypeError, ValueError) as exc:
                raise ValueError(f"prompt {members[0] + 1} of {args.prompts!r}: {exc}") from None
            for start in range(0, len(members), args.batch_size):
                batch = members[start : start + args.batch_size]
                texts = text_generator([jobs[i][0] for i in batch], row_options, stop=stop, bad_words=bad_words)
                for i, t in zip(batch, texts, strict=True):
                    results[i] = t if isinstance(t, list) else [t]
                while written in results:  # in the file's order, each as soon as those before it are done
                    _write_completions(out, jobs[written][0], results.pop(written), args.jsonl)
                    written += 1
                out.flush()
                bar.update(len(batch))
    return 0


def _write_completions(out: Any, prompt: str, texts: list[str], jsonl: bool) -> None:
    import json

    if jsonl:
        out.write(json.dumps({"prompt": prompt, "completions": texts}, ensure_ascii=False) + "\n")
    else:
        out.write("".join(f"{text}\n{_DELIMITER}\n" for text in texts))


def _finetune(args: argparse.Namespace) -> int:
    import importlib.util
    import os

    import torch

    from gpt2lite.training.trainer import TrainConfig, check_output_dir, check_run_folder, train

    check_run_folder(args.out, resume=args.resume, overwrite=args.overwrite)  # before anything is read or written
    _run_settings(args)
    recurrent = args.arch != "gpt2"
    if recurrent and (args.model or args.preset):
        raise ValueError(f"--arch {args.arch} trains from scratch: --model and --preset are for GPT-2")
    if recurrent and (args.task != "lm" or args.lora_rank is not None):
        raise ValueError(f"--arch {args.arch} trains language models from scratch: --task classify|sft and LoRA "
                         "are for GPT-2")
    scratch = args.preset is not None or recurrent
    if args.char and (not scratch or args.task != "lm"):
        raise ValueError("--char builds a new vocabulary: train a language model from scratch with --preset or "
                         "--arch rnn|lstm|gru")
    if args.tokenizer is not None and (not scratch or args.char):
        raise ValueError("--tokenizer gives a model trained from scratch (--preset or --arch) its vocabulary; a "
                         "fine-tuned --model keeps its own")
    if args.lora_rank is not None and scratch:
        raise ValueError("--lora-rank adapts a trained model: give --model, not --preset")
    if args.sample_every and args.task == "classify":
        raise ValueError("--sample-every shows generated text: it is for language models, not --task classify")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if not scratch:
        args.model = args.model or "gpt2"
    if args.lr is None:
        args.lr = 6e-4 if scratch else (1e-3 if args.lora_rank else 1e-4)
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    if args.val_fraction is None:
        args.val_fraction = 0.05 if args.task == "lm" else 0.1
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, block_size=args.block_size,
        lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, eval_interval=args.eval_interval, save_interval=args.save_interval, seed=args.seed,
        autocast=args.autocast, compile=args.compile, freeze_blocks=args.freeze_blocks,
        gradient_checkpointing=args.gradient_checkpointing, early_stopping=args.early_stopping,
        sample_every=args.sample_every, sample_prompt=args.sample_prompt, sample_tokens=args.sample_tokens,
        tensorboard=args.tensorboard,
    )  # bad values fail here, before any data is read
    lora = _lora_config(args)
    if not os.path.exists(args.data):
        raise FileNotFoundError(f"no such file or folder: {args.data!r}")
    check_output_dir(args.out, resume=args.resume, overwrite=args.overwrite)
    device = _device(args.device)
    # Under torchrun each process learns its rank from the environment: join the group.
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    try:
        rank = torch.distributed.get_rank() if distributed else 0
        model, data, tokenizer = _training_setup(args, device, lora, save_tokenizer=rank == 0)
        settings = {name: getattr(args, name) for name in (*_RUN_FLAGS, *_RUN_CHANGEABLE)}
        result = train(model, data, args.out, config, resume=args.resume, overwrite=args.overwrite,
                       tokenizer=tokenizer, settings=settings)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if rank == 0:
        _report(result, lora is not None, args)
    return 0


def _run_settings(args: argparse.Namespace) -> None:
    """Fill the run's settings: from OUT/run.json with --resume (flags given again must agree), else the flags."""
    import os

    from gpt2lite.io.files import read_json
    from gpt2lite.training.trainer import CHECKPOINT, RUN_RECORD

    given = {name: getattr(args, name) for name in (*_RUN_FLAGS, *_RUN_CHANGEABLE) if getattr(args, name) is not None}
    for name in (*_PATH_FLAGS, "model"):
        if name in given and (name != "model" or os.path.exists(given[name])):
            given[name] = os.path.abspath(given[name])
    values = {**_RUN_FLAGS, **_RUN_CHANGEABLE}
    record = os.path.join(args.out, RUN_RECORD)
    if args.resume and os.path.isfile(record):
        recorded = read_json(record)
        if not isinstance(recorded, dict):
            raise ValueError(f"{record!r} holds no settings object: it was not written by gpt2lite finetune")
        values.update({name: value for name, value in recorded.items() if name in values})
        differ = [f"--{name.replace('_', '-')} {value!r} (the run has {values[name]!r})"
                  for name, value in given.items() if name in _RUN_FLAGS and values[name] != value]
        if differ:
            raise ValueError(f"--resume continues the run with the settings in {record!r}; these flags disagree: "
                             f"{'; '.join(differ)}. Drop them, or start a new run (--overwrite, or another --out)")
    elif args.resume and not os.path.isfile(os.path.join(args.out, CHECKPOINT)):
        raise FileNotFoundError(f"nothing to resume: {args.out!r} holds no run (no {RUN_RECORD}, no {CHECKPOINT})")
    # Otherwise a new run, or one started before runs recorded their settings: the flags say it all.
    values.update(given)
    if values["data"] is None:
        raise ValueError("--data is required: the text (or labeled or instruction file) to train on")
    for name, value in values.items():
        setattr(args, name, value)


def _report(result: Any, lora: bool, args: argparse.Namespace) -> None:
    """What a finished run prints: the last evaluation, where the weights went, what was skipped."""
    if result.val_losses:
        step, val = result.val_losses[-1]
        line = f"step {step}: train loss {result.losses[-1]:.4f}, validation loss {val:.4f}"
        if result.val_metrics:
            metrics = result.val_metrics[-1][1]
            line += f", accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}"
        print(line)
    if result.stopped_early:
        print(f"stopped early: no lower validation loss in {args.early_stopping} evaluations")
    if result.best_dir is not None:
        best = dict(result.val_losses).get(result.best_step)
        print(f"lowest validation loss{f' {best:.4f}' if best is not None else ''} at step {result.best_step}: "
              f"saved to {result.best_dir}")
    if result.final_dir is not None:
        print(f"saved {'LoRA adapter (PEFT format)' if lora else 'model'} to {result.final_dir}")
    if result.plot is None:
        print("note: loss.png not drawn: pip install matplotlib (metrics.jsonl has the numbers)", file=sys.stderr)


def _lora_config(args: argparse.Namespace) -> Any:
    """The ``LoraConfig`` the LoRA flags ask for, or None without ``--lora-rank``."""
    if args.lora_rank is None:
        return None
    from gpt2lite.transforms.lora import LoraConfig

    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    return LoraConfig(r=args.lora_rank, lora_alpha=alpha, lora_dropout=args.lora_dropout, target_modules=targets)


def _training_setup(args: argparse.Namespace, device: str, lora: Any, *,
                    save_tokenizer: bool) -> tuple[Any, Any, Any]:
    """The model to train, its data, and the tokenizer both were made with (saved in OUT/tokenizer).

    A resumed run rebuilds its model from the checkpoint's config (the weights
    come with the checkpoint) and reads its tokenizer back: no hub, no --model.
    """
    import os

    import torch

    from gpt2lite.loading import load_model, load_tokenizer
    from gpt2lite.models.config import GPT2Config
    from gpt2lite.models.gpt2 import GPT2
    from gpt2lite.tokenizers.bpe import Tokenizer
    from gpt2lite.training.checkpoint import load_training_checkpoint
    from gpt2lite.training.trainer import CHECKPOINT, RUN_RECORD

    torch.manual_seed(args.seed)  # a new model's (or head's) initialisation
    hub = dict(local_files_only=args.offline)
    tokenizer_dir = os.path.join(args.out, "tokenizer")
    model: Any = None
    if args.resume and os.path.isfile(os.path.join(args.out, RUN_RECORD)):
        model_config = load_training_checkpoint(os.path.join(args.out, CHECKPOINT))["model_config"]
        model = _model_from_config(args, model_config).to(device)
        tokenizer: Any = load_tokenizer(tokenizer_dir, model.config.vocab_size)
    elif args.char:
        from gpt2lite.tokenizers.char import CharTokenizer
        from gpt2lite.training.data import iter_text

        tokenizer = CharTokenizer.from_texts(iter_text(args.data, args.encoding_errors, args.text_column))
    elif args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer, 0)
    elif args.model is None or args.task == "classify":
        # A classifier's tokenizer: the model's own files, else GPT-2's (the size only picks that fallback).
        tokenizer = Tokenizer.gpt2() if args.model is None else load_tokenizer(args.model, 50257, **hub)
    if model is None and args.task != "classify":
        # A vocabulary of its own (characters, --tokenizer) sets the new model's size and end token.
        vocab = dict(vocab_size=tokenizer.n_vocab, eos_token_id=tokenizer.eot_token) \
            if args.char or args.tokenizer else {}
        if args.arch != "gpt2":
            from gpt2lite.models.recurrent import RecurrentConfig, RecurrentLM

            model = RecurrentLM(RecurrentConfig(cell=args.arch, n_embd=args.n_embd, n_layer=args.n_layer,
                                                dropout=args.dropout, **vocab)).to(device)
        elif args.preset is not None:
            extra = dict(vocab, bos_token_id=vocab["eos_token_id"]) if vocab else {}
            model = GPT2(GPT2Config.from_preset(args.preset, **extra)).to(device)
        else:
            model = load_model(args.model, device=device, prepack=False, **hub)  # training: no decode kernels
            tokenizer = load_tokenizer(args.model, model.config.vocab_size, **hub)
    if model is not None:
        _check_block_size(args, model)  # before the data is tokenized
    data = _training_data(args, tokenizer)
    if model is None:  # a new classifier: its head has a row per label of the data
        from gpt2lite.models.classifier import GPT2ForSequenceClassification

        if args.preset:
            # transformers' classifier finds each row's last token by the pad id: the tokenizer's end token.
            config = GPT2Config.from_preset(args.preset, labels=data.labels, pad_token_id=tokenizer.eot_token)
            model = GPT2ForSequenceClassification(config).to(device)
        else:
            model = load_model(args.model, kind="classifier", labels=data.labels, device=device, **hub)
        _check_block_size(args, model)
    if tokenizer.n_vocab > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.n_vocab} tokens, the model's vocabulary "
                         f"{model.config.vocab_size}")
    if lora is not None:
        from gpt2lite.transforms.lora import add_lora

        add_lora(model, lora)
    if save_tokenizer and not args.resume:
        tokenizer.save(tokenizer_dir)
    return model, data, tokenizer


def _model_from_config(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    """A model of the kind and shape a checkpoint's ``model_config`` describes (its weights come after)."""
    from gpt2lite.models.config import GPT2Config

    if args.arch != "gpt2":
        from gpt2lite.models.recurrent import RecurrentConfig, RecurrentLM

        return RecurrentLM(RecurrentConfig.from_dict(config))
    if args.task == "classify":
        from gpt2lite.models.classifier import GPT2ForSequenceClassification

        return GPT2ForSequenceClassification(GPT2Config.from_dict(config))
    from gpt2lite.models.gpt2 import GPT2

    return GPT2(GPT2Config.from_dict(config))


def _training_data(args: argparse.Namespace, tokenizer: Any) -> Any:
    """The data ``--task`` trains on, tokenized with ``tokenizer``."""
    import os

    if args.task == "classify":
        from gpt2lite.training.labeled import load_labeled

        labels = [n.strip() for n in args.labels.split(",")] if args.labels else None
        return load_labeled(args.data, tokenizer=tokenizer, labels=labels, text_column=args.text_column,
                            label_column=args.label_column, val_path=args.val_data, val_fraction=args.val_fraction,
                            seed=args.seed)
    if args.task == "sft":
        from gpt2lite.loading import load_chat_template
        from gpt2lite.text.chat import ChatTemplate
        from gpt2lite.training.instructions import load_instructions

        templates: list[Any] = []

        def chat_prompt(messages: list[dict[str, Any]]) -> str:
            if not templates:  # read the model's template only for data with chats
                source = load_chat_template(args.model, local_files_only=args.offline) if args.model else None
                templates.append(ChatTemplate.for_tokenizer(source, tokenizer))
            return templates[0].render(messages)

        return load_instructions(args.data, tokenizer, chat_prompt=chat_prompt, val_fraction=args.val_fraction,
                                 seed=args.seed)
    from gpt2lite.training.data import prepare_data

    return prepare_data(args.data, os.path.join(args.out, "data"), tokenizer=tokenizer, errors=args.encoding_errors,
                        val_fraction=args.val_fraction, text_column=args.text_column)


def _check_block_size(args: argparse.Namespace, model: Any) -> None:
    context = model.config.n_positions
    if args.block_size is not None and context is not None and args.block_size > context:
        raise ValueError(f"--block-size {args.block_size} exceeds the model's context ({context} positions)")


def _classify(args: argparse.Namespace) -> int:
    import json

    from gpt2lite.text.classifier import TextClassifier

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.text is None or args.text == "-":
        texts = [line for line in _lines(_read_input(None, "text", is_file=False)) if line.strip()]
    else:
        texts = [args.text]
    if not texts:
        raise ValueError("no text to classify (give TEXT, or lines on stdin)")
    classifier = TextClassifier.from_pretrained(args.model, device=_device(args.device), dtype=args.dtype,
                                                local_files_only=args.offline)
    for result in classifier.classify(texts, batch_size=args.batch_size):
        if args.json:
            print(json.dumps({"label": result.label, "score": result.score,
                              "probabilities": result.probabilities}, ensure_ascii=False))
        else:
            print(f"{result.label}\t{result.score:.4f}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading
    from pathlib import Path

    try:
        import uvicorn

        from gpt2lite.serve.app import ServerOptions, create_app
    except ImportError as exc:
        raise ValueError(
            f"serving needs the serve extra ({exc.name} is missing): pip install 'gpt2lite[serve]'"
        ) from None
    name = args.served_model_name or _served_name(args.model)
    options = ServerOptions(model_name=name, max_batch=args.max_batch, max_queue=args.max_queue,
                            api_key=args.api_key, max_body_size=args.max_body_size, docs=args.docs,
                            prefix_cache=not args.no_prefix_cache, playground=not args.no_playground)
    template = Path(args.chat_template).read_text(encoding="utf-8") if args.chat_template else None
    listener = _listen(args.host, args.port)  # before the model loads: a port in use fails at once
    text_generator = _load_text_generator(args, args.model)
    if template is not None:
        text_generator.chat_template = template
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    app = create_app(text_generator, options, background=False)
    scheduler = app.state.scheduler
    if options.playground:
        host = f"[{args.host}]" if ":" in args.host else args.host
        logging.getLogger("gpt2lite.serve").info("playground: http://%s:%d/", host, listener.getsockname()[1])
    # The scheduler's loop owns the main thread (torch runs fastest there); HTTP is served beside it.
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="gpt2lite-http", daemon=True)

    def shut_down(signum: int, frame: object) -> None:
        if scheduler.accepting:  # the first signal: finish what runs, then exit
            logging.getLogger("gpt2lite.serve").info(
                "shutting down: %d requests running, %d waiting; they may finish for %.0f s",
                scheduler.running, scheduler.queue_depth, args.shutdown_timeout)
            scheduler.drain()
            deadline = threading.Timer(args.shutdown_timeout, scheduler.stop)
            deadline.daemon = True
            deadline.start()
        else:  # a second signal: now
            scheduler.stop()

    previous = {s: signal.signal(s, shut_down) for s in (signal.SIGTERM, signal.SIGINT)}
    http.start()
    try:
        scheduler.run()  # until a drain finished, or stop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        scheduler.stop()
        server.should_exit = True
        http.join(timeout=10)
        listener.close()
    return 0


def _served_name(model: str) -> str:
    """The model id the server shows: a local model's folder name, or the hub id."""
    from pathlib import Path

    path = Path(model).expanduser()
    if path.is_file():
        path = path.parent
    return path.resolve().name if path.exists() else model


def _listen(host: str, port: int) -> Any:
    """A socket bound to ``host:port``; an address in use or unknown is one clear error."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return listener


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from gpt2lite.text.metrics import evaluate_texts

    def lines(path: str) -> list[str]:
        return _lines(_read_input(path, "text", is_file=True))

    scores = evaluate_texts(lines(args.predictions), [lines(r) for r in args.references]).to_dict()
    if args.json:
        print(json.dumps(scores))
    else:
        for name, value in scores.items():
            print(f"{name:>10}: {value:.4f}")
    return 0


def _perplexity(args: argparse.Namespace) -> int:
    text = _read_input(args.text, "text", is_file=True)
    scorer = _load_text_generator(args, args.model)
    progress = sys.stderr is not None and sys.stderr.isatty()
    print(f"{scorer.perplexity(text, max_length=args.max_length, stride=args.stride, progress=progress):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
