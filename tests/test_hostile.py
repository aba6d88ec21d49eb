"""Hostile and careless files, data and inputs outside the server; each case failed on the earlier code.

Hostile configs, adapters and metadata are loaded in a child process that measures
its own time and peak memory: each must be refused in under a second and under
300 MB, with one error that names the file and the field.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from gpt2lite import (
    GPT2,
    LoraConfig,
    NonFiniteError,
    RecurrentConfig,
    RecurrentLM,
    TextClassifier,
    add_lora,
    load_labeled,
    quantize,
    save_model,
)
from gpt2lite.cli import main

_PROBE = textwrap.dedent("""
    import json, resource, sys, time
    import gpt2lite, torch
    from gpt2lite import load_model, load_tokenizer
    {setup}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.process_time()  # CPU time, all threads: another busy process on the machine does not inflate it
    try:
        {call}
        outcome = {{"error": None}}
    except Exception as exc:
        outcome = {{"error": type(exc).__name__, "message": str(exc)}}
    outcome["seconds"] = time.process_time() - t0
    outcome["grew_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps(outcome))
""")


def refused(call: str, setup: str = "pass") -> dict:
    """Run ``call`` in a fresh interpreter (imports done before measuring); its error, CPU time and memory growth."""
    code = _PROBE.format(setup=setup, call=call)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["error"] is not None, "the hostile file was accepted"
    assert outcome["seconds"] < 1.0 and outcome["grew_mb"] < 300, outcome
    return outcome


def _copy(tiny_dir, tmp_path, name="m"):
    target = tmp_path / name
    shutil.copytree(tiny_dir, target)
    return target


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


# configs that would build far more than the weights hold ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("field", "value"), [("n_layer", 1_000_000), ("n_embd", 16384), ("n_positions", 10**7),
                                              ("n_inner", 10**8)])
def test_gpt2_config_larger_than_its_weights(tiny_dir, tmp_path, field, value):
    m = _copy(tiny_dir, tmp_path)
    _edit_config(m, **{field: value}, n_head=1 if field == "n_embd" else 4)
    out = refused(f"load_model({str(m)!r})")
    assert str(m) in out["message"] and (field if field != "n_inner" else "n_inner") in out["message"]


@pytest.mark.slow
@pytest.mark.parametrize(("field", "value", "named"), [
    ("n_inner", -5, "n_inner"), ("n_inner", "big", "n_inner"), ("layer_norm_epsilon", -1.0, "layer_norm_epsilon"),
    ("layer_norm_epsilon", float("nan"), "layer_norm_epsilon"), ("eos_token_id", "x", "eos_token_id"),
    ("eos_token_id", [1], "eos_token_id"), ("n_layer", True, "n_layer"), ("attn_pdrop", "0.1", "attn_pdrop"),
    ("activation_function", ["gelu"], "activation_function"),
])
def test_gpt2_config_fields_are_checked(tiny_dir, tmp_path, field, value, named):
    m = _copy(tiny_dir, tmp_path)
    _edit_config(m, **{field: value})
    out = refused(f"load_model({str(m)!r})")
    assert str(m / "config.json") in out["message"] and named in out["message"], out


@pytest.mark.slow
def test_a_huge_config_file_is_refused_unread(tiny_dir, tmp_path):
    m = _copy(tiny_dir, tmp_path)
    config = json.loads((m / "config.json").read_text())
    config["architectures"] = ["GPT2ForSequenceClassification"]
    labels = ", ".join(f'"{i}": "class {i}"' for i in range(10))
    # 2 million labels' worth of bytes (about 40 MB), made by repeating a block of them
    block = ", ".join(f'"{i}{{n}}": "class {i}"' for i in range(100))
    many = ", ".join(block.replace("{n}", f"_{n}") for n in range(20_000))
    (m / "config.json").write_text(json.dumps(config)[:-1] + ', "id2label": {' + labels + ", " + many + "}}")
    out = refused(f"load_model({str(m)!r}, kind='classifier')")
    assert str(m / "config.json") in out["message"] and "bytes" in out["message"]


@pytest.mark.slow
def test_classifier_labels_beyond_the_bound(tiny_dir, tmp_path):
    m = _copy(tiny_dir, tmp_path)
    config = json.loads((m / "config.json").read_text())
    config["id2label"] = {str(i): str(i) for i in range(200_000)}  # under the size bound, over the count bound
    config["architectures"] = ["GPT2ForSequenceClassification"]
    (m / "config.json").write_text(json.dumps(config))
    out = refused(f"load_model({str(m)!r}, kind='classifier')")
    assert "id2label" in out["message"] and "100000" in out["message"]


def _recurrent(tmp_path, **config):
    directory = tmp_path / "rnn"
    RecurrentLM(RecurrentConfig(cell="lstm", n_embd=16, n_layer=1, vocab_size=300)).save_pretrained(directory)
    if config:
        d = json.loads((directory / "config.json").read_text())
        d.update(config)
        (directory / "config.json").write_text(json.dumps(d))
    return directory


@pytest.mark.slow
@pytest.mark.parametrize(("field", "value"), [("n_embd", 6000), ("vocab_size", 10**7), ("n_layer", 500),
                                              ("cell", ["lstm"]), ("cell", "transformer"), ("eos_token_id", "x"),
                                              ("dropout", "0.2")])
def test_recurrent_config_is_checked_against_its_weights(tmp_path, field, value):
    d = _recurrent(tmp_path, **{field: value})
    out = refused(f"load_model({str(d)!r})")
    assert str(d / "config.json") in out["message"], out
    assert field in out["message"] or "does not describe" in out["message"], out


def _adapter(tmp_path, tiny_dir, **changes):
    model = GPT2.from_pretrained(tiny_dir)
    add_lora(model, LoraConfig(r=2, target_modules=("c_attn",)))
    directory = save_model(model, tmp_path / "adapter")
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.slow
@pytest.mark.parametrize(("changes", "named"), [
    (dict(r=200_000), "r=200000"), (dict(use_rslora="false"), "use_rslora"), (dict(base_model_name_or_path=42),
                                                                              "base_model_name_or_path"),
    (dict(lora_alpha="16"), "lora_alpha"), (dict(target_modules={"c_attn": 1}), "target_modules"),
    (dict(lora_dropout=[0.1]), "lora_dropout"),
])
def test_hostile_adapter_configs(tiny_dir, tmp_path, changes, named):
    adapter = _adapter(tmp_path, tiny_dir, **changes)
    out = refused(f"load_model({str(tiny_dir)!r}, adapter={str(adapter)!r})")
    assert "adapter" in out["message"] and named in out["message"], out


@pytest.mark.slow
def test_an_adapter_config_that_is_a_list(tiny_dir, tmp_path):
    adapter = _adapter(tmp_path, tiny_dir)
    (adapter / "adapter_config.json").write_text("[1, 2, 3]")
    out = refused(f"load_model({str(adapter)!r})")
    assert str(adapter / "adapter_config.json") in out["message"] and "list" in out["message"]


@pytest.mark.slow
def test_adapter_label_metadata_beyond_its_head(tiny_dir, tmp_path):
    from gpt2lite import GPT2ForSequenceClassification

    clf = GPT2ForSequenceClassification.from_pretrained(tiny_dir, labels=["a", "b"])
    add_lora(clf, LoraConfig(r=2))
    adapter = save_model(clf, tmp_path / "clf")
    tensors = dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(
        adapter / "adapter_model.safetensors"))
    labels = json.dumps([f"label {i}" for i in range(2_000_000)])
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt", "gpt2lite.labels": labels})
    out = refused(f"load_model({str(adapter)!r}, kind='classifier')")
    assert "gpt2lite.labels" in out["message"] and "adapter_model.safetensors" in out["message"]


@pytest.mark.slow
def test_a_character_vocabulary_without_chars(tiny_dir, tmp_path):
    m = _copy(tiny_dir, tmp_path)
    (m / "tokenizer.json").write_text(json.dumps({"type": "char", "letters": ["a"]}))
    out = refused(f"load_tokenizer({str(m)!r}, 50257)")
    assert str(m / "tokenizer.json") in out["message"] and "chars" in out["message"]


@pytest.mark.slow
def test_a_config_nested_too_deep_is_one_clear_error(tiny_dir, tmp_path):
    m = _copy(tiny_dir, tmp_path)
    (m / "config.json").write_text('{"n_layer": 2, "task_specific_params": ' + "[" * 100_000 + "]" * 100_000 + "}")
    out = refused(f"load_model({str(m)!r})")
    assert out["error"] == "CheckpointError" and str(m / "config.json") in out["message"], out
    assert "nests" in out["message"], out


@pytest.mark.slow
@pytest.mark.parametrize("bad_id", [300_000_000, -5])
def test_vocab_json_ids_are_range_checked_before_a_table_is_built(tmp_path, bad_id):
    from gpt2lite.tokenizers.files import bundled_gpt2_files

    encoder, merges = bundled_gpt2_files()
    vocab = json.loads(encoder.read_text(encoding="utf-8"))
    vocab["Ġthe"] = bad_id  # " the", a token that the merges make
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copy(merges, tmp_path / "merges.txt")
    out = refused(f"gpt2lite.Tokenizer.from_pretrained({str(tmp_path)!r})")
    assert out["error"] == "CheckpointError" and str(tmp_path / "vocab.json") in out["message"], out
    assert str(bad_id) in out["message"], out


def _uer_layout(directory, vocab, **settings):
    """A BERT vocab.txt and its tokenizer_config.json beside a tiny GPT-2 config (the Chinese GPT-2s' layout)."""
    directory.mkdir()
    (directory / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", **settings}))
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 64, "eos_token_id": 3}))
    return directory


