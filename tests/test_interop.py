"""The GPT-2 family in and out: .bin checkpoints, config variants, other tokenizers, files others read.

transformers writes every fixture here and is the oracle for logits, tokens and
generation; what gpt2lite saves must load in transformers' AutoTokenizer and
AutoModelForCausalLM.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
import transformers

from gpt2lite import (
    GPT2,
    CharTokenizer,
    CheckpointError,
    GPT2Config,
    HFTokenizer,
    TextGenerator,
    Tokenizer,
    TrainConfig,
    load_model,
    load_tokenizer,
    prepare_data,
    push_to_hub,
    train,
)
from gpt2lite.cli import main

IDS = torch.randint(0, 50257, (2, 13), generator=torch.Generator().manual_seed(0))
SMALL = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64)


def _hf(seed=0, **config):
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**SMALL, **config})).eval()
    with torch.no_grad():  # random LayerNorms and biases, so a swapped tensor shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _same_logits(ours, theirs, ids=IDS):
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def _save_bin(model, directory, shards: int = 1) -> None:
    """A checkpoint as transformers' older save_pretrained wrote it: pytorch_model.bin (or shards and an index)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(directory / "config.json")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_a_bin_only_checkpoint_gives_transformers_logits(tmp_path, shards):
    theirs = _hf()
    _save_bin(theirs, tmp_path, shards)
    assert not list(tmp_path.glob("*.safetensors"))
    _same_logits(load_model(tmp_path), theirs)
    if shards == 1:  # a bare .bin file of a published shape would need no config; this one has one beside it
        _same_logits(load_model(tmp_path / "pytorch_model.bin"), theirs)


def test_safetensors_are_preferred_to_a_bin_beside_them(tmp_path):
    theirs = _hf()
    theirs.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint at all")
    _same_logits(load_model(tmp_path), theirs)


@pytest.mark.parametrize("variant", [
    dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    dict(scale_attn_by_inverse_layer_idx=True),
    dict(reorder_and_upcast_attn=True),
    dict(scale_attn_weights=False),
    dict(activation_function="relu", n_inner=96),
    dict(activation_function="silu"),
    dict(activation_function="quick_gelu"),
])
def test_config_variants_give_transformers_logits(tmp_path, variant):
    theirs = _hf(**variant)
    theirs.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    _same_logits(ours, theirs)
    out = ours.config.to_dict()
    assert all(out[k] == v for k, v in variant.items())  # saved as transformers reads them


def test_an_untied_head_gives_transformers_logits_and_tokens(tmp_path):
    theirs = _hf(tie_word_embeddings=False)
    with torch.no_grad():
        theirs.lm_head.weight.normal_()  # a head of its own, unlike the embedding
    theirs.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.lm_head is not None
    _same_logits(ours, theirs)
    from gpt2lite import generate

    prompt = IDS[:1, :5]
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                               pad_token_id=50256)
    assert torch.equal(generate(ours, prompt, max_new_tokens=12, temperature=0, ignore_eos=True)[:, :17],
                       expected[:, :17])
    ours.save_pretrained(tmp_path / "again")  # and back: transformers reads our untied file
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "again").eval()
    _same_logits(ours, back)


class _Payload:
    """Unpickling this would create a directory."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_bin_that_would_run_code_is_refused_unrun(tmp_path):
    theirs = _hf()
    _save_bin(theirs, tmp_path)
    marker = tmp_path / "pwned"
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "extra": _Payload(str(marker))}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="could run code"):
        load_model(tmp_path)
    assert not marker.exists()


def test_an_unsupported_variant_is_named(tmp_path):
    theirs = _hf()
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["add_cross_attention"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="add_cross_attention"):
        load_model(tmp_path)


# other tokenizers ------------------------------------------------------------------------------------------

CHINESE = "这是很久之前的事情了，我们在北京相遇。"


def _uer_checkpoint(tmp_path):
    """A miniature Chinese GPT-2 in uer's layout: a BERT vocab.txt, tokenizer_config.json, a GPT-2 model."""
    chars = sorted(set("这是很久之前的事情了我们在北京相遇，。天气好今日"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars[:5]), "hello", "##s"]
    directory = tmp_path / "gpt2-chinese"
    directory.mkdir()
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": False, "sep_token": "[SEP]", "cls_token": "[CLS]",
         "unk_token": "[UNK]", "pad_token": "[PAD]", "mask_token": "[MASK]"}))
    model = _hf(vocab_size=len(vocab), bos_token_id=2, eos_token_id=3)
    model.save_pretrained(directory)
    return directory, model


