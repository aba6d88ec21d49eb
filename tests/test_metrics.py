"""Text metrics against sacrebleu and rouge-score on the same inputs, and diversity against hand computation."""

from __future__ import annotations

import json

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from gpt2lite import evaluate_texts
from gpt2lite.cli import main
from gpt2lite.text.metrics import distinct_n, self_bleu

PREDICTIONS = [
    "The cat sat on the mat and looked out of the window.",
    "A quick brown fox jumped over the lazy dogs yesterday.",
    "Rain is expected in the north, with sunny spells in the south.",
]
REFERENCES = [
    "The cat was sitting on the mat, looking out of the window.",
    "The quick brown fox jumps over the lazy dog.",
    "Rain is forecast for the north, and sunshine for the south.",
]
SECOND = [
    "A cat sat on a mat by the window.",
    "A fast brown fox leapt over a lazy dog.",
    "The north will see rain; the south will be sunny.",
]


def test_overlap_scores_equal_the_libraries():
    got = evaluate_texts(PREDICTIONS, REFERENCES)
    assert got.bleu == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    assert got.chrf == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(PREDICTIONS, REFERENCES, strict=True)) / 3
        assert getattr(got, key) == pytest.approx(expected)
    assert 0 < got.bleu < 100 and 0 < got.rouge1 < 1


def test_several_references():
    got = evaluate_texts(PREDICTIONS, [REFERENCES, SECOND])
    assert got.bleu == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES, SECOND]).score)
    assert got.chrf == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES, SECOND]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    best = [max(scorer.score(r, p)["rougeL"].fmeasure for r in refs)
            for p, refs in zip(PREDICTIONS, zip(REFERENCES, SECOND, strict=True), strict=True)]
    assert got.rougeL == pytest.approx(sum(best) / 3)


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran of six words
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # "the cat" twice, "cat sat", "cat ran"
    assert distinct_n(["a", "b"], 2) == 0.0  # no bigram at all
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(texts, 0)


def test_self_bleu_by_hand():
    assert self_bleu(["the same four words", "the same four words"]) == pytest.approx(100.0)
    assert self_bleu(["alpha beta gamma delta", "one two three four"]) == pytest.approx(0.0)
    # Each against the other two, with sacrebleu's sentence BLEU, averaged.
    texts = PREDICTIONS
    expected = sum(sacrebleu.sentence_bleu(t, [u for u in texts if u is not t]).score for t in texts) / 3
    assert self_bleu(texts) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least two"):
        self_bleu(["alone"])


def test_errors():
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        evaluate_texts(PREDICTIONS, REFERENCES[:2])
    with pytest.raises(TypeError, match="predictions must be a list of str"):
        evaluate_texts("one string", REFERENCES)


def test_cli_evaluate_json(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n".join(PREDICTIONS) + "\n", encoding="utf-8")
    (tmp_path / "r.txt").write_text("\n".join(REFERENCES) + "\n", encoding="utf-8")
    assert main(["evaluate", "--predictions", str(tmp_path / "p.txt"), "--references", str(tmp_path / "r.txt"),
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert list(record) == ["bleu", "chrf", "rouge1", "rouge2", "rougeL", "distinct_1", "distinct_2", "self_bleu"]
    assert record == pytest.approx(evaluate_texts(PREDICTIONS, REFERENCES).to_dict())
    (tmp_path / "short.txt").write_text(REFERENCES[0] + "\n", encoding="utf-8")
    assert main(["evaluate", "--predictions", str(tmp_path / "p.txt"), "--references",
                 str(tmp_path / "short.txt")]) == 1
    err = capsys.readouterr().err
    assert "3 predictions but 1 references" in err and err.count("\n") == 1