def test_an_empty_vocab_txt_is_one_clear_error(tmp_path):
    from gpt2lite import CheckpointError, load_tokenizer

    empty = _uer_layout(tmp_path / "empty", [], sep_token="[SEP]")
    with pytest.raises(CheckpointError, match=r"vocab\.txt' is empty"):
        load_tokenizer(empty, 64)
    no_unk = _uer_layout(tmp_path / "no-unk", ["[PAD]", "[SEP]", "a", "b"], sep_token="[SEP]")
    with pytest.raises(CheckpointError, match=r"vocab.txt' lacks the unknown-text token '\[UNK\]'"):
        load_tokenizer(no_unk, 64)


def _no_end_token(tmp_path, eos):
    """A byte-level tokenizer.json whose files name no end token, beside a config with ``eos``."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    inner = HFTok(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.train_from_iterator(["the quick brown fox"] * 20, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory = tmp_path / "no-end"
    directory.mkdir()
    inner.save(str(directory / "tokenizer.json"))
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 280,
                                                       "eos_token_id": eos}))
    return directory


@pytest.mark.parametrize("eos", [None, 50256])
def test_a_tokenizer_without_an_end_token_anywhere_is_one_clear_error(tmp_path, eos):
    from gpt2lite import CheckpointError, load_tokenizer

    directory = _no_end_token(tmp_path, eos)
    with pytest.raises(CheckpointError, match="names no end token") as caught:
        load_tokenizer(directory, 280)
    assert str(directory / "tokenizer.json") in str(caught.value)
    assert str(directory / "config.json") in str(caught.value) and f"eos_token_id={eos}" in str(caught.value)


def test_a_chat_template_that_is_not_utf8_stops_chat_only(tiny_dir, tmp_path):
    from gpt2lite import CheckpointError, TextGenerator
    from gpt2lite.loading import load_chat_template

    m = _copy(tiny_dir, tmp_path)
    (m / "chat_template.jinja").write_bytes(b"{% for m in messages %}\xff\xfe{{ m.content }}{% endfor %}")
    with pytest.raises(CheckpointError, match=r"chat_template\.jinja' is not UTF-8"):
        load_chat_template(m)
    gen = TextGenerator.from_pretrained(m, prepack=False)
    assert isinstance(gen("Hello", max_new_tokens=3, seed=0), str)  # plain generation does not need it
    with pytest.raises(CheckpointError, match=r"chat_template\.jinja' is not UTF-8"):
        gen.chat([{"role": "user", "content": "Hi"}], max_new_tokens=3)


def _char_model(tmp_path, tokenizer):
    from gpt2lite import GPT2Config

    torch.manual_seed(0)
    config = GPT2Config.from_preset("tiny", vocab_size=tokenizer.n_vocab, eos_token_id=tokenizer.eot_token)
    return save_model(GPT2(config), tmp_path / "char-model", tokenizer=tokenizer)


def test_a_character_vocabulary_of_another_model_is_refused(tmp_path):
    from gpt2lite import CharTokenizer, CheckpointError, TextGenerator, load_tokenizer

    own = CharTokenizer.from_texts(["hello world"])
    directory = _char_model(tmp_path, own)
    assert load_tokenizer(directory, own.n_vocab).chars == own.chars
    CharTokenizer.from_texts(["a larger alphabet: xyz"]).save(directory)  # another size
    with pytest.raises(CheckpointError, match="vocab_size") as caught:
        TextGenerator.from_pretrained(directory)
    assert str(directory / "char_vocab.json") in str(caught.value)
    assert str(directory / "config.json") in str(caught.value)
    own.save(directory)
    _edit_config(directory, eos_token_id=2)  # the same size, another end token
    with pytest.raises(CheckpointError, match="eos_token_id=2"):
        load_tokenizer(directory, own.n_vocab)


@pytest.mark.parametrize(("settings", "named"), [
    ({"top_p": 5}, "top_p"), ({"do_sample": "yes"}, "do_sample"), ({"do_sample": True, "num_beams": 4}, "num_beams"),
    ({"max_new_tokens": -1}, "max_new_tokens"), ([1, 2], "list"),
])
def test_a_bad_generation_config_is_one_clear_error(tiny_dir, tmp_path, settings, named):
    from gpt2lite import CheckpointError, TextGenerator

    m = _copy(tiny_dir, tmp_path)
    (m / "generation_config.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match=named) as caught:
        TextGenerator.from_pretrained(m, prepack=False)
    assert str(m / "generation_config.json") in str(caught.value)


# text metrics ------------------------------------------------------------------------------------------------


def test_self_bleu_equals_the_quadratic_definition():
    import sacrebleu

    from gpt2lite.text.metrics import self_bleu

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", ",", ".", "and", "or", "but"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 15))) for _ in range(60)]
    texts += texts[:3]  # exact duplicates, whose n-grams tie for the largest count
    expected = sum(sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts))
    assert self_bleu(texts) == pytest.approx(expected / len(texts), abs=1e-9)


def test_rouge_l_refuses_a_pair_too_large_to_compare(tmp_path, capsys):
    pred, ref = tmp_path / "p.txt", tmp_path / "r.txt"
    pred.write_text("short line\n" + " ".join(["word"] * 4000) + "\n")
    ref.write_text("a short line\n" + " ".join(["other"] * 4000) + "\n")
    assert main(["evaluate", "--predictions", str(pred), "--references", str(ref)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 2" in err and "ROUGE-L" in err


@pytest.mark.parametrize("separator", ["\u2028", "\f", "\x1c", "\r"])
def test_evaluate_splits_lines_at_newlines_only(tmp_path, capsys, separator):
    pred, ref = tmp_path / "p.txt", tmp_path / "r.txt"
    pred.write_text(f"the cat{separator}sat here\nthe dog ran\n", newline="")
    ref.write_text(f"the cat{separator}sat here\nthe dog ran\n", newline="")
    assert main(["evaluate", "--predictions", str(pred), "--references", str(ref), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["rougeL"] == pytest.approx(1.0) and scores["chrf"] == pytest.approx(100.0)


def test_evaluate_accepts_a_byte_order_mark(tmp_path, capsys):
    pred, ref = tmp_path / "p.txt", tmp_path / "r.txt"
    pred.write_bytes("\ufeffthe cat sat on the mat\r\nthe dog ran in the park\r\n".encode())
    ref.write_bytes(b"the cat sat on the mat\nthe dog ran in the park\n")
    assert main(["evaluate", "--predictions", str(pred), "--references", str(ref), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bleu"] == pytest.approx(100.0)


# classification data -------------------------------------------------------------------------------------


def _csv(tmp_path, rows, header=("text", "label"), bom=False):
    path = tmp_path / "data.csv"
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(row + "\n")
    return path


def test_an_unquoted_comma_is_refused_naming_its_line(tmp_path):
    path = _csv(tmp_path, ["good film,positive", "bad film,negative"] * 5 + ["a lovely, warm film,positive"])
    with pytest.raises(ValueError, match="line 12 has more fields than the header"):
        load_labeled(path)


def test_a_label_outside_the_given_classes_names_its_line(tmp_path):
    path = _csv(tmp_path, ["good film,positive", "bad film,negative"] * 5 + ["odd film,neutral"])
    with pytest.raises(ValueError, match=r"line 12: label 'neutral'"):
        load_labeled(path, labels=["negative", "positive"])


def test_a_field_past_the_csv_limit_is_one_clear_error(tmp_path):
    path = _csv(tmp_path, ["good film,positive", f"{'x' * 200_000},negative"])
    with pytest.raises(ValueError, match=r"line 3: .*field larger than field limit.*JSONL"):
        load_labeled(path)


def test_extra_fields_with_a_missing_label_column(tmp_path):
    path = _csv(tmp_path, ["good film,positive,extra"], header=("text", "category"))
    with pytest.raises(ValueError, match="more fields than the header"):
        load_labeled(path)


def test_an_excel_byte_order_mark_is_accepted(tmp_path):
    path = _csv(tmp_path, ["good film,positive", "bad film,negative"] * 5, bom=True)
    data = load_labeled(path)
    assert data.labels == ("negative", "positive")


def test_classify_reads_stdin_lines_at_newlines_only(tmp_path, monkeypatch, capsys, tiny_dir):
    import io

    from gpt2lite import GPT2ForSequenceClassification

    clf = GPT2ForSequenceClassification.from_pretrained(tiny_dir, labels=["a", "b"])
    clf.save_pretrained(tmp_path / "clf")
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\u2028still first\nsecond\n"))
    assert main(["classify", "--model", str(tmp_path / "clf")]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_classify_checks_max_length(tiny_dir):
    from gpt2lite import GPT2ForSequenceClassification, Tokenizer

    clf = TextClassifier(GPT2ForSequenceClassification.from_pretrained(tiny_dir, labels=["a", "b"]),
                         Tokenizer.gpt2())
    for bad in (-5, 0, 10_000, 2.5):
        with pytest.raises(ValueError, match="max_length"):
            clf.classify("some text", max_length=bad)


# int8 --------------------------------------------------------------------------------------------------


def test_quantizing_infinite_weights_is_refused(tiny_dir):
    model = GPT2.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.h[1].mlp.c_fc.weight[3, 5] = float("inf")
    with pytest.raises(NonFiniteError, match=r"h\.1\.mlp\.c_fc\.weight"):
        quantize(model)


def test_overflowing_int8_activations_are_a_non_finite_error(tiny_dir):
    from gpt2lite import generate

    model = quantize(GPT2.from_pretrained(tiny_dir))
    with torch.no_grad():  # finite numbers whose sum overflows: the residual stream at position 3
        model.wpe.weight[3] = 3e38
        model.h[0].attn.c_proj.bias.fill_(3e38)
    with pytest.raises(NonFiniteError, match="overflowed"):
        generate(model, [[1, 2, 3, 4, 5]], max_new_tokens=2, temperature=0)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["torch", "native"])
def test_overflowing_int8_activations_in_a_compiled_step_are_a_non_finite_error(tiny_dir, monkeypatch, route):
    from gpt2lite import generate
    from gpt2lite.transforms import quantize as quantize_module
    from gpt2lite.transforms.native import kernels_for, use_kernels

    model = use_kernels(quantize(GPT2.from_pretrained(tiny_dir)), route)
    prompt = [[1, 2, 3, 4, 5]]
    generate(model, prompt, max_new_tokens=2, temperature=0, compile=True)  # positions up to 5: finite
    with torch.no_grad():  # position 6: reached only by the second one-token step, which runs compiled
        model.wpe.weight[6] = float("inf")
    calls: list[int] = []
    find = quantize_module._layer  # only the registered op's kernel looks layers up
    monkeypatch.setattr(quantize_module, "_layer", lambda weight: calls.append(1) or find(weight))
    with pytest.raises(NonFiniteError, match="overflowed"):
        generate(model, prompt, max_new_tokens=4, temperature=0, compile=True)
    # fbgemm's route runs through its registered op; gpt2lite's kernels (where they compile) do not look layers up
    assert bool(calls) == (route == "torch" or kernels_for("native") is None)


@pytest.mark.slow
def test_a_compiled_step_that_raises_leaves_its_session_usable(tiny_dir):
    """The int8 op raises inside the graph after the cache advanced: the session's count is mended."""
    from gpt2lite import DecodeSession

    model = quantize(GPT2.from_pretrained(tiny_dir))
    session = DecodeSession(model, batch_size=2, max_length=12, compile=True)
    session.feed(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    session.feed(torch.tensor([[7], [7]]))  # compiled
    saved = model.ln_f.weight.detach().clone()
    with torch.no_grad():
        model.ln_f.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="overflowed"):
        session.feed(torch.tensor([[8], [8]]))
    with torch.no_grad():
        model.ln_f.weight.copy_(saved)
    assert session.state._host_lengths == session.state.lengths.tolist()
    for _ in range(12 - int(session.state.lengths.max())):  # up to the last slot: no kernel index error
        session.feed(torch.tensor([[9], [9]]))
    with pytest.raises(ValueError, match="the cache holds 12 slots per row; 13 are needed"):
        session.feed(torch.tensor([[9], [9]]))


# training output ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_training_error_is_the_last_thing_on_stderr(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    done = subprocess.run(
        [sys.executable, "-m", "gpt2lite", "finetune", "--data", str(corpus), "--out", str(tmp_path / "run"),
         "--preset", "tiny", "--steps", "40", "--lr", "1e4", "--min-lr", "1e4", "--grad-clip", "0",
         "--warmup-steps", "0", "--batch-size", "2", "--block-size", "16", "--eval-interval", "0"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("gpt2lite: error: training diverged"), done.stderr[-2000:]
    assert sum("gpt2lite: error" in line for line in lines) == 1


def test_csv_module_is_left_as_it_was():
    assert csv.field_size_limit() == 131072  # no global setting changed behind the user's back
