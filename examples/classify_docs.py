"""Train a GPT-2 text classifier on real text, offline, and compare it with the majority-class baseline.

The labeled set is built from the documentation that ships with Python itself:
every docstring paragraph of five standard-library packages (asyncio, email,
logging, unittest, xml), labeled with the package it documents. A paragraph
such as "Return the message's content type, as a string ..." should come out as
``email``. The set is written as a CSV file, read back with ``load_labeled``
(a held-out 20%), and a small GPT-2 classifier is trained from scratch with
``gpt2lite.train``, the same trainer that trains language models. On a 2-core
CPU the default run takes well under a minute (about 90% held-out accuracy,
against 31% for always answering the most common class).

    python examples/classify_docs.py [--steps 300] [--out runs/classify-docs]
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import pkgutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from gpt2lite import GPT2Config, GPT2ForSequenceClassification, TextClassifier, TrainConfig, load_labeled, train

PACKAGES = ("asyncio", "email", "logging", "unittest", "xml")


def docstring_paragraphs(package: str) -> list[str]:
    """The distinct docstring paragraphs (60-600 characters) of a package's modules, classes and functions."""
    root = importlib.import_module(package)
    modules = [root]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), package + "."):
        if "__main__" in info.name or ".test" in info.name:
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except Exception:  # a module that needs what this machine lacks (a GUI, an OS feature)
            continue
    objects: list[object] = []
    for module in modules:
        objects.append(module)
        for _, obj in inspect.getmembers(module):
            defined_here = getattr(obj, "__module__", None) == module.__name__
            if defined_here and (inspect.isclass(obj) or inspect.isfunction(obj)):
                objects.append(obj)
                if inspect.isclass(obj):
                    objects += [f for _, f in inspect.getmembers(obj, inspect.isfunction)
                                if f.__qualname__.startswith(obj.__name__ + ".")]
    seen: dict[str, None] = {}
    for obj in objects:
        for paragraph in (inspect.getdoc(obj) or "").split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if 60 <= len(paragraph) <= 600:
                seen.setdefault(paragraph)
    return list(seen)


def build_dataset(path: Path) -> Counter[str]:
    """Write ``text,label`` rows to ``path``; a paragraph found in two packages is left out."""
    by_package = {package: docstring_paragraphs(package) for package in PACKAGES}
    owners = Counter(p for paragraphs in by_package.values() for p in paragraphs)
    counts: Counter[str] = Counter()
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for package, paragraphs in by_package.items():
            for paragraph in paragraphs:
                if owners[paragraph] == 1:
                    writer.writerow([paragraph, package])
                    counts[package] += 1
    return counts


def main(steps: int = 300, out: str | None = None, progress: bool = True) -> dict[str, float]:
    out_dir = Path(out) if out else Path(tempfile.mkdtemp(prefix="gpt2lite-classify-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = build_dataset(out_dir / "docs.csv")
    data = load_labeled(out_dir / "docs.csv", val_fraction=0.2, seed=0)
    print(f"data: {sum(counts.values())} paragraphs, {dict(counts)}; {len(data.train_ids)} for training, "
          f"{len(data.val_ids)} held out")

    # The baseline: always answer the class most common in the training part.
    majority = Counter(data.train_labels).most_common(1)[0][0]
    baseline = sum(label == majority for label in data.val_labels) / len(data.val_labels)

    torch.manual_seed(0)
    config = GPT2Config.from_preset("tiny", labels=data.labels, pad_token_id=50256,
                                    embd_pdrop=0.1, attn_pdrop=0.0, resid_pdrop=0.1)
    model = GPT2ForSequenceClassification(config)
    t0 = time.perf_counter()
    result = train(model, data, out_dir / "run", TrainConfig(
        steps=steps, batch_size=16, block_size=128, lr=2e-3, min_lr=2e-4, warmup_steps=30,
        eval_interval=max(1, steps // 4), save_interval=steps, progress=progress,
    ))
    minutes = (time.perf_counter() - t0) / 60
    for step, metrics in result.val_metrics:
        print(f"  step {step:4d}: held-out accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    final = result.val_metrics[-1][1]
    print(f"held-out accuracy {final['accuracy']:.3f} (macro-F1 {final['macro_f1']:.3f}) after {steps} steps "
          f"({minutes:.1f} min); majority-class baseline ({data.labels[majority]}) {baseline:.3f}")

    classifier = TextClassifier.from_pretrained(result.final_dir)
    example = "Return the value of the named header field, or None if the header is missing."
    print(f"{example!r} -> {classifier.classify(example).label}")
    return {"accuracy": final["accuracy"], "macro_f1": final["macro_f1"], "baseline": baseline, "minutes": minutes}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    args = parser.parse_args()
    main(args.steps, args.out)
