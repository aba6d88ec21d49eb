"""Generation past the context window, transformers' other samplers, prompt lookup, and prompts from a file."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.generation import logits_process as hf

from gpt2lite import GPT2, GenerationOptions, GPT2Config, TextGenerator, generate, left_pad
from gpt2lite.cli import main
from gpt2lite.generation.context import shifted
from gpt2lite.generation.sampling import epsilon_filter, eta_filter, filtered_logits, typical_filter


def _reference(hf_model, prompt: list[int], new: int, context: int, n_keep: int) -> list[int]:
    """The definition of a context shift, run literally on transformers: a full forward each step.

    Only the last position's logits are read, so only they are projected to the vocabulary (logits_to_keep=1).
    """
    window, out = list(prompt), []
    for _ in range(new):
        if len(window) == context:
            window = window[:n_keep] + window[n_keep + (context - n_keep) // 2 :]
        with torch.no_grad():
            token = int(hf_model(torch.tensor([window]), logits_to_keep=1).logits[0, -1].argmax())
        window.append(token)
        out.append(token)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("n_keep", [0, 7])
def test_context_shift_equals_the_reference_loop(tiny, hf_tiny, n_keep):
    context = tiny.config.n_positions  # 96
    prompt = torch.randint(0, 50257, (20,), generator=torch.Generator().manual_seed(n_keep)).tolist()
    new = 2 * context  # several shifts
    out = generate(tiny, [prompt], max_new_tokens=new, temperature=0, ignore_eos=True, context_shift=True,
                   n_keep=n_keep)
    assert out[0, 20:].tolist() == _reference(hf_tiny, prompt, new, context, n_keep)


@pytest.mark.slow
def test_rows_of_different_lengths_shift_on_their_own(tiny, hf_tiny):
    context = tiny.config.n_positions
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in (5, 40, context)]
    ids, mask = left_pad(prompts, 0)
    out = generate(tiny, ids, attention_mask=mask, max_new_tokens=120, temperature=0, ignore_eos=True,
                   context_shift=True, n_keep=3)
    for row, prompt in enumerate(prompts):
        assert out[row, ids.shape[1] :].tolist() == _reference(hf_tiny, prompt, 120, context, 3)


@pytest.mark.slow
def test_context_shift_through_the_text_api_and_its_limits(tiny_dir):
    gen = TextGenerator.from_pretrained(tiny_dir)
    long = gen("Once upon a time", max_new_tokens=300, seed=1, context_shift=True, ignore_eos=True)
    streamed = "".join(gen.stream("Once upon a time", max_new_tokens=300, seed=1, context_shift=True,
                                  ignore_eos=True))
    assert streamed == long and len(gen.tokenizer.encode(long)) > 250
    with pytest.raises(ValueError, match="context_shift=True"):
        gen("Once upon a time", max_new_tokens=300)
    with pytest.raises(ValueError, match="n_keep"):
        gen("x", max_new_tokens=5, context_shift=True, n_keep=95)
    with pytest.raises(ValueError, match="not with beam search"):
        GenerationOptions(context_shift=True, num_beams=2, temperature=0)


def test_shifted_keeps_the_first_tokens_and_the_later_half():
    assert shifted(list(range(8)), context=8, n_keep=0) == [4, 5, 6, 7]
    assert shifted(list(range(8)), context=8, n_keep=3) == [0, 1, 2, 5, 6, 7]


# samplers ------------------------------------------------------------------------------------------


def _logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 200, generator=g) * 3
    logits[0, :50] = float("-inf")  # already filtered tokens
    logits[1] = 0.0  # a flat row
    return logits


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.999])
def test_typical_filter_equals_transformers(mass):
    for seed in range(3):
        logits = _logits(seed)
        expected = hf.TypicalLogitsWarper(mass=mass)(None, logits.clone())
        assert torch.equal(typical_filter(logits, mass).isinf(), expected.isinf())


@pytest.mark.parametrize("epsilon", [1e-4, 3e-3, 0.02, 0.5])
def test_epsilon_and_eta_filters_equal_transformers(epsilon):
    for seed in range(3):
        logits = _logits(seed)
        ours_eps, theirs_eps = epsilon_filter(logits, epsilon), hf.EpsilonLogitsWarper(epsilon)(None, logits.clone())
        ours_eta = eta_filter(logits, epsilon)
        theirs_eta = hf.EtaLogitsWarper(epsilon, device="cpu")(None, logits.clone())
        assert torch.equal(ours_eps.isinf(), theirs_eps.isinf())
        assert torch.equal(ours_eta.isinf(), theirs_eta.isinf())


def test_every_filter_in_transformers_order():
    logits = _logits(7)[[0, 2, 3]]  # (a flat row would only test how top-p breaks ties)
    opts = GenerationOptions(temperature=0.7, top_k=120, top_p=0.9, min_p=0.01, typical_p=0.8, epsilon_cutoff=1e-3,
                             eta_cutoff=2e-3)
    scores = logits.clone()
    for warper in (hf.TemperatureLogitsWarper(0.7), hf.TopKLogitsWarper(120), hf.TopPLogitsWarper(0.9),
                   hf.MinPLogitsWarper(0.01), hf.TypicalLogitsWarper(0.8), hf.EpsilonLogitsWarper(1e-3),
                   hf.EtaLogitsWarper(2e-3, device="cpu")):
        scores = warper(None, scores)
    torch.testing.assert_close(filtered_logits(logits, opts).softmax(-1), scores.softmax(-1))


def test_a_tiny_typical_p_keeps_one_token_as_transformers(tiny, hf_tiny):
    """At every step the token kept is the one transformers' typical warper keeps on its own model's logits.

    Teacher-forced along our sequence: a whole sampled run hinges on ties of |log p + H|,
    which transformers keeps together and samples from with the global generator.
    """
    prompt = torch.tensor([[464, 3290, 318]])
    ours = generate(tiny, prompt, max_new_tokens=15, typical_p=1e-6, seed=0, ignore_eos=True)
    with torch.no_grad():
        logits = hf_tiny(ours).logits[0, prompt.shape[1] - 1 : -1]  # (15, vocab): the logits before each new token
    kept = hf.TypicalLogitsWarper(1e-6)(None, logits.clone()).isfinite()  # (15, vocab)
    p = logits.log_softmax(-1)
    shifted = (-p - (-(p.exp() * p).nansum(-1, keepdim=True))).abs()  # |(-log p) - H|
    for t, token in enumerate(ours[0, prompt.shape[1] :].tolist()):
        theirs = kept[t].nonzero().flatten().tolist()
        assert token in theirs or shifted[t, token] - shifted[t, theirs].min() < 1e-5, (t, token, theirs)
    # transformers keeps every token tied with the most typical one (|log p + H| equal in float32), then
    # samples among them: why a whole sampled run may differ while each step agrees.
    assert int(kept.sum(-1).min()) == 1


# prompt lookup ----------------------------------------------------------------------------------------


def test_prompt_lookup_greedy_equals_plain_greedy(tiny):
    g = torch.Generator().manual_seed(5)
    base = torch.randint(0, 50257, (12,), generator=g).tolist()
    prompts = [base * 3, base[:5] * 4 + [7], [1, 2, 3]]  # repetitive text to copy from, and none
    ids, mask = left_pad(prompts, 0)
    plain = generate(tiny, ids, attention_mask=mask, max_new_tokens=25, temperature=0, ignore_eos=True)
    for k in (1, 4, 10):
        fast = generate(tiny, ids, attention_mask=mask, max_new_tokens=25, temperature=0, ignore_eos=True,
                        prompt_lookup_num_tokens=k)
        assert torch.equal(fast, plain)


def test_prompt_lookup_sampling_has_the_targets_distribution():
    """On an 8-token vocabulary: the empirical law of two sampled tokens equals the target's exact law."""
    torch.manual_seed(0)
    target = GPT2(GPT2Config(vocab_size=8, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()
    with torch.no_grad():
        target.wte.weight.mul_(30)
        prompt = torch.tensor([[3, 1, 5, 3, 1]])  # "3 1" occurred before: "5" is proposed
        opts = GenerationOptions(temperature=0.9)
        first = filtered_logits(target(prompt)[0, -1], opts).softmax(-1).double()
        pairs = torch.cat([prompt.expand(8, -1), torch.arange(8)[:, None]], 1)
        second = filtered_logits(target(pairs)[:, -1], opts).softmax(-1).double()
        exact = first[:, None] * second
        n = 20_000
        out = generate(target, prompt.expand(n, -1), max_new_tokens=2, seed=0, ignore_eos=True, temperature=0.9,
                       prompt_lookup_num_tokens=3)
    empirical = torch.bincount(out[:, 5] * 8 + out[:, 6], minlength=64).double().view(8, 8) / n
    assert 0.5 * (empirical - exact).abs().sum().item() < 0.02


def test_prompt_lookup_cannot_stream(tiny):
    from gpt2lite import iter_steps

    with pytest.raises(ValueError, match="prompt lookup"):
        next(iter_steps(tiny, [[1, 2]], max_new_tokens=3, prompt_lookup_num_tokens=2))


# prompts from a file ----------------------------------------------------------------------------------


def test_generate_from_a_prompt_file_to_a_file(tiny_dir, tmp_path, capsys):
    gen = TextGenerator.from_pretrained(tiny_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("One day\nThe river\nIn 1990\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    assert main(["generate", "--model", str(tiny_dir), "--prompts", str(prompts), "--out", str(out),
                 "--max-new-tokens", "6", "--temperature", "0", "--batch-size", "2", "-n", "2"]) == 0
    blocks = out.read_text(encoding="utf-8").split("\n" + "=" * 20 + "\n")
    assert blocks[-1] == "" and len(blocks) == 7
    expected = gen(["One day", "The river", "In 1990"], max_new_tokens=6, temperature=0, num_return_sequences=2)
    assert blocks[:-1] == [t for group in expected for t in group]
    assert "generate" in capsys.readouterr().err  # the progress bar


def test_generate_from_jsonl_with_options_per_row(tiny_dir, tmp_path):
    gen = TextGenerator.from_pretrained(tiny_dir)
    rows = [{"prompt": "One day", "max_new_tokens": 4, "seed": 3},
            {"prompt": "Line one\nline two", "temperature": 0, "stop": ["e"]},
            {"prompt": "The river", "max_new_tokens": 4, "seed": 3}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(tiny_dir), "--prompts", str(prompts), "--out", str(out), "--jsonl",
                 "--max-new-tokens", "8"]) == 0
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [w["prompt"] for w in written] == [r["prompt"] for r in rows]  # in the file's order
    # Rows with the same options are generated together, as one batch of the text API.
    together = gen(["One day", "The river"], max_new_tokens=4, seed=3)
    assert [written[0]["completions"], written[2]["completions"]] == [[together[0]], [together[1]]]
    assert written[1]["completions"] == [gen("Line one\nline two", max_new_tokens=8, temperature=0, stop=["e"])]


def test_a_bad_prompt_row_is_named_before_anything_runs(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "colour": 1}\n', encoding="utf-8")
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--prompts", str(prompts), "--out",
                 str(tmp_path / "o"), "--jsonl"]) == 1
    assert "line 2: unknown option(s) ['colour']" in capsys.readouterr().err
