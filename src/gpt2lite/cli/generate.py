"""``gpt2lite generate``: one flag per generation option; a prompt streamed to stdout, or a file of prompts."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Any

from gpt2lite.cli.common import add_model_options, load_text_generator, positive, read_input, split_lines

__all__ = ["add_generate", "as_flags"]


def add_generate(commands: Any) -> None:
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
    files.add_argument("--batch-size", type=positive, default=8, help="prompts generated together (default: 8)")
    _add_generation_options(gen)
    add_model_options(gen)
    gen.set_defaults(run=_generate)


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
        elif f.name in ("json_schema", "grammar"):  # a file, or the text itself
            parser.add_argument(*flags, type=_file_or_text, metavar="FILE_OR_TEXT", **common)
        elif f.name == "choice":
            parser.add_argument(*flags, action="append", metavar="TEXT", **common)
        elif kind == str | None:
            parser.add_argument(*flags, type=str, **common)
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


def _file_or_text(value: str) -> str:
    """A flag's text: the contents of the file it names, else the text as given (a schema inline)."""
    import os

    return read_input(value, "file", is_file=True) if os.path.isfile(value) else value


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


def as_flags(message: str) -> str:
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
    prompt = read_input(args.prompt, "prompt", is_file=False)
    text_generator = load_text_generator(args, args.model)
    draft = load_text_generator(args, args.draft_model, draft=True).model if args.draft_model else None
    call = dict(stop=args.stop_strings, bad_words=args.bad_words, draft_model=draft)
    if options.compile:  # the first token waits for torch.compile: say so, rather than look stuck
        print("compiling the decode step (torch.compile): the first token waits for it, half a minute to several "
              "minutes on a loaded CPU", file=sys.stderr, flush=True)
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

    lines = split_lines(read_input(path, "prompts", is_file=True))
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

    text_generator = load_text_generator(args, args.model)
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
