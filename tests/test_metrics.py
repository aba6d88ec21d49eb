"""Text metrics against sacrebleu and rouge-score on the same inputs, and diversity against hand computation."""

from __future__ import annotations

import json
import re

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from gpt2lite import evaluate_texts
from gpt2lite.cli import main
from gpt2lite.text.metrics import auto_tokenize, distinct_n, self_bleu

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


# Thirty prediction/reference pairs written by hand: the same meaning in other words, as a system and a person
# would write it; none of them comes from this library.
CHINESE_PAIRS = [
    ("今天天气很好，我们去爬山。", "今天天气很好，我们一起去爬山吧。"),
    ("他每天早上七点起床，然后去公园跑步。", "他每天早晨七点起来，接着到公园里跑步。"),
    ("这家饭店的饺子非常好吃。", "这个餐馆的饺子特别好吃。"),
    ("明天下午三点在会议室开会。", "会议定在明天下午三点，地点是会议室。"),
    ("我昨天买了一本关于历史的书。", "昨天我买了一本讲历史的书。"),
    ("请把窗户关上，外面太冷了。", "外面很冷，请关上窗户。"),
    ("北京是中国的首都，也是一座历史悠久的城市。", "北京是中国的首都，有着悠久的历史。"),
    ("这部电影讲的是一个小男孩寻找父亲的故事。", "电影讲述了一个小男孩寻找他父亲的故事。"),
    ("火车晚点了半个小时，我们只好在车站等着。", "火车晚了三十分钟，我们只能在车站等。"),
    ("她的中文说得比我好多了。", "她说中文说得比我好得多。"),
    ("春节期间，很多人回家和家人团聚。", "过春节的时候，许多人回到家里与家人团聚。"),
    ("这个问题太难了，我想了很久也没有答案。", "这道题很难，我想了半天还是不会。"),
    ("图书馆周一到周五早上八点开门。", "图书馆周一至周五上午八点开放。"),
    ("医生建议他多喝水，早点休息。", "医生让他多喝水，早些休息。"),
    ("我们公司今年的销售额增长了百分之二十。", "今年我们公司的销售额提高了百分之二十。"),
    ("孩子们在院子里玩得很开心。", "孩子们在院子里开心地玩着。"),
    ("这条河从西向东流入大海。", "这条河由西往东流进大海。"),
    ("他把手机忘在出租车上了。", "他的手机落在出租车里了。"),
    ("学习一门外语需要很多时间和耐心。", "学好一门外语要花很多时间，也需要耐心。"),
    ("上海的夏天又热又潮湿。", "上海夏天很热，而且很潮湿。"),
    ("我打算明年去日本旅游。", "明年我准备到日本去旅行。"),
    ("这本小说我已经看了三遍了。", "这部小说我读过三次了。"),
    ("超市里的苹果今天打八折。", "今天超市的苹果打八折出售。"),
    ("她每个周末都会给父母打电话。", "每到周末，她都给父母打个电话。"),
    ("因为下大雨，比赛推迟到下周举行。", "由于下了大雨，比赛改到下个星期进行。"),
    ("这台电脑用了2019年的GPU，速度有点慢。", "这台电脑的GPU是2019年的，运行得比较慢。"),
    ("老师让我们写一篇关于环境保护的作文。", "老师要求我们写一篇以保护环境为题的作文。"),
    ("他从小就喜欢画画，现在成了一名画家。", "他小时候就爱画画，如今已经是一位画家了。"),
    ("地铁站离我家只有五分钟的路。", "从我家走到地铁站只要五分钟。"),
    ("晚饭后我们一起在河边散步。", "吃完晚饭，我们一块儿去河边散步。"),
]


class _CharacterWords:
    """ROUGE's words for Chinese, written for this test: each CJK ideograph, and runs of a-z0-9 between them."""

    def tokenize(self, text):
        return re.findall(r"[\u4e00-\u9fff]|[a-z0-9]+", text.lower())


