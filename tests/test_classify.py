"""Sequence classification: transformers' GPT2ForSequenceClassification as the oracle, training, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from gpt2lite import (
    GPT2,
    GPT2Config,
    GPT2ForSequenceClassification,
    TextClassifier,
    Tokenizer,
    TrainConfig,
    load_labeled,
    train,
)
from gpt2lite.cli import main
from gpt2lite.training.objectives import classification_metrics

from .conftest import TINY

PAD = 50256
LABELS = ("negative", "neutral", "positive")


@pytest.fixture(scope="module")
def hf_classifier(tmp_path_factory):
    """A random transformers classifier (random LayerNorms and biases too), saved by transformers."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(3)
    config = transformers.GPT2Config(**TINY, num_labels=3, pad_token_id=PAD,
                                     id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    model = transformers.GPT2ForSequenceClassification(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    directory = tmp_path_factory.mktemp("hf-classifier")
    model.save_pretrained(directory)
    return model, directory


def _rows(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50000, (n,), generator=g) for n in (9, 4, 1, 7)]  # never the pad id


def _padded(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), PAD)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_equal_transformers_on_padded_batches(hf_classifier, side):
    hf, directory = hf_classifier
    ours = GPT2ForSequenceClassification.from_pretrained(directory)
    assert ours.labels == LABELS
    ids, mask = _padded(_rows(), side)
    # transformers numbers positions 0.. from the first column unless told; real tokens must count from 0.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask)
        alone = torch.cat([ours(r[None]) for r in _rows()])
    assert got.shape == (4, 3)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)  # padding changes nothing


def test_saved_classifier_loads_in_transformers_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    ours = GPT2ForSequenceClassification(GPT2Config(**TINY, labels=("a", "b"), pad_token_id=PAD)).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path).eval()
    assert theirs.config.id2label == {0: "a", 1: "b"} and theirs.config.num_labels == 2
    ids, mask = _padded(_rows(1), "right")  # transformers finds the last token by the pad id
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask), theirs(input_ids=ids, attention_mask=mask).logits,
                                   atol=1e-4, rtol=1e-4)


def test_language_model_gets_a_new_head_and_bad_labels_are_errors(tiny_dir, hf_classifier, tmp_path):
    clf = GPT2ForSequenceClassification.from_pretrained(tiny_dir, labels=["x", "y"])
    assert clf.labels == ("x", "y") and clf.config.pad_token_id == PAD
    lm = GPT2.from_pretrained(tiny_dir)
    ids = torch.randint(0, 50257, (2, 5))
    with torch.no_grad():  # the body is the language model's
        torch.testing.assert_close(clf.transformer.hidden_states(ids), lm.hidden_states(ids))
    with pytest.raises(ValueError, match="pass labels"):
        GPT2ForSequenceClassification.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match=r"load it with load_model\(..., kind=.classifier.\)"):
        GPT2.from_pretrained(hf_classifier[1])
    with pytest.raises(ValueError, match="classifies into"):
        GPT2ForSequenceClassification.from_pretrained(hf_classifier[1], labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="no real token"):
        clf(ids, attention_mask=torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]))


def test_metrics_against_hand_computed_values():
    # class 0: tp 2, fp 1, fn 0 -> F1 4/5; class 1: tp 1, fp 0, fn 1 -> 2/3; class 2: never seen -> 0
    m = classification_metrics([0, 0, 1, 0], [0, 0, 1, 1], 3)
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((4 / 5 + 2 / 3 + 0) / 3)


