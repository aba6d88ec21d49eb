"""RNN, LSTM and GRU language models: cached decoding, training on real text, exact resume, loading, CLI."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2lite import TextGenerator, TrainConfig, generate, prepare_data, train
from gpt2lite.cli import main
from gpt2lite.models.recurrent import RecurrentConfig, RecurrentLM
from gpt2lite.training.objectives import evaluate_loss

CELLS = ["rnn", "lstm", "gru"]


def small(cell, vocab=50257, seed=0):
    torch.manual_seed(seed)
    return RecurrentLM(RecurrentConfig(cell=cell, vocab_size=vocab, n_embd=48, n_layer=2, dropout=0.1))


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """Python's own documentation, shipped with Python: real English text, offline."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[:120_000]
    return prepare_data([text], tmp_path_factory.mktemp("pydoc") / "data")


@pytest.mark.parametrize("cell", CELLS)
def test_cached_steps_equal_the_whole_sequence(cell):
    model = small(cell, vocab=300).eval()
    ids = torch.randint(0, 300, (3, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        state = model.new_state(3, 14)
        steps = [model.feed(ids[:, :6], state, last_only=False)]
        steps += [model.feed(ids[:, t : t + 1], state) for t in range(6, 14)]
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        # Left padding leaves the state as it was: a padded row equals its unpadded self.
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:1, :5]], 1)
        mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
        logits = model.feed(padded, model.new_state(1, 8), input_mask=mask)
        assert torch.allclose(logits[0, -1], full[0, 4], atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_generate_through_the_engine(cell):
    model = small(cell, vocab=300).eval()
    ids = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(1))
    out = generate(model, ids, max_new_tokens=8, temperature=0, ignore_eos=True)
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(8):  # the whole sequence re-read at each step: no state, no engine
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    assert generate(model, ids, max_new_tokens=4, seed=0, top_p=0.9).shape == (2, 9)


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS)
def test_training_on_real_text_lowers_held_out_loss(cell, text_data, tmp_path):
    model = small(cell)
    config = TrainConfig(steps=25, batch_size=8, block_size=64, lr=1e-2, min_lr=1e-3, warmup_steps=4,
                         eval_interval=0, eval_batches=4, save_interval=0, progress=False)
    before = evaluate_loss(model, text_data, block_size=64, batches=4, batch_size=8)
    result = train(model, text_data, tmp_path / "run", config)
    after = result.val_losses[-1][1]
    assert before > 10.0  # chance: ln(50257) = 10.8
    assert after < 7.0, (before, after)  # perplexity under 1100 of 50257 after 25 steps
    gen = TextGenerator.from_pretrained(result.final_dir)
    assert isinstance(gen.model, RecurrentLM) and gen.model.config.cell == cell
    assert gen.perplexity("The import statement finds a module.") < math.exp(10)
    assert isinstance(gen("The import statement", max_new_tokens=8, seed=0), str)


@pytest.mark.slow
def test_resume_is_exact(text_data, tmp_path):
    config = TrainConfig(steps=6, batch_size=4, block_size=32, warmup_steps=1, save_interval=3, eval_interval=0,
                         eval_batches=2, progress=False)
    whole = small("lstm")
    full = train(whole, text_data, tmp_path / "a", config)

    class Stop(Exception):
        pass

    def stop_after_3(done, record):
        if done == 3:
            raise Stop

    first = small("lstm")
    with pytest.raises(Stop):
        train(first, text_data, tmp_path / "b", config, callbacks=[stop_after_3])
    resumed = small("lstm", seed=123)  # other weights: everything comes from the checkpoint
    again = train(resumed, text_data, tmp_path / "b", config, resume=True)
    assert again.losses == full.losses
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_cli_finetune_generate_perplexity(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 300, encoding="utf-8")
    out = tmp_path / "gru"
    assert main(["finetune", "--arch", "gru", "--data", str(corpus), "--out", str(out), "--steps", "5",
                 "--batch-size", "2", "--block-size", "32", "--n-embd", "32", "--n-layer", "1",
                 "--warmup-steps", "1", "--eval-interval", "0", "--save-interval", "0", "--device", "cpu"]) == 0
    assert main(["generate", "The quick", "--model", str(out / "final"), "--max-new-tokens", "5", "--seed", "0",
                 "--device", "cpu"]) == 0
    assert main(["perplexity", str(corpus), "--model", str(out / "final"), "--device", "cpu"]) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) > 1
    assert main(["finetune", "--arch", "lstm", "--preset", "tiny", "--data", str(corpus), "--out",
                 str(tmp_path / "x")]) == 1


def test_char_tokenizer():
    from gpt2lite import CharTokenizer

    tok = CharTokenizer.from_texts(["naïve café", "日本"])
    text = "café naïve 日本"
    assert tok.decode(tok.encode(text)) == text
    assert tok.n_vocab == len(set("naïve café日本")) + 1 and tok.eot_token == tok.n_vocab - 1
    decoder = tok.stream_decoder()
    assert "".join(decoder.add(t) for t in tok.encode(text)) == text
    with pytest.raises(ValueError, match="'z' is not in this character vocabulary"):
        tok.encode("zebra")


@pytest.mark.slow
@pytest.mark.parametrize("arch", [["--arch", "lstm"], ["--preset", "tiny"]], ids=["lstm", "gpt2"])
def test_cli_char_level_models(arch, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 200, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["finetune", *arch, "--char", "--data", str(corpus), "--out", str(out), "--steps", "30",
                 "--batch-size", "8", "--block-size", "32", "--lr", "1e-2", "--warmup-steps", "2",
                 "--eval-interval", "0", "--save-interval", "0", "--device", "cpu"]) == 0
    capsys.readouterr()
    gen = TextGenerator.from_pretrained(out / "final")
    assert gen.tokenizer.n_vocab == len(set("to be or not to be, that is the question. ")) + 1
    assert gen.model.config.vocab_size == gen.tokenizer.n_vocab
    text = gen("to be", max_new_tokens=40, seed=0)
    assert set(text) <= set("to be or not to be, that is the question. ")
    assert gen.perplexity("to be or not to be, that is the question.") < 8  # of 20 characters after 30 steps
    assert main(["generate", "to be", "--model", str(out / "final"), "--max-new-tokens", "10", "--seed", "0"]) == 0
    with pytest.raises(ValueError, match="not in this character vocabulary"):
        gen("xyz", max_new_tokens=2)
