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

Words are counted as sacrebleu's tokenizer ``tokenize`` splits them (its names:
``13a``, ``zh``, ``char``, ``intl``, ``none``, ...), chosen from the text when not
given (``auto_tokenize``): Chinese text has no spaces between words, and 13a would
score it as a few long "words" (BLEU about 0). BLEU, self-BLEU and distinct-n use
that tokenizer; ROUGE, whose rouge-score tokenizer deletes every character outside
``a-z0-9``, compares each CJK character as a word under ``zh``, and every letter or
digit under ``char`` (rouge-score's words, stemmed, otherwise). The choice is in
the report (``TextMetrics.tokenize``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import regex

__all__ = ["MAX_ROUGE_L_CELLS", "TextMetrics", "auto_tokenize", "distinct_n", "evaluate_texts", "self_bleu"]

# ROUGE-L's longest common subsequence fills a table of (prediction words x reference words)
# Python objects: past this many cells (about 64 MB) a pair is refused rather than let run out of memory.
MAX_ROUGE_L_CELLS = 8_000_000
_HAN = regex.compile(r"\p{Han}")
_KANA = regex.compile(r"[\p{Hiragana}\p{Katakana}]")
_LETTER_OR_DIGIT = regex.compile(r"[\p{L}\p{N}]")


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
    tokenize: str = "13a"  # sacrebleu's name of the tokenizer the words were counted with

    def to_dict(self) -> dict[str, float | str]:
        """The scores by name, and ``tokenize``."""
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


def auto_tokenize(texts: Sequence[str]) -> str:
    """sacrebleu's tokenizer for ``texts``: ``zh`` for Chinese characters, ``char`` for Japanese, else ``13a``.

    Japanese is text whose kana are at least a fifth of its Han characters and kana
    (sacrebleu's ``zh`` splits only the Han ones; ``ja-mecab`` needs MeCab).

    >>> auto_tokenize(["今天天气很好。"]), auto_tokenize(["the cat"]), auto_tokenize(["猫がいます。"])
    ('zh', '13a', 'char')
    """
    han = sum(len(_HAN.findall(t)) for t in texts)
    kana = sum(len(_KANA.findall(t)) for t in texts)
    if kana and kana * 5 >= han + kana:
        return "char"
    return "zh" if han else "13a"


def _tokenizer(tokenize: str | None, texts: Sequence[str]) -> tuple[str, Any]:
    """The chosen name (``tokenize``, or ``auto_tokenize``'s) and sacrebleu's tokenizer of that name."""
    sacrebleu = _import("sacrebleu")
    name = auto_tokenize(texts) if tokenize is None else tokenize
    if name not in sacrebleu.BLEU.TOKENIZERS:
        raise ValueError(f"tokenize must be one of sacrebleu's tokenizers ({', '.join(sacrebleu.BLEU.TOKENIZERS)}), "
                         f"got {name!r}")
    return name, sacrebleu.BLEU(tokenize=name).tokenizer


def distinct_n(texts: Sequence[str], n: int, *, tokenize: str | None = None) -> float:
    """Distinct n-grams / all n-grams of all ``texts``; 0 when there is no n-gram.

    Words are sacrebleu's tokens (``tokenize``, chosen from the texts when None;
    ``"none"`` splits on whitespace only).

    >>> distinct_n(["the cat sat", "the cat ran"], 1)
    0.6666666666666666
    """
    texts = _check_texts(texts, "texts")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _, split = _tokenizer(tokenize, texts)
    grams = [tuple(words[i : i + n]) for t in texts for words in [split(t.rstrip()).split()]
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts: Sequence[str], *, tokenize: str | None = None) -> float:
    """Mean sentence BLEU (sacrebleu's) of each text against all the others as references; needs two texts.

    Equal to ``mean(sentence_bleu(t, others, tokenize=tokenize))``, in time linear in
    the corpus; ``tokenize`` is chosen from the texts when None.
    """
    sacrebleu = _import("sacrebleu")
    from sacrebleu.metrics.helpers import extract_all_word_ngrams

    texts = _check_texts(texts, "texts")
    if len(texts) < 2:
        raise ValueError("self-BLEU compares texts with each other: give at least two")
    tokenize, _ = _tokenizer(tokenize, texts)
    metric = sacrebleu.BLEU(effective_order=True, tokenize=tokenize)
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
    """rouge-score's own tokenizer with its Porter stemmer, each word stemmed once (most of the time, otherwise).

    Under ``zh`` each Han character is a word of its own too; under ``char`` every letter or digit is one.
    """

    def __init__(self, tokenize: str = "13a") -> None:
        from nltk.stem import porter
        from rouge_score import tokenize as rouge_tokenize

        self._tokenize = rouge_tokenize.tokenize
        self._stemmer = porter.PorterStemmer()
        self._stems: dict[str, str] = {}
        self._mode = tokenize

    def stem(self, word: str) -> str:
        stem = self._stems.get(word)
        if stem is None:
            if len(self._stems) > 1_000_000:  # bounded: a corpus of many distinct words starts afresh
                self._stems.clear()
            stem = self._stems[word] = self._stemmer.stem(word)
        return stem

    def tokenize(self, text: str) -> list[str]:
        """The words ROUGE compares."""
        if self._mode == "char":
            return _LETTER_OR_DIGIT.findall(text.lower())
        if self._mode == "zh":  # rouge-score's words between the Han characters, in order
            words: list[str] = []
            at = 0
            for match in _HAN.finditer(text):
                words += self._tokenize(text[at : match.start()], self)
                words.append(match.group())
                at = match.end()
            return words + self._tokenize(text[at:], self)
        return self._tokenize(text, self)


def evaluate_texts(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], *,
                   tokenize: str | None = None) -> TextMetrics:
    """Score ``predictions`` against ``references`` (one per prediction, or several lists of them).

    BLEU and chrF are sacrebleu's corpus scores; ROUGE is the mean F1 of
    rouge-score with stemming, taking the best reference per prediction.
    ``tokenize`` is sacrebleu's tokenizer name, chosen from all the texts when None
    (``auto_tokenize``: ``zh`` for Chinese).
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
    tokenize, _ = _tokenizer(tokenize, [*predictions, *(t for s in streams for t in s)])
    words_of = _StemmingTokenizer(tokenize)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=words_of)
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for i, prediction in enumerate(predictions):
        words = len(words_of.tokenize(prediction))
        for s in streams:
            cells = words * len(words_of.tokenize(s[i]))
            if cells > MAX_ROUGE_L_CELLS:
                raise ValueError(f"line {i + 1}: ROUGE-L compares word by word, and this prediction and reference "
                                 f"make {cells:,} pairs (more than {MAX_ROUGE_L_CELLS:,}, about 64 MB): split long "
                                 "lines into sentences")
        best = scorer.score_multi([s[i] for s in streams], prediction)
        for key in rouge:
            rouge[key] += best[key].fmeasure / len(predictions)
    return TextMetrics(
        bleu=sacrebleu.corpus_bleu(predictions, streams, tokenize=tokenize).score,
        chrf=sacrebleu.corpus_chrf(predictions, streams).score,
        **rouge,
        distinct_1=distinct_n(predictions, 1, tokenize=tokenize),
        distinct_2=distinct_n(predictions, 2, tokenize=tokenize),
        self_bleu=self_bleu(predictions, tokenize=tokenize) if len(predictions) > 1 else 0.0,
        tokenize=tokenize,
    )
