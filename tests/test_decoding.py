"""The decoding toolkit against transformers' generate, the OpenAI formulas and exact distributions."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from gpt2lite import GPT2, GenerationOptions, GPT2Config, TextGenerator, generate, iter_steps, left_pad
from gpt2lite.cli import main
from gpt2lite.generation.processors import (
    apply_logit_bias,
    apply_presence_frequency_penalty,
    ban_bad_words,
    ban_repeated_ngrams,
)


def batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return left_pad([torch.randint(0, 50257, (n,), generator=g).tolist() for n in lengths], 50256)


def common_token(model, ids, mask):
    """A token the model emits early in row 0: used as the end token so that rows really finish."""
    free = generate(model, ids, attention_mask=mask, max_new_tokens=6, temperature=0, ignore_eos=True)
    return int(free[0, ids.shape[1] + 3])


def hf_generate(hf, ids, mask, **kw):
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=50256, **kw)


BEAMS = list(itertools.product([2, 4], [1.0, 0.5, 2.0], [False, True, "never"], [0, 2]))
# The quick loop (-m "not slow") runs these 9 of the 36, in which every pair of values of two settings appears.
QUICK_BEAMS = [(2, 1.0, False, 0), (2, 0.5, True, 2), (2, 2.0, "never", 2), (4, 1.0, True, 2), (4, 0.5, "never", 0),
               (4, 2.0, False, 2), (4, 1.0, "never", 2), (4, 0.5, False, 2), (4, 2.0, True, 0)]


@pytest.mark.parametrize(("num_beams", "length_penalty", "early_stopping", "ngram"),
                         [b if b in QUICK_BEAMS else pytest.param(*b, marks=pytest.mark.slow) for b in BEAMS])
def test_beam_search_equals_transformers_tiny(tiny, hf_tiny, num_beams, length_penalty, early_stopping, ngram):
    ids, mask = batch([7, 13, 1, 10])
    eos = common_token(tiny, ids, mask)
    kw = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
              no_repeat_ngram_size=ngram, num_return_sequences=2, max_new_tokens=16, eos_token_id=eos)
    ours = generate(tiny, ids, attention_mask=mask, temperature=0, pad_token_id=50256, **kw)
    assert torch.equal(ours, hf_generate(hf_tiny, ids, mask, **kw))


@pytest.mark.slow
@pytest.mark.parametrize(("num_beams", "length_penalty", "early_stopping"),
                         [(3, 1.0, False), (4, 0.7, True), (2, 1.5, "never")])
def test_beam_search_equals_transformers_124m(model_124m, hf_124m, num_beams, length_penalty, early_stopping):
    ids, mask = batch([7, 19, 1, 12], seed=1)
    eos = common_token(model_124m, ids, mask)
    kw = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping, max_new_tokens=10,
              eos_token_id=eos, no_repeat_ngram_size=3)
    ours = generate(model_124m, ids, attention_mask=mask, temperature=0, pad_token_id=50256, **kw)
    assert torch.equal(ours, hf_generate(hf_124m, ids, mask, **kw))


def test_beam_search_output_scores_and_reasons(tiny, hf_tiny):
    ids, mask = batch([5, 9], seed=2)
    eos = common_token(tiny, ids, mask)
    kw = dict(num_beams=3, num_return_sequences=3, max_new_tokens=12, eos_token_id=eos)
    out = generate(tiny, ids, attention_mask=mask, temperature=0, pad_token_id=50256, return_dict=True, **kw)
    with torch.no_grad():
        theirs = hf_tiny.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=50256,
                                  return_dict_in_generate=True, output_scores=True, **kw)
    assert torch.equal(out.sequences, theirs.sequences)
    assert torch.allclose(out.scores, theirs.sequences_scores, atol=1e-4)
    new = out.sequences[:, ids.shape[1] :]
    assert out.finish_reason == ["stop" if eos in row else "length" for row in new.tolist()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw",
    [
        dict(no_repeat_ngram_size=2),
        dict(no_repeat_ngram_size=1),
        dict(bad_words_ids=[[1000], [5, 6], [31, 32, 33]]),
        dict(min_new_tokens=9),
        dict(repetition_penalty=1.5, no_repeat_ngram_size=3),
    ],
    ids=str,
)
def test_greedy_controls_equal_transformers(model_124m, hf_124m, kw):
    ids, mask = batch([7, 19, 1, 12], seed=3)
    eos = common_token(model_124m, ids, mask)
    if "bad_words_ids" in kw:  # ban what greedy decoding would pick, so that the ban changes the output
        free = generate(model_124m, ids, attention_mask=mask, max_new_tokens=6, temperature=0, ignore_eos=True)
        eos = 50256
        kw = dict(bad_words_ids=[[int(free[1, -1])], free[2, -3:-1].tolist(), free[3, -4:-1].tolist()])
    ours = generate(model_124m, ids, attention_mask=mask, temperature=0, max_new_tokens=12, eos_token_id=eos,
                    pad_token_id=50256, **kw)
    assert torch.equal(ours, hf_generate(hf_124m, ids, mask, max_new_tokens=12, eos_token_id=eos, **kw))


@pytest.mark.slow
def test_logprobs_equal_transformers_raw_logits(model_124m, hf_124m):
    ids, mask = batch([7, 19, 1, 12], seed=4)
    out = generate(model_124m, ids, attention_mask=mask, temperature=0, max_new_tokens=8, ignore_eos=True,
                   return_dict=True, top_logprobs=5)
    with torch.no_grad():
        theirs = hf_124m.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=50256,
                                  max_new_tokens=8, min_new_tokens=8, return_dict_in_generate=True,
                                  output_logits=True)
    assert torch.equal(out.sequences, theirs.sequences)
    logp = torch.stack(theirs.logits, 1).float().log_softmax(-1)  # (B, new, V)
    new = out.sequences[:, ids.shape[1] :]
    assert torch.allclose(out.logprobs, logp.gather(2, new[..., None])[..., 0], atol=1e-4)
    top = logp.topk(5, dim=-1)
    assert torch.allclose(out.top_logprobs, top.values, atol=1e-4)
    assert torch.equal(out.top_ids[:, :, 0], top.indices[:, :, 0])
    assert out.finish_reason == ["length"] * 4


def test_sampled_logprobs_are_of_the_raw_distribution(tiny):
    """Temperature and filters change what is drawn, not the reported log-probabilities."""
    ids = torch.tensor([[5, 6, 7]])
    out = generate(tiny, ids, max_new_tokens=6, temperature=0.5, top_k=3, seed=0, ignore_eos=True,
                   return_dict=True)
    with torch.no_grad():
        logits = tiny(out.sequences)[0, 2:-1].log_softmax(-1)
    assert torch.allclose(out.logprobs[0], logits.gather(1, out.sequences[0, 3:, None])[:, 0], atol=1e-4)
    streamed = list(iter_steps(tiny, ids, max_new_tokens=6, temperature=0.5, top_k=3, seed=0, ignore_eos=True))
    assert torch.allclose(torch.stack([s.logprobs for s in streamed], 1), out.logprobs)


def test_prompt_logprobs(tiny, hf_tiny):
    ids, mask = batch([6, 3], seed=5)
    out = generate(tiny, ids, attention_mask=mask, max_new_tokens=2, return_dict=True, prompt_logprobs=True)
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as transformers' generate() derives them
        logp = hf_tiny(input_ids=ids, attention_mask=mask, position_ids=positions).logits.log_softmax(-1)
    expected = logp[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
    got = out.prompt_logprobs
    assert torch.isnan(got[:, 0]).all() and torch.isnan(got[1, :4]).all()  # no context, or padding
    assert torch.allclose(got[0, 1:], expected[0], atol=1e-4)
    assert torch.allclose(got[1, 4:], expected[1, 3:], atol=1e-4)
    alone = generate(tiny, ids, attention_mask=mask, max_new_tokens=0, return_dict=True, prompt_logprobs=True)
    assert torch.allclose(alone.prompt_logprobs, got, equal_nan=True)  # scoring a prompt, nothing generated
    beams = generate(tiny, ids, attention_mask=mask, max_new_tokens=2, return_dict=True, prompt_logprobs=True,
                     num_beams=2, temperature=0)
    assert torch.allclose(beams.prompt_logprobs, got, atol=1e-5, equal_nan=True)


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0]])
    counts = torch.tensor([[3.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    got = apply_presence_frequency_penalty(logits, counts, presence=0.5, frequency=0.25)
    # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
    expected = torch.tensor([[2.0 - 0.75 - 0.5, 1.0, 0.5 - 0.25 - 0.5, -1.0], [0.0, -0.5 - 0.5, 0.0, 0.0]])
    assert torch.allclose(got, expected)


def test_logit_bias_follows_openai(tiny):
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.equal(apply_logit_bias(logits, torch.tensor([0, 2]), torch.tensor([5.0, -1.5])),
                       torch.tensor([[6.0, 2.0, 1.5]]))
    ids = torch.tensor([[5, 6, 7]])
    forced = generate(tiny, ids, max_new_tokens=5, seed=0, logit_bias={777: 100}, ignore_eos=True)
    assert forced[0, 3:].tolist() == [777] * 5
    free = generate(tiny, ids, max_new_tokens=5, temperature=0, ignore_eos=True)[0, 3:].tolist()
    banned = generate(tiny, ids, max_new_tokens=5, temperature=0, ignore_eos=True,
                      logit_bias={t: -100 for t in free})[0, 3:].tolist()
    assert not set(banned) & set(free)


def test_presence_penalty_through_generate(tiny):
    """A huge presence penalty is a ban on generated tokens: greedy never repeats one."""
    ids = torch.tensor([[5, 6, 7]])
    out = generate(tiny, ids, max_new_tokens=20, temperature=0, ignore_eos=True, presence_penalty=2.0,
                   logit_bias={5: 0.0}, logits_processor=lambda tokens, logits: logits * 0.001)
    new = out[0, 3:].tolist()
    assert len(set(new)) == len(new)


def test_ngram_and_bad_word_bans_on_hand_built_rows():
    tokens = torch.tensor([[1, 2, 3, 1, 2], [4, 4, 4, 4, 4]])
    logits = torch.zeros(2, 6)
    banned = ban_repeated_ngrams(logits, tokens, 3) == float("-inf")
    assert banned[0].nonzero().flatten().tolist() == [3]  # "1 2" was followed by 3
    assert banned[1].nonzero().flatten().tolist() == [4]
    bad = ban_bad_words(logits, tokens, ((5,), (1, 2, 0), (3, 5)))
    assert (bad[0] == float("-inf")).nonzero().flatten().tolist() == [0, 5]
    assert (bad[1] == float("-inf")).nonzero().flatten().tolist() == [5]


def test_logits_processor_hook_runs_last_before_sampling(tiny):
    seen = []

    def only_token_9(tokens, logits):
        seen.append(tokens.shape)
        return torch.full_like(logits, float("-inf")).index_fill(1, torch.tensor([9]), 0.0)

    out = generate(tiny, [[1, 2]], max_new_tokens=4, seed=0, logits_processor=only_token_9,
                   logit_bias={9: -100}, ignore_eos=True)
    assert out[0, 2:].tolist() == [9] * 4  # the hook sees logits after the bias and decides
    assert seen == [(1, 2), (1, 3), (1, 4), (1, 5)]


def test_min_new_tokens_also_holds_stop_sequences(tiny):
    free = generate(tiny, [[3, 4]], max_new_tokens=10, temperature=0, ignore_eos=True)[0, 2:].tolist()
    out = generate(tiny, [[3, 4]], max_new_tokens=10, temperature=0, ignore_eos=True, stop=[free[1]],
                   min_new_tokens=5, return_dict=True)
    new = out.sequences[0, 2:].tolist()
    assert len(new) >= 5 and new[:5] == free[:5]


def test_truncate_prompt_left(tiny):
    long = torch.randint(0, 50257, (1, 90), generator=torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="truncate_prompt='left'"):
        generate(tiny, long, max_new_tokens=10)
    out = generate(tiny, long, max_new_tokens=10, temperature=0, truncate_prompt="left", ignore_eos=True)
    assert torch.equal(out, generate(tiny, long[:, -86:], max_new_tokens=10, temperature=0, ignore_eos=True))


def test_finish_reasons(tiny):
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    sampling = dict(max_new_tokens=8, seed=0, top_k=20)  # the tiny random model's greedy output is one token
    free = generate(tiny, ids, ignore_eos=True, **sampling)
    eos = next(t for t in free[0, 3:].tolist() if t not in free[1, 3:].tolist())  # ends row 0 only
    out = generate(tiny, ids, eos_token_id=eos, return_dict=True, **sampling)
    assert out.finish_reason == ["stop", "length"]
    end = free[0, 3:].tolist().index(eos)
    assert out.logprobs[0, end + 1 :].eq(0).all()  # after row 0's end: padding, no log-probability
    assert out.logprobs[1].lt(0).all()


# speculative decoding ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target_and_draft():
    torch.manual_seed(0)
    target = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=300)).eval()
    torch.manual_seed(1)
    draft = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=128, vocab_size=300)).eval()
    return target, draft


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_greedy_equals_greedy(target_and_draft, k):
    target, draft = target_and_draft
    g = torch.Generator().manual_seed(k)
    ids, mask = left_pad([torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 9, 1)], 0)
    plain = generate(target, ids, attention_mask=mask, max_new_tokens=30, temperature=0, ignore_eos=True)
    for d in (draft, target):  # a weak draft (many rejections) and a perfect one (all accepted)
        fast = generate(target, ids, attention_mask=mask, max_new_tokens=30, temperature=0, ignore_eos=True,
                        draft_model=d, num_draft_tokens=k)
        assert torch.equal(fast, plain)


def test_speculative_greedy_stops_like_greedy(target_and_draft):
    target, draft = target_and_draft
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = generate(target, ids, max_new_tokens=20, temperature=0, ignore_eos=True)
    eos = int(free[0, 10])
    plain = generate(target, ids, max_new_tokens=20, temperature=0, eos_token_id=eos, return_dict=True)
    fast = generate(target, ids, max_new_tokens=20, temperature=0, eos_token_id=eos, draft_model=draft,
                    num_draft_tokens=4, return_dict=True)
    assert torch.equal(fast.sequences, plain.sequences)
    assert fast.finish_reason == plain.finish_reason


def test_speculative_sampling_has_the_targets_distribution():
    """On an 8-token vocabulary: the empirical law of two sampled tokens equals the target's exact law."""
    torch.manual_seed(0)
    target = GPT2(GPT2Config(vocab_size=8, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()
    draft = GPT2(GPT2Config(vocab_size=8, n_positions=16, n_embd=16, n_layer=1, n_head=1)).eval()
    with torch.no_grad():
        target.wte.weight.mul_(30)
        draft.wte.weight.mul_(30)
        prompt = torch.tensor([[3, 1]])
        options = dict(temperature=0.9, top_p=0.95)
        from gpt2lite.generation.sampling import filtered_logits

        opts = GenerationOptions(**options)
        first = filtered_logits(target(prompt)[0, -1], opts).softmax(-1).double()  # (8,)
        pairs = torch.tensor([[3, 1, a] for a in range(8)])
        second = filtered_logits(target(pairs)[:, -1], opts).softmax(-1).double()  # (8, 8)
        exact = first[:, None] * second  # P(a, b)
        n = 20_000
        out = generate(target, prompt.expand(n, -1), max_new_tokens=2, seed=0, ignore_eos=True, draft_model=draft,
                       num_draft_tokens=2, **options)
    empirical = torch.bincount(out[:, 2] * 8 + out[:, 3], minlength=64).double().view(8, 8) / n
    assert 0.5 * (empirical - exact).abs().sum().item() < 0.02


def test_speculative_errors(target_and_draft, tiny):
    target, draft = target_and_draft
    with pytest.raises(ValueError, match="vocabulary"):
        generate(target, [[1, 2]], draft_model=tiny, max_new_tokens=3)
    with pytest.raises(ValueError, match="not penalties"):
        generate(target, [[1, 2]], draft_model=draft, max_new_tokens=3, presence_penalty=1.0)
    with pytest.raises(ValueError, match="do not combine"):
        generate(target, [[1, 2]], draft_model=draft, max_new_tokens=3, num_beams=2, temperature=0)


# options, text API and CLI -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(num_beams=2), "use temperature=0"),
        (dict(num_beams=2, temperature=0, num_return_sequences=3), "at most num_beams"),
        (dict(top_logprobs=21), "at most 20"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(logit_bias={5: 101}), r"\[-100, 100\]"),
        (dict(logit_bias={-1: 1}), "logit_bias"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(truncate_prompt="right"), "truncate_prompt"),
        (dict(bad_words_ids=[[]]), "bad_words_ids"),
        (dict(logits_processor=[3]), "logits_processor"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    ],
)
def test_bad_decoding_options(kw, match):
    with pytest.raises(ValueError, match=match):
        GenerationOptions(**kw)


def test_text_api_exposes_the_controls(tiny_dir):
    gen = TextGenerator.from_pretrained(tiny_dir)
    (completion,) = gen.complete("Hello there", max_new_tokens=6, temperature=0, top_logprobs=3,
                                 prompt_logprobs=True, ignore_eos=True)
    assert len(completion.token_ids) == len(completion.logprobs) == len(completion.top_logprobs) == 6
    assert all(len(t) == 3 for t in completion.top_logprobs)
    assert completion.finish_reason == "length"
    assert completion.prompt_logprobs[0] is None and len(completion.prompt_logprobs) == 2
    assert gen.tokenizer.decode(completion.token_ids) == completion.text
    beams = gen("Hello there", num_beams=3, num_return_sequences=2, temperature=0, max_new_tokens=5)
    assert len(beams) == 2
    free = gen("Hello there", max_new_tokens=8, temperature=0, ignore_eos=True)
    word = free.split()[0]
    assert word not in gen("Hello there", max_new_tokens=8, temperature=0, ignore_eos=True, bad_words=[word])


def test_cli_exposes_the_controls(tiny_dir, capsys):
    argv = ["generate", "Hello", "--model", str(tiny_dir), "--max-new-tokens", "5", "--temperature", "0",
            "--no-repeat-ngram-size", "2", "--logit-bias", "50256=-100", "--top-logprobs", "2", "--json",
            "--ignore-eos"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["logprobs"]) == 5 and record["finish_reason"] == "length"
    assert main(["generate", "Hello", "--model", str(tiny_dir), "--max-new-tokens", "5", "--num-beams", "3",
                 "--temperature", "0", "--early-stopping", "never"]) == 0
    assert main(["generate", "Hello", "--model", str(tiny_dir), "--max-new-tokens", "5", "--draft-model",
                 str(tiny_dir), "--temperature", "0"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "x", "--model", str(tiny_dir), "--logit-bias", "oops"])
    assert exit_info.value.code == 2 and "TOKEN_ID=BIAS" in capsys.readouterr().err
    # The library's advice comes in the CLI's own words: flags, not Python keywords.
    assert main(["generate", "word " * 200, "--model", str(tiny_dir), "--max-new-tokens", "5"]) == 1
    err = capsys.readouterr().err
    assert "pass --truncate-prompt left" in err and "truncate_prompt=" not in err, err
    assert main(["generate", "x", "--model", str(tiny_dir), "--num-beams", "2"]) == 1
    assert capsys.readouterr().err.strip().endswith("use --temperature 0")


def test_a_draw_follows_the_softmax_and_never_picks_a_removed_token():
    """A draw against the distribution it samples: frequencies within 5 standard errors."""
    from gpt2lite.generation.sampling import sample

    logits = torch.tensor([2.0, float("-inf"), 0.5, -1.0, float("-inf"), 1.0, -30.0])
    p = logits.double().softmax(-1)
    n = 200_000
    drawn = sample(logits.expand(n, -1), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=len(logits)).double()
    assert counts[1] == 0 and counts[4] == 0  # removed: probability 0
    assert bool(((counts / n - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9).all()), counts / n
    one = torch.full((3, 50257), float("-inf"))
    one[:, 777] = 0.0  # a single token left (top_k=1): always it
    assert sample(one).tolist() == [777, 777, 777]
