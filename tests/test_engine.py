"""The decoding engine: sessions that own their state, rows refilled mid-batch, the model protocol, options."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import gpt2lite
import gpt2lite.generation.session
from gpt2lite import (
    GPT2,
    DecoderModel,
    DecodeSession,
    DecodeState,
    GenerationOptions,
    generate,
    iter_tokens,
    left_pad,
)
from gpt2lite.cli import build_parser
from gpt2lite.generation.options import GenerationKwargs


def random_prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50257, (n,), generator=g).tolist() for n in lengths]


def solo(model, prompt, n):
    return generate(model, [prompt], max_new_tokens=n, temperature=0, ignore_eos=True)[0, len(prompt) :].tolist()


@pytest.mark.parametrize("which", ["tiny", pytest.param("model_124m", marks=pytest.mark.slow)])
def test_row_refilled_mid_batch_equals_solo(which, request):
    """Row 1 gets a new prompt at step 5 while row 0 keeps decoding: each row's tokens equal its solo run."""
    model = request.getfixturevalue(which)
    first, second, refill = random_prompts([6, 9, 4], seed=1)
    steps = 12
    session = DecodeSession(model, batch_size=2, max_length=64)
    ids, mask = left_pad([first, second], 50256)
    out: list[list[int]] = [[], []]
    with torch.no_grad():
        logits = session.feed(ids, input_mask=mask)[:, -1]
        for step in range(steps):
            if step == 5:
                # Row 1 is emptied and its new prompt prefilled alone; row 0 is not fed at all.
                session.reset([1])
                logits[1] = session.feed(torch.tensor([refill]), rows=[1])[0, -1]
                out[1] = []
            nxt = logits.argmax(-1)
            for r in range(2):
                out[r].append(int(nxt[r]))
            logits = session.feed(nxt[:, None])[:, -1]
    assert out[0] == solo(model, first, steps)
    assert out[1] == solo(model, refill, steps - 5)


def test_reorder_and_truncate(tiny):
    a, b = random_prompts([5, 5], seed=2)
    session = DecodeSession(tiny, batch_size=2, max_length=32)
    with torch.no_grad():
        session.feed(torch.tensor([a, b]))
        session.reorder([1, 1])  # both rows now hold prompt b
        logits = session.feed(torch.tensor([[7], [7]]))[:, -1]
        expected = tiny(torch.tensor([[*b, 7]]))[0, -1]
        assert torch.allclose(logits[0], expected, atol=1e-4) and torch.allclose(logits[1], expected, atol=1e-4)
        # Cut row 0 back to its prompt, then feed another token: as if the 7 had never been fed.
        session.truncate([0], [5])
        logits = session.feed(torch.tensor([[9]]), rows=[0])[0, -1]
        assert torch.allclose(logits, tiny(torch.tensor([[*b, 9]]))[0, -1], atol=1e-4)
    with pytest.raises(ValueError, match="cannot truncate row 0 to 9"):
        session.truncate([0], [9])