def test_chinese_scores_equal_sacrebleu_zh_and_character_rouge_chosen_automatically():
    predictions, references = [p for p, _ in CHINESE_PAIRS], [r for _, r in CHINESE_PAIRS]
    got = evaluate_texts(predictions, references)
    assert got.tokenize == "zh" and got.to_dict()["tokenize"] == "zh"
    assert got.bleu == sacrebleu.corpus_bleu(predictions, [references], tokenize="zh").score
    assert got.chrf == sacrebleu.corpus_chrf(predictions, [references]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_CharacterWords())
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r, p)[key].fmeasure for p, r in CHINESE_PAIRS) / len(CHINESE_PAIRS)
        assert getattr(got, key) == pytest.approx(expected, abs=1e-12)
    expected = sum(sacrebleu.sentence_bleu(t, predictions[:i] + predictions[i + 1 :], tokenize="zh").score
                   for i, t in enumerate(predictions)) / len(predictions)
    assert got.self_bleu == pytest.approx(expected, abs=1e-9)
    chars = [c for p in predictions for c in sacrebleu.BLEU(tokenize="zh").tokenizer(p).split()]
    assert got.distinct_1 == pytest.approx(len(set(chars)) / len(chars))
    assert 20 < got.bleu < 60 and 0.5 < got.rouge1 < 0.9  # neither the 0 that 13a and ASCII words give
    old = evaluate_texts(predictions, references, tokenize="13a")
    assert old.tokenize == "13a" and old.rouge1 < 0.05  # only "gpu" and "2019" are words to rouge-score
    assert old.bleu == sacrebleu.corpus_bleu(predictions, [references], tokenize="13a").score < 5


def test_the_tokenizer_is_chosen_from_the_text_or_given():
    assert evaluate_texts(PREDICTIONS, REFERENCES).tokenize == "13a"
    assert auto_tokenize(["今天天气很好。", "the cat"]) == "zh"
    assert auto_tokenize(["猫が好きです。"]) == "char"  # Japanese: kana beside the Han characters
    got = evaluate_texts(["猫が好きです。"], ["私は猫が好き。"])
    assert got.tokenize == "char"
    assert got.bleu == sacrebleu.corpus_bleu(["猫が好きです。"], [["私は猫が好き。"]], tokenize="char").score
    texts = ["the cat sat on the mat.", "the cat sat."]
    assert distinct_n(texts, 1, tokenize="none") == pytest.approx(6 / 9)  # "mat." and "sat." are words
    assert distinct_n(texts, 1) == pytest.approx(6 / 11)  # 13a splits off the full stops: one word "."
    with pytest.raises(ValueError, match=r"tokenize must be one of sacrebleu's tokenizers \(.*zh.*\), got 'jieba'"):
        evaluate_texts(PREDICTIONS, REFERENCES, tokenize="jieba")


def test_cli_evaluate_chinese_says_its_tokenizer(tmp_path, capsys):
    predictions, references = [p for p, _ in CHINESE_PAIRS], [r for _, r in CHINESE_PAIRS]
    (tmp_path / "p.txt").write_text("\n".join(predictions) + "\n", encoding="utf-8")
    (tmp_path / "r.txt").write_text("\n".join(references) + "\n", encoding="utf-8")
    files = ["--predictions", str(tmp_path / "p.txt"), "--references", str(tmp_path / "r.txt")]
    assert main(["evaluate", *files]) == 0
    out = capsys.readouterr().out
    assert "tokenize: zh" in out
    assert f"{sacrebleu.corpus_bleu(predictions, [references], tokenize='zh').score:.4f}" in out
    assert main(["evaluate", *files, "--tokenize", "char", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["tokenize"] == "char"
    assert record["bleu"] == sacrebleu.corpus_bleu(predictions, [references], tokenize="char").score
    assert main(["evaluate", *files, "--tokenize", "jieba"]) == 1
    err = capsys.readouterr().err
    assert "got 'jieba'" in err and err.count("\n") == 1


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
    assert list(record) == ["bleu", "chrf", "rouge1", "rouge2", "rougeL", "distinct_1", "distinct_2", "self_bleu",
                            "tokenize"]
    assert record.pop("tokenize") == "13a"
    expected = evaluate_texts(PREDICTIONS, REFERENCES).to_dict()
    del expected["tokenize"]
    assert record == pytest.approx(expected)
    (tmp_path / "short.txt").write_text(REFERENCES[0] + "\n", encoding="utf-8")
    assert main(["evaluate", "--predictions", str(tmp_path / "p.txt"), "--references",
                 str(tmp_path / "short.txt")]) == 1
    err = capsys.readouterr().err
    assert "3 predictions but 1 references" in err and err.count("\n") == 1