def test_a_chinese_gpt2_with_a_bert_vocabulary(tmp_path):
    directory, theirs = _uer_checkpoint(tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    gen = TextGenerator.from_pretrained(directory)
    assert isinstance(gen.tokenizer, HFTokenizer) and gen.tokenizer.eot_token == 3
    for text in (CHINESE, "hello 天气好", "helloS 北京"):
        assert gen.tokenizer.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    # A special token's text is text unless allowed (as for GPT-2's <|endoftext|>); allowed, it is transformers'.
    assert 3 not in gen.tokenizer.encode("今日 [SEP] 天气")
    assert gen.tokenizer.encode("今日 [SEP] 天气", allowed_special="all") == hf_tok.encode("今日 [SEP] 天气",
                                                                                         add_special_tokens=False)
    ids = gen.tokenizer.encode(CHINESE)
    expected = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=15, do_sample=False, pad_token_id=0, eos_token_id=None)
    text = gen(CHINESE, max_new_tokens=15, temperature=0, ignore_eos=True)
    assert text == _bert_spacing_removed(hf_tok.decode(expected[0, len(ids) :]))
    streamed = "".join(gen.stream(CHINESE, max_new_tokens=15, temperature=0, ignore_eos=True))
    assert streamed == text


def _bert_spacing_removed(text):
    """transformers' text without the spaces beside Chinese characters and CJK punctuation (this test's rule)."""
    return re.sub(r"(?<=[\u4e00-\u9fff\u3000-\u303f\uff00-\uffef]) | (?=[\u4e00-\u9fff\u3000-\u303f\uff00-\uffef])",
                  "", text)


def test_a_vocab_txt_alone_is_read_as_bert_tokenizer_reads_it(tmp_path):
    directory, _ = _uer_checkpoint(tmp_path)
    (directory / "tokenizer_config.json").unlink()  # the common case: vocab.txt and the model, nothing else
    (directory / "config.json").write_text(json.dumps({**json.loads((directory / "config.json").read_text()),
                                                       "eos_token_id": None}))
    bert = transformers.BertTokenizer(str(directory / "vocab.txt"))
    tok = load_tokenizer(directory, 64)
    assert tok.eot_token == bert.sep_token_id == 3  # BertTokenizer's default sep_token, [SEP]
    assert {t: tok.special_tokens[t] for t in bert.all_special_tokens} == dict(
        zip(bert.all_special_tokens, bert.all_special_ids, strict=True))
    for text in (CHINESE, "hello 天气好", "helloS 北京 ?"):
        assert tok.encode(text) == bert.encode(text, add_special_tokens=False)
    text = "Hello 北京 [SEP] 天气[CLS]"
    assert tok.encode(text, allowed_special="all") == bert.encode(text, add_special_tokens=False)
    ids = tok.encode(CHINESE + "hello " + CHINESE)
    assert tok.decode(ids) == CHINESE + "hello" + CHINESE  # Chinese as written: no space between characters
    spaced = load_tokenizer(directory, 64, cjk_spaces=True)
    assert spaced.decode(ids) == bert.decode(ids) != tok.decode(ids)  # the option keeps transformers' spacing
    gen = TextGenerator.from_pretrained(directory, prepack=False)
    assert gen.tokenizer.eot_token == 3 and gen.model.config.eos_token_id is None


