"""Judging generated text: BLEU and chrF (sacrebleu), ROUGE-1/2/L (rouge-score), distinct-n and self-BLEU.

Overlap with references comes from the standard implementations, so figures are
comparable with published ones; they are in the ``eval`` extra
(``pip install "gpt2lite[eval]"``). Diversity needs no reference:

- ``distinct_n``: distinct n-grams over all n-grams of all predictions (Li et al., 2016);
- ``self_bleu``: the mean BLEU of each prediction against all the others (Zhu et al., 2018,
  Texygen): high when the predictions resemble each other.

Scales are the libraries' own: BLEU, chrF and self-BLEU in 0..100, ROUGE F1 and
distinct-n in 0..1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["TextMetrics", "distinct_n", "evaluate_texts", "self_bleu"]


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
    """Mean sentence BLEU (sacrebleu) of each text against all the others as references; needs two texts."""
    sacrebleu = _import("sacrebleu")
    texts = _check_texts(texts, "texts")
    if len(texts) < 2:
        raise ValueError("self-BLEU compares texts with each other: give at least two")
    scores = [sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)]
    return sum(scores) / len(scores)


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
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for i, prediction in enumerate(predictions):
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
