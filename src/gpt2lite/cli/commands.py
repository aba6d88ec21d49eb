"""The smaller commands: ``classify``, ``prepare``, ``train-tokenizer``, ``push``, ``evaluate`` and ``perplexity``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gpt2lite.cli.common import add_model_options, check_device, load_text_generator, read_input, split_lines

__all__ = ["add_classify", "add_evaluate", "add_perplexity", "add_prepare", "add_push", "add_train_tokenizer"]


def add_classify(commands: Any) -> None:
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


def add_prepare(commands: Any) -> None:
    """The ``prepare`` command's flags."""
    pr = commands.add_parser("prepare", help="tokenize a corpus once, in parallel, into token shards to train on")
    pr.add_argument("data", help="a text file, a folder of text files, a glob (quoted: 'dir/*.txt'), or a "
                                 ".csv/.jsonl corpus of one document per row")
    pr.add_argument("--out", required=True, help="folder for the shards and index.json (train on it: --data OUT)")
    pr.add_argument("--tokenizer", default=None,
                    help="a tokenizer folder (gpt2lite train-tokenizer's --out, a model's) or hub id "
                         "(default: GPT-2's, bundled)")
    pr.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: the CPU count)")
    pr.add_argument("--fast", action="store_true",
                    help="encode GPT-2's vocabulary with tiktoken (pip install tiktoken): the same tokens, faster")
    pr.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (default: 16777216)")
    pr.add_argument("--val-fraction", type=float, default=0.05, help="share held out for validation (default: 0.05)")
    pr.add_argument("--text-column", default="text", help="column (CSV) or key (JSONL) of the text (default: text)")
    pr.add_argument("--encoding-errors", choices=["strict", "replace"], default="strict",
                    help="what to do with text that is not UTF-8 (default: strict, an error)")
    pr.add_argument("--offline", action="store_true", help="use only files already in the hub cache")
    pr.set_defaults(run=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    import os
    import time

    from gpt2lite.loading import load_tokenizer
    from gpt2lite.tokenizers.bpe import Tokenizer
    from gpt2lite.training.data import prepare_data
    from gpt2lite.training.shards import SHARD_TOKENS

    workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
    tokenizer = Tokenizer.gpt2() if args.tokenizer is None else load_tokenizer(args.tokenizer, 0,
                                                                               local_files_only=args.offline)
    if args.fast:
        from gpt2lite.tokenizers.fast import TiktokenTokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise ValueError("--fast serves byte-level BPE vocabularies laid out as GPT-2's; this tokenizer is "
                             "another kind")
        tokenizer = TiktokenTokenizer.gpt2() if args.tokenizer is None else TiktokenTokenizer.from_pretrained(
            args.tokenizer, local_files_only=args.offline)
    bar = None
    if sys.stderr is not None and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(desc="prepare", unit="tok", unit_scale=True)

    def progress(tokens: int) -> None:
        if bar is not None:
            bar.update(tokens - bar.n)

    t0 = time.perf_counter()
    try:
        data = prepare_data(args.data, args.out, tokenizer=tokenizer, val_fraction=args.val_fraction,
                            errors=args.encoding_errors, text_column=args.text_column, workers=workers,
                            shard_tokens=args.shard_tokens or SHARD_TOKENS, on_tokens=progress)
    finally:
        if bar is not None:
            bar.close()
    shards = len(getattr(data.tokens, "parts", [data.tokens]))
    print(f"{len(data.tokens):,} tokens ({len(data.train):,} training, {len(data.val):,} held out) in {shards} "
          f"shards in {args.out}, {time.perf_counter() - t0:.1f} s (train on them: gpt2lite finetune --data "
          f"{args.out} ...)")
    return 0


def add_train_tokenizer(commands: Any) -> None:
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


def add_push(commands: Any) -> None:
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


def add_evaluate(commands: Any) -> None:
    """The ``evaluate`` command's flags."""
    ev = commands.add_parser("evaluate", help="BLEU, chrF, ROUGE, distinct-n and self-BLEU of generated text")
    ev.add_argument("--predictions", required=True, help="a text file, one prediction per line")
    ev.add_argument("--references", required=True, nargs="+",
                    help="text files, one reference per line each (several files: several references)")
    ev.add_argument("--tokenize", default=None,
                    help="sacrebleu's tokenizer for words: 13a, zh, char, intl, none, ... (default: zh for Chinese "
                         "text, char for Japanese, else 13a)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(run=_evaluate)


def add_perplexity(commands: Any) -> None:
    """The ``perplexity`` command's flags."""
    ppl = commands.add_parser("perplexity", help="perplexity of a model on a text file")
    ppl.add_argument("text", nargs="?", help="text file; stdin when omitted or '-'")
    ppl.add_argument("--model", default="gpt2", help="hub id or local path (default: gpt2)")
    ppl.add_argument("--max-length", type=int, default=None, help="window length (default: the context)")
    ppl.add_argument("--stride", type=int, default=None, help="window step (default: half a window)")
    add_model_options(ppl)
    ppl.set_defaults(run=_perplexity)


# Options the CLI takes in another form: stop strings (--stop) and bad words (--bad-word) as text;
# Python hooks have no command-line form.


def _classify(args: argparse.Namespace) -> int:
    import json

    from gpt2lite.text.classifier import TextClassifier

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.text is None or args.text == "-":
        texts = [line for line in split_lines(read_input(None, "text", is_file=False)) if line.strip()]
    else:
        texts = [args.text]
    if not texts:
        raise ValueError("no text to classify (give TEXT, or lines on stdin)")
    classifier = TextClassifier.from_pretrained(args.model, device=check_device(args.device), dtype=args.dtype,
                                                local_files_only=args.offline)
    for result in classifier.classify(texts, batch_size=args.batch_size):
        if args.json:
            print(json.dumps({"label": result.label, "score": result.score,
                              "probabilities": result.probabilities}, ensure_ascii=False))
        else:
            print(f"{result.label}\t{result.score:.4f}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from gpt2lite.text.metrics import evaluate_texts

    def lines(path: str) -> list[str]:
        return split_lines(read_input(path, "text", is_file=True))

    scores = evaluate_texts(lines(args.predictions), [lines(r) for r in args.references],
                            tokenize=args.tokenize).to_dict()
    if args.json:
        print(json.dumps(scores))
    else:
        for name, value in scores.items():
            print(f"{name:>10}: {value:.4f}" if isinstance(value, float) else f"{name:>10}: {value}")
    return 0


def _perplexity(args: argparse.Namespace) -> int:
    text = read_input(args.text, "text", is_file=True)
    scorer = load_text_generator(args, args.model)
    progress = sys.stderr is not None and sys.stderr.isatty()
    print(f"{scorer.perplexity(text, max_length=args.max_length, stride=args.stride, progress=progress):.4f}")
    return 0