def test_chinese_text_has_no_spaces_in_text_streams_and_samples(tmp_path):
    directory, _ = _uer_checkpoint(tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    gen = TextGenerator.from_pretrained(directory, prepack=False)
    spaced = TextGenerator.from_pretrained(directory, prepack=False, cjk_spaces=True)
    continuation = "##是" if "##是" in hf_tok.vocab else "##" + sorted(set(CHINESE))[0]
    first = hf_tok.convert_tokens_to_ids(continuation)
    start = len(gen.tokenizer.encode(CHINESE))

    def continuation_first(tokens, logits):  # a word's continuation ("##x") as the first new token
        if tokens.shape[1] == start:
            logits = torch.full_like(logits, -1e4)
            logits[:, first] = 0
        return logits

    options = dict(max_new_tokens=12, temperature=0, ignore_eos=True, logits_processor=continuation_first)
    completion = gen.complete(CHINESE, **options)[0]
    theirs = hf_tok.decode(completion.token_ids, skip_special_tokens=True)
    assert spaced(CHINESE, **options) == theirs and " " in theirs
    assert completion.text == _bert_spacing_removed(theirs).removeprefix("##")
    assert "##" not in completion.text and not re.search(r"[\u4e00-\u9fff] +[\u4e00-\u9fff]", completion.text)
    pieces = list(gen.stream(CHINESE, **options))
    assert "".join(pieces) == completion.text and len(pieces) > 1
    assert "".join(spaced.stream(CHINESE, **options)) == theirs
    # The decoder's rule on its own, against the text it came from: spaces beside CJK go, others stay.
    decoder = gen.tokenizer.stream_decoder()
    ids = gen.tokenizer.encode("hello 天气好 hello hellos。北京")
    assert "".join(decoder.add(i) for i in ids) + decoder.flush() == "hello天气好hello hellos。北京"


def test_training_samples_leave_special_tokens_out_and_join_chinese(tmp_path, monkeypatch):
    from gpt2lite.training import trainer

    directory, _ = _uer_checkpoint(tmp_path)
    gen = TextGenerator.from_pretrained(directory, prepack=False)
    tok, special = gen.tokenizer, gen.tokenizer.special_tokens
    new = [special["[CLS]"], *tok.encode("北京"), special["[UNK]"], *tok.encode("天气好"), special["[SEP]"]]

    def generated(model, prompts, **kwargs):  # the model's choice, fixed: special tokens among Chinese
        return torch.tensor([prompts[0] + new])

    monkeypatch.setattr(trainer, "generate", generated)
    config = TrainConfig(steps=1, sample_every=1, sample_prompt="今日", progress=False)
    assert trainer._sample(gen.model, tok, config, 1) == "北京天气好"


def test_a_tokenizer_json_with_added_tokens_streams_whole_characters(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    inner = HFTok(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    corpus = ["naïve café 👩‍👩‍👧 families", "the quick brown fox", "emoji 🍵 tea"] * 50
    inner.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>", "<tool>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory = tmp_path / "tok"
    directory.mkdir()
    inner.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    tok = load_tokenizer(directory, 300)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    text = "naïve 🍵 <tool> tea 👩‍👩‍👧"
    ids = tok.encode(text, allowed_special="all")
    assert ids == hf_tok.encode(text, add_special_tokens=False) and tok.eot_token == 0
    decoder = tok.stream_decoder()
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == hf_tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # a character split over tokens comes out whole
    assert b"".join(tok.decode_token_bytes(i) for i in tok.encode("naïve")) == "naïve".encode()


def test_the_character_vocabulary_has_a_name_of_its_own(tmp_path):
    tok = CharTokenizer.from_texts(["hello world"])
    tok.save(tmp_path)
    assert (tmp_path / "char_vocab.json").is_file()
    assert load_tokenizer(tmp_path, tok.n_vocab).encode("hold") == tok.encode("hold")
    (tmp_path / "char_vocab.json").rename(tmp_path / "tokenizer.json")  # as earlier versions wrote it
    assert load_tokenizer(tmp_path, tok.n_vocab).encode("hold") == tok.encode("hold")


def test_the_model_card_names_no_local_path_and_prompts_in_the_models_vocabulary(tmp_path):
    from gpt2lite.training.card import write_model_card

    corpus = tmp_path / "文章.txt"
    corpus.write_text("春天来了，花开了。\n小鸟在唱歌。\n" * 40, encoding="utf-8")
    tok = CharTokenizer.from_texts([corpus.read_text(encoding="utf-8")])
    data = prepare_data(str(corpus), tmp_path / "data", tokenizer=tok)
    model = GPT2(GPT2Config.from_preset("tiny", vocab_size=tok.n_vocab, eos_token_id=tok.eot_token))
    (tmp_path / "my-base").mkdir()
    (tmp_path / "final").mkdir()
    getattr(model, "transformer", model).name_or_path = str(tmp_path / "my-base")  # loaded from a local folder
    card = write_model_card(tmp_path / "final", model, data, 3, [2.0], [], []).read_text(encoding="utf-8")
    assert str(tmp_path) not in card and "`my-base`" in card and "文章.txt" in card and "base_model:" not in card
    assert "print(gen('', max_new_tokens=40))" in card  # no tokenizer given: from the end token, in any vocabulary
    card = write_model_card(tmp_path / "final", model, data, 3, [2.0], [], [], tok).read_text(encoding="utf-8")
    assert "print(gen('春天来了，花开了。', max_new_tokens=40))" in card
    code = card.split("```python\n")[1].split("```")[0]
    prompt = code.split("print(gen(")[1].split(", max_new_tokens")[0]
    tok.encode(eval(prompt))  # in the model's own vocabulary: "Hello" was not


def test_a_character_vocabulary_is_a_tokenizer_json_transformers_reads(tmp_path):
    tok = CharTokenizer.from_texts(["春天来了，花开了。\n小鸟 🐦 sings\t!"])
    tok.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == tok.eot_token
    for text in ("春天", "花开了。\n\n小鸟 🐦 sings\t!", "来了<|endoftext|>春天", ""):
        ids = tok.encode(text, allowed_special="all")
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids
        assert theirs.decode(ids) == text == tok.decode(ids)
    with pytest.raises(Exception, match="WordLevel"):  # an unknown character is refused there too, not an id
        theirs("春x")
    assert CharTokenizer.load(tmp_path).chars == tok.chars  # char_vocab.json is still what gpt2lite reads


def test_a_character_model_honours_special_tokens_and_chats(tmp_path):
    tok = CharTokenizer.from_texts(["你好，今天天气很好。"])
    end = tok.eot_token
    written = CharTokenizer.from_texts(["a<|endoftext|>b"])  # the string's characters are in this one
    assert written.encode("a<|endoftext|>") == [written.chars.index(c) for c in "a<|endoftext|>"]
    assert written.encode("a<|endoftext|>", allowed_special="all") == [written.chars.index("a"), written.eot_token]
    with pytest.raises(ValueError, match="character '<' is not in this character vocabulary"):
        tok.encode("你好<|endoftext|>")  # not allowed: its characters, which this vocabulary lacks
    assert tok.encode("你好<|endoftext|>今天", allowed_special="all") == [*tok.encode("你好"), end, *tok.encode("今天")]
    assert tok.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [end]
    model = GPT2(GPT2Config.from_preset("tiny", vocab_size=tok.n_vocab, eos_token_id=end))
    gen = TextGenerator(model, tok)
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好。"},
                {"role": "user", "content": "今天天气很好"}]
    assert gen.chat_prompt(messages).count("<|endoftext|>") == 3  # DialoGPT's convention: the end token per turn
    assert isinstance(gen.chat(messages, max_new_tokens=5, seed=0), str)
    with pytest.raises(ValueError, match="character '龘' is not in this character vocabulary"):
        gen("龘", max_new_tokens=2)


def test_text_leaves_special_tokens_out_as_transformers_pipeline_does(tmp_path):
    directory, _ = _uer_checkpoint(tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    gen = TextGenerator.from_pretrained(directory, prepack=False)
    special = gen.tokenizer.special_tokens
    start = len(gen.tokenizer.encode(CHINESE))
    forced = {0: special["[CLS]"], 2: special["[UNK]"], 3: special["[UNK]"], 5: special["[SEP]"]}

    def force(tokens, logits):  # these special tokens at these steps, the model's choice elsewhere
        want = forced.get(tokens.shape[1] - start)
        if want is None:
            return logits
        out = torch.full_like(logits, -1e4)
        out[:, want] = 0
        return out

    options = dict(max_new_tokens=8, temperature=0, ignore_eos=True, logits_processor=force)
    completion = gen.complete(CHINESE, **options)[0]
    ids = completion.token_ids
    assert [ids[step] for step in forced] == list(forced.values())
    assert completion.text == _bert_spacing_removed(hf_tok.decode(ids, skip_special_tokens=True))
    assert not any(t in completion.text for t in ("[CLS]", "[UNK]", "[SEP]"))
    assert "".join(gen.stream(CHINESE, **options)) == completion.text
    assert gen(CHINESE, **options) == completion.text
    # The token API decodes the ids it is given, special tokens included, as transformers' decode does.
    assert gen.tokenizer.decode(ids) == _bert_spacing_removed(hf_tok.decode(ids))
    assert "[UNK]" in gen.tokenizer.decode(ids)
    assert load_tokenizer(directory, 64, cjk_spaces=True).decode(ids) == hf_tok.decode(ids)


def test_a_tokenizer_json_without_an_end_token_ends_where_transformers_does(tmp_path):
    """No eos_token in the tokenizer's files: generation ends at config.json's eos_token_id, as transformers' does."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    inner = HFTok(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"] * 50
    inner.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory = tmp_path / "no-eos"
    directory.mkdir()
    inner.save(str(directory / "tokenizer.json"))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    assert hf_tok.eos_token is None
    prompt = "the quick brown"
    ids = torch.tensor([hf_tok.encode(prompt, add_special_tokens=False)])
    mask = torch.ones_like(ids)
    model = _hf(vocab_size=inner.get_vocab_size(), bos_token_id=None, eos_token_id=None)
    # A random model repeats one token; banning repeats (in both libraries) makes every step differ.
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=None, no_repeat_ngram_size=1)[0, ids.shape[1] :].tolist()
    step = 4  # the end token: the one greedy decoding reaches at step 4 (and not before)
    assert free[step] not in free[:step]
    model.config.eos_token_id = free[step]
    model.save_pretrained(directory)
    (directory / "generation_config.json").unlink()  # transformers then takes the eos from config.json
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    expected = theirs.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                               no_repeat_ngram_size=1)[0, ids.shape[1] :].tolist()
    assert expected == free[: step + 1]
    gen = TextGenerator.from_pretrained(directory, prepack=False)
    assert gen.tokenizer.eot_token == free[step]
    completion = gen.complete(prompt, max_new_tokens=12, temperature=0, no_repeat_ngram_size=1)[0]
    assert [*completion.token_ids, free[step]] == expected and completion.finish_reason == "stop"
    assert completion.text == hf_tok.decode(expected[:-1], skip_special_tokens=True)


# out: what gpt2lite saves, others read -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fine_tuned(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fine-tuned")
    data = prepare_data(["The quick brown fox jumps over the lazy dog. " * 100], out / "data")
    config = TrainConfig(steps=3, batch_size=2, block_size=32, warmup_steps=1, progress=False, eval_interval=0)
    return train(GPT2.from_pretrained(tiny_dir), data, out, config).final_dir


def test_a_fine_tuned_model_loads_in_transformers_with_the_same_greedy_tokens(fine_tuned):
    names = {p.name for p in fine_tuned.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json", "README.md"} <= names
    hf_tok = transformers.AutoTokenizer.from_pretrained(fine_tuned)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(fine_tuned).eval()
    gen = TextGenerator.from_pretrained(fine_tuned)
    prompt = "The quick brown"
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == gen.tokenizer.encode(prompt)
    expected = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                               pad_token_id=hf_tok.eos_token_id)
    assert gen(prompt, max_new_tokens=12, temperature=0) == hf_tok.decode(expected[0, ids.shape[1] :],
                                                                           skip_special_tokens=True)
    assert theirs.generation_config.eos_token_id == 50256
    card = (fine_tuned / "README.md").read_text()
    assert "3 steps" in card and "final training loss" in card


def test_push_uploads_the_folder_through_the_hub_api(fine_tuned, tmp_path, capsys, monkeypatch):
    calls = []

    class FakeHub:  # records what huggingface_hub.HfApi would be asked; nothing leaves the machine
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            calls.append(("files", sorted(p.name for p in __import__("pathlib").Path(kwargs["folder_path"])
                                          .iterdir())))

    assert push_to_hub(fine_tuned, "me/tiny", api=FakeHub(), private=True) == "https://huggingface.co/me/tiny"
    assert calls[0][0] == "create_repo" and calls[0][2]["private"] is True
    assert calls[1][1] == "me/tiny" and "README.md" in calls[2][1] and "model.safetensors" in calls[2][1]
    bare = tmp_path / "bare"
    shutil.copytree(fine_tuned, bare)
    (bare / "README.md").unlink()
    push_to_hub(bare, "me/bare", api=FakeHub())
    assert "me/bare" in (bare / "README.md").read_text()
    import gpt2lite.io.hub as hub_module

    monkeypatch.setattr(hub_module, "push_to_hub", lambda *a, **k: "https://huggingface.co/me/cli")
    assert main(["push", str(fine_tuned), "me/cli"]) == 0 and "me/cli" in capsys.readouterr().out


def test_a_model_remembers_where_it_came_from(tiny_dir):
    assert GPT2.from_pretrained(tiny_dir).name_or_path == str(tiny_dir)
    assert TextGenerator.from_pretrained(tiny_dir).name == str(tiny_dir)


def test_saved_gpt2_tokenizer_files_equal_the_published_ones(tmp_path):
    Tokenizer.gpt2().save(tmp_path)
    reread = Tokenizer.from_pretrained(tmp_path)
    assert reread.fingerprint == Tokenizer.gpt2().fingerprint
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer" and config["eos_token"] == "<|endoftext|>"


def test_gpt2_config_from_the_preset_round_trips(tmp_path):
    config = GPT2Config.from_preset("tiny", tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True)
    GPT2(config).save_pretrained(tmp_path)
    assert load_model(tmp_path).config == config


def test_generation_config_sampling_settings_are_the_default_options(tiny_dir, tmp_path):
    from gpt2lite import GenerationOptions, save_model

    m = tmp_path / "m"
    shutil.copytree(tiny_dir, m)
    transformers.GenerationConfig(do_sample=False, max_new_tokens=9, repetition_penalty=1.5,
                                  no_repeat_ngram_size=2).save_pretrained(m)
    gen = TextGenerator.from_pretrained(m, prepack=False)
    assert gen.defaults == GenerationOptions(temperature=0.0, max_new_tokens=9, repetition_penalty=1.5,
                                             no_repeat_ngram_size=2)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(m).eval()
    prompt = "The quick brown fox"
    ids = torch.tensor([gen.tokenizer.encode(prompt)])
    expected = theirs.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=50256)[0, ids.shape[1] :]
    assert gen.complete(prompt)[0].token_ids == expected.tolist() and len(expected) == 9
    assert gen(prompt) == gen.tokenizer.decode(expected.tolist())
    # Keywords apply on top of the defaults; an options object given by the caller replaces them.
    assert gen.complete(prompt, max_new_tokens=4)[0].token_ids == expected[:4].tolist()
    assert len(gen.complete(prompt, GenerationOptions(max_new_tokens=3, seed=0))[0].token_ids) == 3
    transformers.GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.9).save_pretrained(m)
    assert TextGenerator.from_pretrained(m, prepack=False).defaults == GenerationOptions(temperature=0.7, top_k=20,
                                                                                          top_p=0.9)
    transformers.GenerationConfig(num_beams=3, early_stopping=True).save_pretrained(m)  # beam search is greedy
    assert TextGenerator.from_pretrained(m, prepack=False).defaults == GenerationOptions(
        temperature=0.0, num_beams=3, early_stopping=True)
    # What save_model writes (token ids only) changes nothing.
    saved = save_model(GPT2.from_pretrained(tiny_dir), tmp_path / "saved")
    assert set(json.loads((saved / "generation_config.json").read_text())) <= {"bos_token_id", "eos_token_id",
                                                                               "pad_token_id"}
    assert TextGenerator.from_pretrained(saved, prepack=False).defaults == GenerationOptions()