def _write_keyword_data(path, n=160, seed=0):
    """Texts whose class is told by one word: learnable by a tiny model in a few dozen steps."""
    import random

    rng = random.Random(seed)
    fillers = ["the", "a", "of", "and", "to", "in", "is", "it", "that", "was", "for", "on", "with", "as", "by"]
    words = {"negative": "awful", "neutral": "table", "positive": "lovely"}
    rows = []
    for _ in range(n):
        label = rng.choice(list(words))
        text = " ".join([*rng.choices(fillers, k=rng.randint(3, 9)), words[label], *rng.choices(fillers, k=2)])
        rows.append({"text": text, "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


@pytest.mark.slow
def test_training_a_classifier_through_the_one_trainer(tmp_path):
    rows = _write_keyword_data(tmp_path / "train.jsonl")
    data = load_labeled(tmp_path / "train.jsonl", labels=list(LABELS), val_fraction=0.25)
    assert data.labels == LABELS and len(data.val_ids) == 40
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config.from_preset("tiny", labels=LABELS, pad_token_id=PAD,
                                                                 embd_pdrop=0, attn_pdrop=0, resid_pdrop=0))
    config = TrainConfig(steps=60, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_interval=30,
                         save_interval=30, progress=False)
    result = train(model, data, tmp_path / "run", config)
    (step_a, _first), (step_b, last) = result.val_metrics
    assert (step_a, step_b) == (30, 60)
    majority = max(sum(r["label"] == n for r in rows) for n in LABELS) / len(rows)
    assert last["accuracy"] > majority + 0.2, (last, majority)
    # The reported figures are those of the saved model on the held-out rows.
    clf = TextClassifier.from_pretrained(result.final_dir)
    held = _held_out(rows, data)
    val_texts = [r["text"] for i, r in enumerate(rows) if i in held]  # in file order, as load_labeled keeps them
    predicted = [LABELS.index(c.label) for c in clf.classify(val_texts)]
    assert classification_metrics(predicted, data.val_labels, 3)["accuracy"] == pytest.approx(last["accuracy"])
    one = clf.classify("it was lovely")
    assert one.label in LABELS and sum(one.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_classifier_resume_continues_exactly(tmp_path):
    _write_keyword_data(tmp_path / "train.jsonl", n=80)
    data = load_labeled(tmp_path / "train.jsonl", val_fraction=0.25)

    def fresh():
        torch.manual_seed(0)
        return GPT2ForSequenceClassification(GPT2Config.from_preset("tiny", labels=data.labels, pad_token_id=PAD))

    config = dict(batch_size=8, lr=3e-3, warmup_steps=2, eval_interval=2, save_interval=2, progress=False)
    whole = train(fresh(), data, tmp_path / "whole", TrainConfig(steps=4, **config))
    train(fresh(), data, tmp_path / "split", TrainConfig(steps=2, **config))
    resumed = train(fresh(), data, tmp_path / "split", TrainConfig(steps=4, **config), resume=True)
    assert resumed.losses == whole.losses  # dropout, batches and optimizer all continue where they stopped
    assert resumed.val_metrics == whole.val_metrics
    other = load_labeled(tmp_path / "train.jsonl", val_fraction=0.5)
    with pytest.raises(ValueError, match="other data"):
        train(fresh(), other, tmp_path / "split", TrainConfig(steps=6, **config), resume=True)


def _held_out(rows, data):
    """Indices of the rows that load_labeled held out (the same seeded sample it draws)."""
    import random

    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    return set(order[: len(data.val_ids)])


def test_labeled_data_errors_name_the_problem(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("sentence,label\nhello,a\nworld,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no 'text' column .*text_column"):
        load_labeled(csv_file)
    data = load_labeled(csv_file, text_column="sentence", val_fraction=0.5)
    assert data.labels == ("a", "b")
    with pytest.raises(ValueError, match=r"label 'b' .* is not one of the classes"):
        load_labeled(csv_file, text_column="sentence", labels=["a", "c"], val_fraction=0.5)
    csv_file.write_text("text,label\n,a\nworld,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: the text is empty"):
        load_labeled(csv_file)
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"text": "x", "label": "a"}\n{"text": "y"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_labeled(bad)
    with pytest.raises(ValueError, match=r"must be \.csv"):
        load_labeled(tmp_path / "d.txt")


@pytest.mark.slow
def test_cli_finetune_classify_then_classify(tmp_path, capsys):
    rows = _write_keyword_data(tmp_path / "train.jsonl", n=60)
    csv_file = tmp_path / "train.csv"
    import csv

    with open(csv_file, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["review", "label"])
        writer.writeheader()
        writer.writerows({"review": r["text"], "label": r["label"]} for r in rows)
    out = tmp_path / "run"
    assert main(["finetune", "--task", "classify", "--data", str(csv_file), "--text-column", "review",
                 "--labels", "negative,neutral,positive", "--preset", "tiny", "--out", str(out), "--steps", "3",
                 "--eval-interval", "3", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "macro-F1" in printed
    assert main(["classify", "--model", str(out / "final"), "--device", "cpu", "--json", "it was awful"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["label"] in LABELS and set(result["probabilities"]) == set(LABELS)
    assert main(["finetune", "--task", "classify", "--data", str(csv_file), "--preset", "tiny",
                 "--out", str(tmp_path / "bad"), "--steps", "1"]) == 1
    assert "no 'text' column" in capsys.readouterr().err


TEXTS = ["a fine, warm film", "dull and far too long", "it was fine", "x", "The cat sat on the mat."]


def _transformers_probs(model, texts):
    """transformers' class probabilities, one text at a time (no padding at all)."""
    tokenizer = Tokenizer.gpt2()
    with torch.no_grad():
        return torch.stack([model(torch.tensor([tokenizer.encode(t)])).logits[0].softmax(-1) for t in texts])


def test_a_served_classifier_gives_transformers_probabilities(hf_classifier):
    import concurrent.futures

    import httpx

    from gpt2lite.serve.app import ServerOptions, create_app
    from test_serve import running

    model, directory = hf_classifier
    clf = TextClassifier.from_pretrained(directory)
    expected = _transformers_probs(model, TEXTS)
    with running(create_app(clf.model, clf.tokenizer, ServerOptions(model_name="clf", max_batch=4))) as url:
        reply = httpx.post(url + "/classify", json={"model": "clf", "input": TEXTS}).json()
        got = torch.tensor([d["probs"] for d in reply["data"]])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        assert [d["label"] for d in reply["data"]] == [LABELS[int(p.argmax())] for p in expected]
        assert reply["data"][0]["num_classes"] == 3
        assert reply["usage"]["prompt_tokens"] == sum(len(Tokenizer.gpt2().encode(t)) for t in TEXTS)
        # TextClassifier, the library's own route, says the same.
        ours = clf.classify(TEXTS)
        torch.testing.assert_close(got, torch.tensor([[r.probabilities[n] for n in LABELS] for r in ours]))
        assert clf.classify_ids([clf.tokenizer.encode(t) for t in TEXTS]) == ours  # what the server calls
        with pytest.raises(ValueError, match="text 1 has 97 tokens; the model reads at most 96"):
            clf.classify_ids([[1], [1] * 97])
        # Many requests at once, batched together in the classifier's thread: each gets its own answers.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda t: httpx.post(url + "/classify", json={"input": t}, timeout=60).json(),
                                    TEXTS * 4))
        for text, answer in zip(TEXTS * 4, answers, strict=True):
            torch.testing.assert_close(torch.tensor(answer["data"][0]["probs"]), expected[TEXTS.index(text)],
                                       atol=1e-5, rtol=1e-4)
        models = httpx.get(url + "/v1/models").json()["data"][0]
        assert models["task"] == "classify" and models["labels"] == list(LABELS)
        for body, status in (({"input": ""}, 400), ({"input": ["ok", ""]}, 400), ({"input": []}, 400),
                             ({"input": "x", "model": "other"}, 404), ({"input": 3}, 400)):
            error = httpx.post(url + "/classify", json=body)
            assert error.status_code == status and "error" in error.json(), body
        assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).status_code == 404


@pytest.mark.slow  # a server process
def test_gpt2lite_serve_finds_a_classifier_folder(hf_classifier):
    import httpx

    from test_serve_process import serve

    model, directory = hf_classifier
    with serve(directory) as (url, _):
        reply = httpx.post(url + "/classify", json={"input": TEXTS[:2]}).json()
    torch.testing.assert_close(torch.tensor([d["probs"] for d in reply["data"]]),
                               _transformers_probs(model, TEXTS[:2]), atol=1e-5, rtol=1e-4)
