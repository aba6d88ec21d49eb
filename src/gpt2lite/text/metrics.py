"""Judging generated text: BLEU and chrF (sacrebleu), ROUGE-1/2/L (rouge-score), distinct-n and self-BLEU.

Overlap with references comes from the standard implementations, so figures are
comparable with published ones; they are in the ``eval`` extra
(``pip install "gpt2lite[eval]"``). Diversity needs no reference:

- ``distinct_n``: distinct n-grams over all n-grams of all predictions (Li et al., 2016);
- ``self_bleu``: the mean BLEU of each prediction against all the others (Zhu et al., 2018,
  Texygen): high when the predictions resemble each other. Computed exactly as
  sacrebleu's ``sentence_bleu`` of each text against the rest, but in one pass over
  the corpus: each n-gram's two largest counts give its count clipped against the
  others, so 10,000 texts take seconds, not hours.

Scales are the libraries' own: BLEU, chrF and self-BLEU in 0..100, ROUGE F1 and
distinct-n in 0..1.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["MAX_ROUGE_L_CELLS", "TextMetrics", "distinct_n", "evaluate_texts", "self_bleu"]

# ROUGE-L's longest common subsequence fills a table of (prediction words x reference words)
# Python objects: past this many cells (about 64 MB) a pair is refused rather than let run out of memory.
MAX_ROUGE_L_CELLS = 8_000_000
_ROUGE_WORD = re.compile(r"[a-z0-9]+")  # rouge-score's tokenizer keeps these runs (after lowercasing)


@dataclass(frozen=True)
class TextMetrics:
    """Corpus-level scores of predictions against references, and their diversity."""

    bleu: float
    chrf: float
    rouge1: float
    rouge2: float
    rougeL: float
    distinct_1: float
    distinct_2: float
    self_bleu: float

    def to_dict(self) -> dict[str, float]:
        """The scores by name."""
        return asdict(self)


def _import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(f"text metrics need {name}: pip install 'gpt2lite[eval]'") from None


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"{what} must be a list of str")
    return list(texts)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over whitespace tokens of all ``texts``; 0 when there is no n-gram.

    >>> distinct_n(["the cat sat", "the cat ran"], 1)
    0.6666666666666666
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(words[i : i + n]) for t in _check_texts(texts, "texts") for words in [t.split()]
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts: Sequence[str]) -> float:
    """Mean sentence BLEU (sacrebleu's) of each text against all the others as references; needs two texts.

    Equal to ``mean(sentence_bleu(t, others))``, in time linear in the corpus.
    """
    sacrebleu = _import("sacrebleu")
    from sacrebleu.metrics.helpers import extract_all_word_ngrams

    texts = _check_texts(texts, "texts")
    if len(texts) < 2:
        raise ValueError("self-BLEU compares texts with each other: give at least two")
    metric = sacrebleu.BLEU(effective_order=True)
    order = metric.max_ngram_order
    grams, lengths = [], []
    for t in texts:
        counts, length = extract_all_word_ngrams(metric.tokenizer(t.rstrip()), 1, order)
        grams.append(counts)
        lengths.append(length)
    # For each n-gram: its largest count, which text holds it, and the largest among the other texts.
    top: dict[tuple[str, ...], list[int]] = {}
    for i, counts in enumerate(grams):
        for gram, c in counts.items():
            best = top.setdefault(gram, [0, -1, 0])
            if c > best[0]:
                best[2], best[0], best[1] = best[0], c, i
            elif c > best[2]:
                best[2] = c
    ordered = sorted(lengths)
    scores = []
    for i, counts in enumerate(grams):
        correct, total = [0] * order, [0] * order
        for gram, c in counts.items():
            best = top[gram]
            total[len(gram) - 1] += c
            correct[len(gram) - 1] += min(c, best[2] if best[1] == i else best[0])
        stats = metric.compute_bleu(correct, total, lengths[i], _closest_other(ordered, lengths[i]),
                                    smooth_method=metric.smooth_method, effective_order=True)
        scores.append(stats.score)
    return sum(scores) / len(scores)


def _closest_other(ordered: list[int], length: int) -> int:
    """The length closest to ``length`` among ``ordered`` less one occurrence of it (ties: the shorter), as BLEU's."""
    at = bisect.bisect_left(ordered, length)
    if at + 1 < len(ordered) and ordered[at + 1] == length:
        return length  # another text of the same length
    below = ordered[at - 1] if at > 0 else None
    above = ordered[at + 1] if at + 1 < len(ordered) else None
    if below is None or (above is not None and above - length < length - below):
        return above  # type: ignore[return-value]
    return below


class _StemmingTokenizer:
    """rouge-score's own tokenizer with its Porter stemmer, each word stemmed once (most of the time, otherwise)."""

    def __init__(self) -> None:
        from nltk.stem import porter
        from rouge_score import tokenize

        self._tokenize = tokenize.tokenize
        self._stemmer = porter.PorterStemmer()
        self._stems: dict[str, str] = {}

    def stem(self, word: str) -> str:
        stem = self._stems.get(word)
        if stem is None:
            if len(self._stems) > 1_000_000:  # bounded: a corpus of many distinct words starts afresh
                self._stems.clear()
            stem = self._stems[word] = self._stemmer.stem(word)
        return stem

    def tokenize(self, text: str) -> list[str]:
        return self._tokenize(text, self)


def evaluate_texts(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> TextMetrics:
    """Score ``predictions`` against ``references`` (one per prediction, or several lists of them).

    BLEU and chrF are sacrebleu's corpus scores; ROUGE is the mean F1 of
    rouge-score with stemming, taking the best reference per prediction.
    """
    sacrebleu = _import("sacrebleu")
    rouge_scorer = _import("rouge_score.rouge_scorer").rouge_scorer
    predictions = _check_texts(predictions, "predictions")
    streams = [references] if references and isinstance(references[0], str) else list(references)
    streams = [_check_texts(s, "references") for s in streams]
    if not predictions:
        raise ValueError("no predictions to score")
    for stream in streams:
        if len(stream) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions but {len(stream)} references: give one per prediction")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_StemmingTokenizer())
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for i, prediction in enumerate(predictions):
        words = len(_ROUGE_WORD.findall(prediction.lower()))
        for s in streams:
            cells = words * len(_ROUGE_WORD.findall(s[i].lower()))
            if cells > MAX_ROUGE_L_CELLS:
                raise ValueError(f"line {i + 1}: ROUGE-L compares word by word, and this prediction and reference "
                                 f"make {cells:,} pairs (more than {MAX_ROUGE_L_CELLS:,}, about 64 MB): split long "
                                 "lines into sentences")
        best = scorer.score_multi([s[i] for s in streams], prediction)
        for key in rouge:
            rouge[key] += best[key].fmeasure / len(predictions)
    return TextMetrics(
        bleu=sacrebleu.corpus_bleu(predictions, streams).score,
        chrf=sacrebleu.corpus_chrf(predictions, streams).score,
        **rouge,
        distinct_1=distinct_n(predictions, 1),
        distinct_2=distinct_n(predictions, 2),
        self_bleu=self_bleu(predictions) if len(predictions) > 1 else 0.0,
    )