def test_interleaved_compiled_streams_each_give_their_solo_output(tiny, monkeypatch):
    """Two compile=True streams of the same batch size, stepped alternately, never share a cache."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the fixed-shape path, uncompiled here
    monkeypatch.setattr(gpt2lite.generation.session, "_COMPILED", {})
    p, q = random_prompts([4, 7], seed=3)
    a = iter_tokens(tiny, [p], max_new_tokens=10, temperature=0, ignore_eos=True, compile=True)
    b = iter_tokens(tiny, [q], max_new_tokens=10, temperature=0, ignore_eos=True, compile=True)
    got_a, got_b = [], []
    for ta, tb in zip(a, b, strict=True):
        got_a.append(int(ta[0]))
        got_b.append(int(tb[0]))
    assert got_a == solo(tiny, p, 10)
    assert got_b == solo(tiny, q, 10)
    # Nothing was left on the model: no hidden cache, the same parameters and buffers.
    assert not [k for k in vars(tiny) if "decoder" in k or "cache" in k]


def test_compiled_step_matches_eager_with_padding(tiny, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setattr(gpt2lite.generation.session, "_COMPILED", {})
    ids, mask = left_pad(random_prompts([3, 9, 6], seed=10), 50256)
    static = generate(tiny, ids, attention_mask=mask, max_new_tokens=15, temperature=0, compile=True)
    eager = generate(tiny, ids, attention_mask=mask, max_new_tokens=15, temperature=0)
    assert torch.equal(static, eager)


@pytest.mark.slow
def test_compiled_step_really_compiles_on_cpu(tiny):
    """torch.compile (inductor, on the CPU here) traces the static step in one graph; same tokens as eager."""
    ids = torch.tensor(random_prompts([5, 5], seed=11))
    compiled = generate(tiny, ids, max_new_tokens=6, temperature=0, ignore_eos=True, compile=True)
    assert torch.equal(compiled, generate(tiny, ids, max_new_tokens=6, temperature=0, ignore_eos=True))


@pytest.mark.slow
def test_compiling_many_models_in_one_process_never_hits_dynamos_graph_limit(tiny, monkeypatch):
    """Each model structure has a compiled step of its own; past the limit a session goes on eagerly."""
    monkeypatch.setattr(gpt2lite.generation.session, "_COMPILED", {})
    shallow = GPT2(dataclasses.replace(tiny.config, n_layer=1)).eval()
    ids = torch.tensor(random_prompts([4], seed=12))
    # Dynamo's limit of graphs per function is 8; at 1, a second structure is enough to reach it.
    with torch._dynamo.config.patch(recompile_limit=1):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # both compiled: neither may fall back to eager
            for model in (tiny, shallow):  # the second used to fail: "Hard failure due to fullgraph=True"
                compiled = generate(model, ids, max_new_tokens=4, temperature=0, ignore_eos=True, compile=True)
                assert torch.equal(compiled, generate(model, ids, max_new_tokens=4, temperature=0, ignore_eos=True))
        assert len(gpt2lite.generation.session._COMPILED) == 2  # a compiled step for each structure
        # A second batch size of the same structure would be that step's second graph: refused, so eager.
        wide = ids.repeat(2, 1)
        with pytest.warns(RuntimeWarning, match="this session goes on eagerly"):
            compiled = generate(shallow, wide, max_new_tokens=4, temperature=0, ignore_eos=True, compile=True)
        assert torch.equal(compiled, generate(shallow, wide, max_new_tokens=4, temperature=0, ignore_eos=True))


@pytest.mark.slow
def test_a_full_compiled_session_refuses_the_next_token_as_eager_does(tiny):
    """A compiled step cannot raise inside its graph: the room is checked on the host first (it overran)."""
    ids = torch.tensor(random_prompts([4, 4], seed=13))
    for compile in (False, True):
        session = DecodeSession(tiny, batch_size=2, max_length=6, compile=compile)
        session.feed(ids)
        session.feed(torch.tensor([[9], [9]]))
        session.feed(torch.tensor([[9], [9]]))  # all 6 slots filled
        with pytest.raises(ValueError, match="the cache holds 6 slots per row; 7 are needed"):
            session.feed(torch.tensor([[9], [9]]))
        session.truncate([0, 1], [5, 5])  # room again: the refused token was not counted
        logits = session.feed(torch.tensor([[9], [9]]))[:, -1]
        expected = tiny(torch.cat([ids, torch.full((2, 2), 9)], dim=1))[:, -1]
        assert torch.allclose(logits, expected, atol=1e-4)


class ToyRNNState:
    """One hidden vector per row."""

    def __init__(self, batch_size: int, hidden: int) -> None:
        self.h = torch.zeros(batch_size, hidden)

    @property
    def batch_size(self) -> int:
        return self.h.shape[0]

    @property
    def device(self) -> torch.device:
        return self.h.device

    def reset(self, rows=None) -> None:
        self.h[slice(None) if rows is None else list(rows)] = 0

    def reorder(self, index) -> None:
        self.h = self.h[torch.as_tensor(index)]

    def truncate(self, rows, lengths) -> None:
        raise NotImplementedError("a recurrent state cannot be cut back")


class ToyRNN(torch.nn.Module):
    """A tanh RNN over a 12-token vocabulary, in a few lines: not a transformer, no KV cache."""

    config = dataclasses.make_dataclass("C", [("vocab_size", int, 12), ("n_positions", object, None),
                                              ("eos_token_id", object, 11)])()

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(12, 16)
        self.rec = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 12)

    def cell(self, h: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.emb(token) + self.rec(h))

    def new_state(self, batch_size, max_length, *, static=False) -> ToyRNNState:
        return ToyRNNState(batch_size, 16)

    def feed(self, input_ids, state, *, input_mask=None, rows=None, last_only=True):
        index = slice(None) if rows is None else list(rows)
        h, outs = state.h[index], []
        for t in range(input_ids.shape[1]):
            new = self.cell(h, input_ids[:, t])
            if input_mask is not None:
                new = torch.where(input_mask[:, t, None].bool(), new, h)  # padding leaves the state as it was
            h = new
            outs.append(self.out(h))
        state.h[index] = h
        logits = torch.stack(outs, dim=1)  # (R, T, vocab)
        return logits[:, -1:] if last_only else logits


def toy_greedy(model: ToyRNN, prompt: list[int], n: int) -> list[int]:
    """The recurrence run by hand, one token at a time, with no engine."""
    h = torch.zeros(1, 16)
    for t in prompt:
        h = model.cell(h, torch.tensor([t]))
    out = []
    for _ in range(n):
        nxt = int(model.out(h).argmax(-1))
        out.append(nxt)
        if nxt == model.config.eos_token_id:
            break
        h = model.cell(h, torch.tensor([nxt]))
    return out


def test_toy_recurrent_model_runs_through_generate_and_iter_tokens():
    model = ToyRNN().eval()
    assert isinstance(model, DecoderModel) and isinstance(model.new_state(1, 1), DecodeState)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    ids, mask = left_pad(prompts, 0)
    with torch.no_grad():
        out = generate(model, ids, attention_mask=mask, max_new_tokens=20, temperature=0)
        streamed = torch.stack(list(iter_tokens(model, ids, attention_mask=mask, max_new_tokens=20, temperature=0)), 1)
        for row, prompt in enumerate(prompts):
            expected = toy_greedy(model, prompt, 20)
            assert out[row, ids.shape[1] : ids.shape[1] + len(expected)].tolist() == expected
            assert streamed[row, : len(expected)].tolist() == expected
        sampled = generate(model, ids, attention_mask=mask, max_new_tokens=5, seed=0, top_k=3)
    assert sampled.shape[0] == 2


def test_eos_defaults_to_the_model_config(tiny_dir, tmp_path):
    model = GPT2.from_pretrained(tiny_dir)
    prompt = random_prompts([5], seed=4)[0]
    free = solo(model, prompt, 12)
    eos = free[6]
    k = free.index(eos)
    config = json.loads((tiny_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    (tmp_path / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    model = GPT2.from_pretrained(tmp_path)
    out = generate(model, [prompt], max_new_tokens=12, temperature=0)
    assert out[0, 5:].tolist() == free[: k + 1]  # stopped at the config's end token, which is kept
    assert generate(model, [prompt], max_new_tokens=12, temperature=0, ignore_eos=True)[0, 5:].tolist() == free


def test_options_object_and_keywords_agree(tiny):
    prompt = random_prompts([4], seed=5)
    options = GenerationOptions(max_new_tokens=8, top_k=5, seed=3)
    assert torch.equal(generate(tiny, prompt, options), generate(tiny, prompt, max_new_tokens=8, top_k=5, seed=3))
    # keywords override the object
    assert torch.equal(generate(tiny, prompt, options, seed=4), generate(tiny, prompt, options.replace(seed=4)))
    with pytest.raises(TypeError, match="GenerationOptions"):
        generate(tiny, prompt, {"seed": 3})
    # An option that cannot go together with another names only what was asked for.
    with pytest.raises(ValueError, match=r"beam search does not support compile$"):
        GenerationOptions(num_beams=2, temperature=0, compile=True)


def test_options_are_declared_once_and_reach_the_cli():
    fields = {f.name: f for f in dataclasses.fields(GenerationOptions)}
    assert set(typing.get_type_hints(GenerationKwargs)) == set(fields)
    flags = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions}
    from gpt2lite.cli.generate import _NOT_FLAGS

    for name in fields:
        assert name in flags or name in _NOT_FLAGS, f"no CLI flag for {name}"
    assert {"stop_strings", "bad_words", "draft_model"} <= set(flags)  # the text forms of those
    assert "-n" in flags["num_return_sequences"].option_strings
    args = build_parser().parse_args(["generate", "x", "--min-p", "0.1", "--repetition-penalty", "1.2", "-n", "2",
                                      "--compile", "--ignore-eos"])
    assert (args.min_p, args.repetition_penalty, args.num_return_sequences, args.compile) == (0.1, 1.2, 2, True)


def test_public_api_is_explicit_and_import_is_lazy():
    assert sorted(gpt2lite.__all__) == sorted(gpt2lite._EXPORTS)
    for name in gpt2lite.__all__:
        assert getattr(gpt2lite, name) is not None
    code = "import sys, gpt2lite, gpt2lite.cli; assert 'torch' not in sys.modules, 'torch imported at start-up'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_import_loops_between_model_and_files():
    code = ("import sys, gpt2lite.models.weights, gpt2lite.tokenizers.files;"
            "bad = {'gpt2lite.models.gpt2', 'gpt2lite.tokenizers.bpe'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_save_pretrained_file_describes_itself(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "alone.safetensors")
    loaded = GPT2.from_pretrained(tmp_path / "alone.safetensors")
    assert loaded.config == tiny.config  # n_head=4 here, which no shape tells
    ids = torch.tensor(random_prompts([8], seed=6))
    assert torch.allclose(loaded(ids), tiny(ids), atol=1e-5)
    # transformers' files carry no such metadata: the same tensors without it need config.json or config=
    save_file(load_file(tmp_path / "alone.safetensors"), str(tmp_path / "bare.safetensors"))
    with pytest.raises(gpt2lite.CheckpointError, match="config="):
        GPT2.from_pretrained(tmp_path / "bare.safetensors")
