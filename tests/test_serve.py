"""The OpenAI-compatible server, driven by the official openai client on 127.0.0.1, bounded in count and time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from transformers import GPT2TokenizerFast

from gpt2lite import GPT2, GenerationOptions, GPT2Config, TextGenerator, Tokenizer
from gpt2lite.serve.app import ServerOptions, create_app
from gpt2lite.serve.scheduler import Request, Scheduler
from gpt2lite.text import chat
from gpt2lite.tokenizers.files import bundled_gpt2_files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_app(gen, options, **kwargs):
    """The app for a ``TextGenerator``'s model, tokenizer and chat template."""
    return create_app(gen.model, gen.tokenizer, options, chat_template=gen.chat_template, **kwargs)


@contextlib.contextmanager
def running(app):
    """Serve ``app`` on a free 127.0.0.1 port in a thread; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def gen(tiny_dir):
    return TextGenerator.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def server(gen):
    app = serve_app(gen, ServerOptions(model_name="tiny", max_batch=16, max_queue=256))
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _model_logprobs(hf_tiny, ids):
    with torch.no_grad():
        return hf_tiny(torch.tensor([ids])).logits[0].log_softmax(-1)


def test_completion_equals_the_text_api(client, gen):
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=8, temperature=0)
    assert r.choices[0].text == gen("Hello there", max_new_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (2, 8)
    assert r.object == "text_completion" and r.model == "tiny"


# Every sampling parameter the server takes, each set against TextGenerator with the same seed.
SAMPLING = [
    dict(temperature=0.9, top_p=0.8, presence_penalty=1.5, frequency_penalty=0.7),
    dict(temperature=1.2, presence_penalty=-1.0, frequency_penalty=2.0, logit_bias={"13": 5.0, "11": -100}),
    dict(temperature=0.7, extra_body=dict(top_k=20, min_p=0.05, repetition_penalty=1.3)),
    dict(temperature=0, frequency_penalty=1.0, extra_body=dict(repetition_penalty=0.8, min_tokens=5)),
    dict(temperature=1.0, stop=["e"], extra_body=dict(ignore_eos=True, stop_token_ids=[262, 13])),
]


def _text_api_options(kw):
    extra = dict(kw.get("extra_body", {}))
    options = {k: v for k, v in kw.items() if k not in ("extra_body", "stop", "logit_bias")}
    if "logit_bias" in kw:
        options["logit_bias"] = {int(k): v for k, v in kw["logit_bias"].items()}
    if "min_tokens" in extra:
        options["min_new_tokens"] = extra.pop("min_tokens")
    if "stop_token_ids" in extra:
        extra.pop("stop_token_ids")
    return {**options, **extra}


@pytest.mark.parametrize("kw", SAMPLING)
def test_every_sampling_parameter_gives_what_the_text_api_gives(client, gen, kw):
    for seed in (3, 11):
        r = client.completions.create(model="tiny", prompt="The river", max_tokens=24, seed=seed, **kw)
        token_stops = GenerationOptions(stop=[[t] for t in kw.get("extra_body", {}).get("stop_token_ids", [])])
        expected = gen("The river", token_stops, max_new_tokens=24, seed=seed, stop=kw.get("stop"),
                       **_text_api_options(kw))
        assert r.choices[0].text == expected
        streamed = client.completions.create(model="tiny", prompt="The river", max_tokens=24, seed=seed,
                                             stream=True, **kw)
        assert "".join(c.choices[0].text for c in streamed) == expected


def test_streamed_text_equals_non_streamed(client):
    for kw in (dict(temperature=0), dict(seed=5, extra_body={"top_k": 40}), dict(seed=7, temperature=0.8, top_p=0.9)):
        whole = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, **kw)
        chunks = list(client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, stream=True, **kw))
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stream_options_include_usage(client):
    chunks = list(client.completions.create(model="tiny", prompt=["a b", "c"], max_tokens=5, n=2, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.prompt_tokens == 3 and last.usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])


def test_n_and_prompt_lists(client):
    r = client.completions.create(model="tiny", prompt=["one", "two"], max_tokens=4, n=2, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0] != by_index[1]  # the n choices of a prompt draw with different seeds
    ids = client.completions.create(model="tiny", prompt=[[505], [734]], max_tokens=4, n=2, seed=1)  # "one", "two"
    assert {c.index: c.text for c in ids.choices} == by_index


def test_best_of_keeps_the_highest_mean_logprob(client):
    every = client.completions.create(model="tiny", prompt="A", max_tokens=6, n=5, seed=4, logprobs=0)
    means = {c.text: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every.choices}
    best = client.completions.create(model="tiny", prompt="A", max_tokens=6, n=2, best_of=5, seed=4)
    assert [c.text for c in sorted(best.choices, key=lambda c: c.index)] == sorted(means, key=means.get)[::-1][:2]
    assert best.usage.completion_tokens == 30  # every candidate counts, as OpenAI bills them


def test_logprobs_equal_the_models_distribution(client, gen, hf_tiny):
    r = client.completions.create(model="tiny", prompt="The cat", max_tokens=6, temperature=0, logprobs=3,
                                  echo=True)
    lp = r.choices[0].logprobs
    prompt_ids = gen.tokenizer.encode("The cat")
    ids = prompt_ids + [gen.tokenizer.encode(t)[0] for t in lp.tokens[len(prompt_ids) :]]
    logp = _model_logprobs(hf_tiny, ids)
    expected = [None] + [float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-4)
    assert r.choices[0].text.startswith("The cat")
    # Every position after the first has a dict of the best 3, the chosen token among them (3 or 4 entries).
    for i, (top, value) in enumerate(zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True), start=1):
        best = logp[i - 1].topk(3)
        assert 3 <= len(top) <= 4 and max(top.values()) == pytest.approx(float(best.values[0]), abs=1e-4)
        assert top[lp.tokens[i]] == value
    assert lp.text_offset[: len(prompt_ids)] == [0, 3]


def test_echo_scores_the_prompt_as_lm_eval_reads_it(client, hf_tiny):
    """lm-eval's loglikelihood request: token ids, echo, logprobs=1, max_tokens=1; n + 1 entries, greedy is exact."""
    ids = [464, 3797, 3332, 319, 262]
    r = client.completions.create(model="tiny", prompt=[ids], max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
    logp = _model_logprobs(hf_tiny, ids)
    for i in range(1, len(ids)):
        greedy = int(logp[i - 1].argmax()) == ids[i]
        assert (lp.token_logprobs[i] == max(lp.top_logprobs[i].values())) == greedy


def test_echo_with_no_new_tokens_scores_the_prompt(client):
    r = client.completions.create(model="tiny", prompt="The cat sat", max_tokens=0, logprobs=0, echo=True)
    choice = r.choices[0]
    assert choice.text == "The cat sat" and r.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.token_logprobs) == 3
    assert all(v < 0 for v in choice.logprobs.token_logprobs[1:])


def test_streamed_echo_keeps_the_prompt_logprobs(client):
    whole = client.completions.create(model="tiny", prompt="The cat sat", max_tokens=4, logprobs=1, echo=True,
                                      temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="The cat sat", max_tokens=4, logprobs=1, echo=True,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    values = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == whole.choices[0].logprobs.tokens
    assert values == whole.choices[0].logprobs.token_logprobs
    assert offsets == whole.choices[0].logprobs.text_offset


def test_partial_characters_are_written_as_bytes_with_consistent_offsets(client, gen):
    prompt = "Tea 🍵 and 山"  # the emoji and the CJK character are split over several tokens
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, logprobs=0, echo=True)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    ids = gen.tokenizer.encode(prompt)
    raw = [gen.tokenizer.decode_token_bytes(t) for t in ids]
    for token, data in zip(lp.tokens, raw, strict=False):
        try:
            assert token == data.decode("utf-8")
        except UnicodeDecodeError:
            assert token == "bytes:" + "".join(f"\\x{b:02x}" for b in data)
    assert any(t.startswith("bytes:\\x") for t in lp.tokens)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        if not token.startswith("bytes:"):
            assert text[offset : offset + len(token)] == token


def test_stop_strings(client):
    free = client.completions.create(model="tiny", prompt="Hi", max_tokens=10, seed=3).choices[0].text
    stop = free[3:6]
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=10, seed=3, stop=[stop])
    assert r.choices[0].text == free[: free.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_streaming_past_the_context_with_a_context_shift(server, client, gen):
    body = dict(model="tiny", prompt="Far away", max_tokens=150, temperature=0,
                extra_body={"context_shift": True, "n_keep": 2, "ignore_eos": True})
    before = server[1].state.scheduler.stats.context_shifts
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **body))
    expected = gen("Far away", max_new_tokens=150, temperature=0, context_shift=True, n_keep=2, ignore_eos=True)
    assert streamed == expected
    assert server[1].state.scheduler.stats.context_shifts >= before + 2  # 96 positions, 152 tokens
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="Far away", max_tokens=150)


def test_null_suffix_and_null_max_tokens(client, gen):
    r = client.completions.create(model="tiny", prompt="Go", max_tokens=None, suffix=None, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == gen.model.config.n_positions - 1  # up to the context
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="tiny", prompt="Go", suffix="end")


def test_models_list_retrieve_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4")
    assert "tiny" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"
    missing = httpx.get(server[0] + "/v1/nothing")
    assert missing.status_code == 404 and "no such endpoint" in missing.json()["error"]["message"]


def test_tokenize_and_detokenize(server, gen):
    url = server[0]
    r = httpx.post(url + "/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["tokens"] == gen.tokenizer.encode("Hello world") and r["count"] == 2 and r["max_model_len"] == 96
    assert r["token_strs"] == ["Hello", " world"]
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    chat = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == gen.tokenizer.encode("Hi<|endoftext|>", allowed_special="all")
    assert httpx.post(url + "/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert httpx.get(url + "/tokenizer_info").json()["eos_token"] == "<|endoftext|>"
    # Special-token text is the token, as transformers' tokenizer (vLLM's) reads it, in /tokenize and in prompts.
    oracle = GPT2TokenizerFast(*map(str, bundled_gpt2_files()))
    text = "Hi<|endoftext|>there"
    assert httpx.post(url + "/tokenize", json={"prompt": text}).json()["tokens"] == oracle(text).input_ids
    done = httpx.post(url + "/v1/completions", json={"prompt": text, "max_tokens": 1}).json()
    assert done["usage"]["prompt_tokens"] == len(oracle(text).input_ids) == 3


def test_chat_completions_plain_and_streamed(client, gen):
    messages = [{"role": "user", "content": "Tell me a story."}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, seed=2, temperature=0.9)
    expected = gen.chat(messages, max_new_tokens=10, seed=2, temperature=0.9)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.usage.prompt_tokens == len(gen.tokenizer.encode(
        "Tell me a story.<|endoftext|>", allowed_special="all"))
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, seed=2,
                                                 temperature=0.9, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_chat_logprobs_n_and_stop(client, gen):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text",
                                                                                         "text": "Hi"}]}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, n=2, seed=1, logprobs=True,
                                       top_logprobs=2)
    assert len(r.choices) == 2 and r.choices[0].message.content != r.choices[1].message.content
    # The same prompt through /v1/completions: the same tokens, the same log-probabilities.
    prompt = gen.tokenizer.encode("Be brief.<|endoftext|>Hi<|endoftext|>", allowed_special="all")
    plain = client.completions.create(model="tiny", prompt=[prompt], max_tokens=5, seed=1, logprobs=2)
    content = r.choices[0].logprobs.content
    assert [t.logprob for t in content] == plain.choices[0].logprobs.token_logprobs
    assert [t.token for t in content] == plain.choices[0].logprobs.tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob for t in content)
    free = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=9).choices[0]
    stop = free.message.content[2:4]
    cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=9, stop=stop).choices[0]
    assert cut.message.content == free.message.content[: free.message.content.index(stop)]
    assert cut.finish_reason == "stop"


def test_chat_accepts_what_sdks_always_send_and_names_what_it_cannot_do(client):
    messages = [{"role": "user", "content": "Hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    extras = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0, store=False,
                                            metadata={"run": "1"}, tools=[tool], tool_choice="none",
                                            response_format={"type": "text"}, service_tier="auto")
    assert extras.choices[0].message.content == plain.choices[0].message.content
    # tool_choice "auto" (the default with tools) leaves the reply text: GPT-2 has no format for choosing
    # to call; forced calls and JSON output are served (test_structured.py).
    auto = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0, tools=[tool])
    assert auto.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, modalities=["audio"])
    assert info.value.body["param"] == "modalities"


def test_top_p_zero_is_greedy_and_a_negative_seed_is_no_seed(client):
    greedy = client.completions.create(model="tiny", prompt="A b", max_tokens=8, temperature=0)
    assert client.completions.create(model="tiny", prompt="A b", max_tokens=8, top_p=0).choices[0].text == \
        greedy.choices[0].text
    assert client.completions.create(model="tiny", prompt="A b", max_tokens=2, seed=-1).choices[0].text is not None


def test_chat_template_of_the_model_is_used(tiny_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "m")
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    chat_gen = TextGenerator.from_pretrained(tmp_path / "m")
    assert chat_gen.chat_prompt([{"role": "user", "content": "Hi"}]) == "<user>Hi\n<assistant>"
    with running(serve_app(chat_gen, ServerOptions(model_name="m"))) as url:
        tokens = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert tokens["tokens"] == chat_gen.tokenizer.encode("<user>Hi\n<assistant>")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (dict(prompt="x", temperature=-1), "temperature"),
        (dict(prompt="x", top_p=1.5), "top_p"),
        (dict(prompt="x", logprobs=21), "logprobs"),
        (dict(prompt="x", max_tokens=5000), "max_tokens"),
        (dict(prompt=[99999999]), "prompt"),
        (dict(prompt="x", logit_bias={"abc": 1}), "logit_bias"),
        (dict(prompt="x", logit_bias={"99999": 1}), "logit_bias"),
        (dict(prompt="x", best_of=1, n=2), "best_of"),
        (dict(prompt="x", stop=["a"] * 65), "stop"),
        (dict(prompt="x", repetition_penalty=1e-308), "repetition_penalty"),
        (dict(prompt="x", colour="blue"), "colour"),
    ],
)
def test_bad_parameters_are_400_naming_them(server, body, param):
    r = httpx.post(server[0] + "/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_malformed_json_says_so(server):
    r = httpx.post(server[0] + "/v1/completions", content=b'{"prompt": "x",', headers={"content-type":
                                                                                            "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_api_key(gen):
    app = serve_app(gen, ServerOptions(model_name="tiny", api_key="sekret", docs=True))
    with running(app) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].text is not None
        refused = httpx.get(url + "/openapi.json")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"  # docs behind the key
        assert httpx.get(url + "/v1/models", headers={"Authorization": "bearer sekret"}).status_code == 200
        assert httpx.get(url + "/openapi.json", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(url + "/health").status_code == 200


def test_docs_are_off_by_default(server):
    assert httpx.get(server[0] + "/docs").status_code == 404
    assert httpx.get(server[0] + "/openapi.json").status_code == 404


def test_body_size_limit_is_413_before_parsing(gen):
    app = serve_app(gen, ServerOptions(model_name="tiny", max_body_size=1000))
    with running(app) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x" * 2000})
        assert r.status_code == 413 and "1000 bytes" in r.json()["error"]["message"]
        assert httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1}
                          ).status_code == 200


def test_long_text_prompt_is_refused_before_tokenizing(server):
    r = httpx.post(server[0] + "/v1/completions", json={"model": "tiny", "prompt": "word " * 200_000})
    assert r.status_code == 400 and "characters" in r.json()["error"]["message"]


def test_full_queue_is_429_and_releases_its_places(gen):
    app = serve_app(gen, ServerOptions(model_name="tiny", max_batch=1, max_queue=1))
    scheduler = app.state.scheduler
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        # More choices than the queue holds can never fit: a 400, which clients do not retry.
        with pytest.raises(openai.BadRequestError, match=r"asks for 2 completions .* queues at most 1: split it"):
            client.completions.create(model="tiny", prompt="a", max_tokens=2, n=2)
        # One request holds the only row (it shifts past the context until its client hangs up),
        # a second waits in the only place of the queue: a third is busy, 429.
        endless = {"model": "tiny", "prompt": "go", "max_tokens": 10**6, "stream": True,
                   "context_shift": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=endless, timeout=60) as first:
            _wait_for(lambda: scheduler.running == 1)
            with httpx.stream("POST", url + "/v1/completions", json=endless, timeout=60) as second:
                _wait_for(lambda: scheduler.queue_depth == 1)
                with pytest.raises(openai.RateLimitError) as info:
                    client.completions.create(model="tiny", prompt="a", max_tokens=2)
                assert "busy" in info.value.body["message"]
                assert first.status_code == second.status_code == 200
        _wait_for(lambda: scheduler.queue_depth == 0 and scheduler.running == 0)  # hung up: both cancelled
        assert len(client.completions.create(model="tiny", prompt="a", max_tokens=2).choices) == 1


def _wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_prompt_longer_than_the_context_is_a_400_before_anything_streams(client):
    long_text = "hello " * 200  # 201 tokens; the context is 96
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long_text}],
                                           stream=stream)
        error = info.value.body
        assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
        assert "maximum context length is 96 tokens" in error["message"] and "max_tokens" not in error["message"]
        with pytest.raises(openai.BadRequestError) as info:  # with max_tokens too, the prompt is to blame
            client.completions.create(model="tiny", prompt=long_text, max_tokens=5, stream=stream)
        assert info.value.body["param"] == "prompt"
        with pytest.raises(openai.BadRequestError) as info:  # a context shift starts from a prompt that fits
            client.completions.create(model="tiny", prompt=long_text, max_tokens=5, stream=stream,
                                      extra_body={"context_shift": True})
        assert info.value.body["code"] == "context_length_exceeded"


def test_litellm_raises_its_context_window_error_and_falls_back(server, monkeypatch):
    """OpenAI's wording of context_length_exceeded: LiteLLM raises ContextWindowExceededError, and falls back."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of its price list from the network
    litellm = pytest.importorskip("litellm")
    url = server[0] + "/v1"
    long_chat = [{"role": "user", "content": "hello " * 200}]
    for max_tokens in (None, 5):  # the prompt alone; the prompt with a completion
        with pytest.raises(litellm.ContextWindowExceededError):
            litellm.completion(model="openai/tiny", api_base=url, api_key="x", messages=long_chat,
                               max_tokens=max_tokens, num_retries=0)
    with pytest.raises(litellm.ContextWindowExceededError):  # fits alone, not with the completion asked
        litellm.completion(model="openai/tiny", api_base=url, api_key="x", max_tokens=90, num_retries=0,
                           messages=[{"role": "user", "content": "hello " * 20}])
    # context_window_fallbacks: the request goes on to a model with a longer context, served beside.
    torch.manual_seed(0)
    longer = GPT2(GPT2Config.from_preset("tiny", n_positions=256)).eval()
    with running(create_app(longer, Tokenizer.gpt2(), ServerOptions(model_name="long"))) as long_url:
        router = litellm.Router(model_list=[
            {"model_name": "small", "litellm_params": {"model": "openai/tiny", "api_base": url, "api_key": "x"}},
            {"model_name": "large", "litellm_params": {"model": "openai/long", "api_base": long_url + "/v1",
                                                       "api_key": "x"}}],
            context_window_fallbacks=[{"small": ["large"]}], num_retries=0)
        reply = router.completion(model="small", messages=[{"role": "user", "content": "hello " * 20}],
                                  max_tokens=90, ignore_eos=True)
    assert reply.model.endswith("long") and reply.usage.completion_tokens == 90


def test_disconnect_cancels_and_frees_the_row(server):
    url, app = server
    scheduler = app.state.scheduler
    before = scheduler.stats.cancelled
    with httpx.stream("POST", url + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": "go", "max_tokens": 80, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one chunk, then hang up
    deadline = time.monotonic() + 10
    while scheduler.stats.cancelled == before or scheduler.running:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.02)
    assert scheduler.stats.generated_tokens < 10_000


def test_metrics_count_requests_and_tokens(server, client):
    def read(name):
        text = httpx.get(server[0] + "/metrics").text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    requests, tokens = read("gpt2lite_requests_total"), read("gpt2lite_generated_tokens_total")
    client.completions.create(model="tiny", prompt="a", max_tokens=5, n=3, temperature=0)
    assert read("gpt2lite_requests_total") == requests + 3
    assert read("gpt2lite_generated_tokens_total") == tokens + 15
    assert read("gpt2lite_queue_depth") == 0
    assert "gpt2lite_request_latency_seconds_bucket" in httpx.get(server[0] + "/metrics").text


def test_prefix_cache_gives_the_same_outputs_and_saves_prefill(gen):
    shots = "Q: 1+1? A: 2. Q: 2+2? A: 4. Q: 3+3? A: 6. " * 2
    questions = ["Q: 4+4? A:", "Q: 5+5? A:", "Q: 6+6? A:"]
    outputs = {}
    for cache in (True, False):
        app = serve_app(gen, ServerOptions(model_name="tiny", max_batch=2, prefix_cache=cache))
        with running(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
            outputs[cache] = [client.completions.create(model="tiny", prompt=shots + q, max_tokens=6, seed=i,
                                                        logprobs=1).choices[0] for i, q in enumerate(questions)]
            cached = app.state.scheduler.stats.cached_prompt_tokens
        assert (cached > 2 * len(gen.tokenizer.encode(shots)) - 4) if cache else cached == 0
    assert [c.text for c in outputs[True]] == [c.text for c in outputs[False]]
    for a, b in zip(outputs[True], outputs[False], strict=True):
        assert a.logprobs.token_logprobs == pytest.approx(b.logprobs.token_logprobs, abs=1e-4)


def test_an_error_in_one_request_fails_that_request_only(gen):
    scheduler = Scheduler(gen.model, max_batch=4)
    results: dict[str, object] = {}
    done = threading.Semaphore(0)

    def request(name, **options):
        def finish(reason, error):
            results[name] = (reason, error)
            done.release()

        return Request([1, 2, 3], GenerationOptions(max_new_tokens=6, **options), on_token=lambda *a: None,
                       on_done=finish)

    try:
        scheduler.submit(request("good", temperature=0))
        scheduler.submit(request("bad", temperature=0, logits_processor=lambda t, logits: 1 / 0))
        scheduler.submit(request("also good", seed=1))
        for _ in range(3):
            assert done.acquire(timeout=30)
    finally:
        scheduler.stop()
    assert results["good"] == ("length", None) and results["also good"] == ("length", None)
    assert results["bad"][0] == "error" and isinstance(results["bad"][1], ZeroDivisionError)


class _Poisoned(torch.nn.Module):
    """A model whose forward fails on any batch holding one token id (as an overflowing int8 row would)."""

    def __init__(self, model, poison: int) -> None:
        super().__init__()
        self.inner, self.poison, self.config = model, poison, model.config

    def new_state(self, *args, **kwargs):
        return self.inner.new_state(*args, **kwargs)

    def feed(self, input_ids, state, **kwargs):
        if bool((input_ids == self.poison).any()):
            raise RuntimeError("activations overflowed")
        return self.inner.feed(input_ids, state, **kwargs)


def test_a_failing_batched_forward_fails_only_its_row(gen):
    poison = 777
    sick = TextGenerator(_Poisoned(gen.model, poison), gen.tokenizer)
    app = serve_app(sick, ServerOptions(model_name="tiny", max_batch=4))
    with running(app) as url:
        async def main():
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
            healthy = client.completions.create(model="tiny", prompt="Hello", max_tokens=30, temperature=0)
            # Forced to emit the poison token at its first step: its next forward fails.
            doomed = client.completions.create(model="tiny", prompt="Hi", max_tokens=30, temperature=0,
                                               logit_bias={str(poison): 100})
            return await asyncio.gather(healthy, doomed, return_exceptions=True)

        good, bad = asyncio.run(asyncio.wait_for(main(), timeout=60))
        assert good.choices[0].text == gen("Hello", max_new_tokens=30, temperature=0)
        assert isinstance(bad, openai.InternalServerError) and "overflowed" in bad.body["message"]
        assert httpx.get(url + "/health").status_code == 200  # the server stays up
        again = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).completions.create(
            model="tiny", prompt="Hello", max_tokens=3, temperature=0)
        assert again.choices[0].finish_reason == "length"


def test_padded_vocabulary_ids_are_never_sampled(tiny_dir, tmp_path):
    from gpt2lite import GPT2, GPT2Config

    config = GPT2Config.from_preset("tiny", vocab_size=50304)  # nanoGPT's padding of GPT-2's 50257
    torch.manual_seed(0)
    GPT2(config).save_pretrained(tmp_path)
    padded = TextGenerator.from_pretrained(tmp_path)
    with running(serve_app(padded, ServerOptions(model_name="p"))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = client.completions.create(model="p", prompt=[[1, 2]], max_tokens=4, temperature=0,
                                      logit_bias={"50300": 100}, logprobs=0)
    # Unmasked, the bias would make 50300 the choice, which no tokenizer decodes (a 500).
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4


def test_an_undecodable_token_ends_the_stream_with_an_error(tmp_path):
    from gpt2lite import GPT2, GPT2Config, Tokenizer

    vocab = {bytes([b]): b for b in range(256)}
    holes = Tokenizer(vocab, [], special_tokens={"<|endoftext|>": 300})  # ids 256..299 decode to nothing
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_preset("tiny", vocab_size=301, eos_token_id=300)).eval()
    with running(serve_app(TextGenerator(model, holes), ServerOptions(model_name="h"))) as url:
        body = {"model": "h", "prompt": "ab", "max_tokens": 5, "logit_bias": {"260": 100}}
        assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 500
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert "cannot decode" in json.loads(lines[-2][5:])["error"]["message"] and lines[-1] == "data: [DONE]"


@pytest.mark.slow
def test_load_64_streaming_clients_equal_their_solo_outputs(server):
    """64 concurrent streams (greedy and seeded sampling) through 16 rows: no failure, each equals its solo run."""
    url = server[0] + "/v1"

    def body(i):
        return dict(model="tiny", prompt=f"Client number {i} says", max_tokens=12, seed=i,
                    temperature=0 if i % 4 == 0 else 1.0, extra_body={"top_k": 0 if i % 3 else 50})

    solo_client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
    solo = {i: solo_client.completions.create(**body(i)).choices[0].text for i in range(64)}

    async def stream(client, i):
        text = ""
        async for chunk in await client.completions.create(stream=True, **body(i)):
            text += chunk.choices[0].text
        return text

    async def main():
        client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        return await asyncio.wait_for(asyncio.gather(*(stream(client, i) for i in range(64))), timeout=120)

    together = asyncio.run(main())
    assert [together[i] for i in range(64)] == [solo[i] for i in range(64)]


def test_quantized_model_serves_what_the_text_api_gives(tiny_dir):
    quantized = TextGenerator.from_pretrained(tiny_dir, quantize="int8")
    with running(serve_app(quantized, ServerOptions(model_name="tiny-int8"))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        got = client.completions.create(model="tiny-int8", prompt="Hello there", max_tokens=6, temperature=0)
    assert got.choices[0].text == quantized("Hello there", max_new_tokens=6, temperature=0)


# the gate: each defect of a request is a JSON 400 naming its field, before anything runs -----------------------


def test_n_keep_beyond_the_context_is_a_400_before_anything_runs(server):
    url, app = server
    before = app.state.scheduler.stats.requests
    for stream in (False, True):
        body = {"model": "tiny", "prompt": "go", "max_tokens": 5, "stream": stream, "context_shift": True,
                "n_keep": 2**64}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "n_keep" and "keep at most 94" in r.json()["error"]["message"]
    assert app.state.scheduler.stats.requests == before  # nothing was queued


def test_logit_bias_takes_at_most_300_entries_as_openai(server):
    body = {"model": "tiny", "prompt": "go", "max_tokens": 1, "logit_bias": {str(i): 1 for i in range(301)}}
    r = httpx.post(server[0] + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    assert "at most 300" in r.json()["error"]["message"]
    body["logit_bias"] = {str(i): 1 for i in range(300)}
    assert httpx.post(server[0] + "/v1/completions", json=body, timeout=30).status_code == 200


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": {"a": 1}}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
])
def test_param_names_the_field_not_pydantic_s_union_branch(server, path, body, param):
    r = httpx.post(server[0] + path, json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_an_id_the_model_has_but_the_tokenizer_lacks_is_a_400(tiny_dir, tmp_path):
    from gpt2lite import GPT2, GPT2Config

    GPT2(GPT2Config.from_preset("tiny", vocab_size=50304)).save_pretrained(tmp_path)
    with running(serve_app(TextGenerator.from_pretrained(tmp_path), ServerOptions(model_name="p"))) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": [50300], "max_tokens": 1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "0..50256" in r.text


def test_a_character_a_char_vocabulary_lacks_is_a_400_on_every_endpoint():
    from gpt2lite import CharTokenizer, RecurrentConfig, RecurrentLM

    tokenizer = CharTokenizer("abc ")
    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig(vocab_size=tokenizer.n_vocab, n_embd=8, n_layer=1,
                                        eos_token_id=tokenizer.eot_token)).eval()
    with running(create_app(model, tokenizer, ServerOptions(model_name="c"))) as url:
        for path, body, param in [("/v1/completions", {"prompt": "abz"}, "prompt"),
                                  ("/v1/chat/completions", {"messages": [{"role": "user", "content": "z"}]},
                                   "messages"),
                                  ("/tokenize", {"prompt": "z"}, "prompt")]:
            r = httpx.post(url + path, json=body, timeout=30)
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"]["param"] == param and "'z'" in r.json()["error"]["message"]
        ok = httpx.post(url + "/v1/completions", json={"prompt": "ab", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200


def test_an_unexpected_failure_is_a_json_500_not_plain_text(gen):
    from gpt2lite import Tokenizer

    class Broken(type(gen.tokenizer)):
        def encode(self, text, **kwargs):
            raise RuntimeError("a bug in the tokenizer")

    broken = Broken.__new__(Broken)
    broken.__dict__.update(gen.tokenizer.__dict__)
    assert isinstance(broken, Tokenizer)
    with running(create_app(gen.model, broken, ServerOptions(model_name="tiny"))) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
        assert r.status_code == 500 and r.headers["content-type"] == "application/json", r.text
        assert r.json()["error"]["type"] == "server_error" and "a bug in the tokenizer" in r.json()["error"]["message"]
        assert httpx.get(url + "/health", timeout=30).status_code == 200  # and the server goes on


@pytest.mark.parametrize(("template", "words"), [
    ("{% if messages|length > 1 %}{% include 'other.jinja' %}{% endif %}", "no loader"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{% if messages|length > 1 %}{{ f() }}{% endif %}", "recurses"),
    ("{% if messages|length > 1 %}{% for i in range(10**6) %}{% endfor %}{% endif %}", "MAX_RANGE"),
    ("{% if messages|length > 1 %}{{ 'x' * 10**9 }}{% endif %}", "repeats"),
])
def test_chat_template_failures_are_a_400_naming_messages(gen, template, words):
    two = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with running(create_app(gen.model, gen.tokenizer, ServerOptions(model_name="t"), chat_template=template)) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": two, "max_tokens": 1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert words in r.json()["error"]["message"]


@pytest.mark.slow
def test_a_runaway_chat_template_is_stopped_and_the_server_stays_responsive(gen, monkeypatch):
    spin = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    assert chat.MAX_RENDER_SECONDS == 2.0
    monkeypatch.setattr(chat, "MAX_RENDER_SECONDS", 0.25)  # the same path, 45 spinning renders in seconds
    with pytest.raises(ValueError, match=r"took more than 0\.25 s"):  # tried at load
        create_app(gen.model, gen.tokenizer, chat_template=spin)
    only_later = "{% if messages|length > 1 %}" + spin + "{% endif %}{{ messages[0]['content'] }}"
    two = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with running(create_app(gen.model, gen.tokenizer, ServerOptions(model_name="t"),
                            chat_template=only_later)) as url, httpx.Client(timeout=60) as http:
        pool = [threading.Thread(target=http.post, args=(url + "/v1/chat/completions",),
                                 kwargs={"json": {"messages": two, "max_tokens": 1}}) for _ in range(45)]
        for t in pool:
            t.start()
        assert http.get(url + "/health").status_code == 200
        for t in pool:
            t.join(timeout=120)
        r = http.post(url + "/v1/chat/completions", json={"messages": two, "max_tokens": 1})
        assert r.status_code == 400 and "took more than" in r.json()["error"]["message"]
        assert http.post(url + "/v1/chat/completions", json={"messages": two[:1], "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"prompt": "hi", "n": "2"}, "n", "valid integer"),
    ({"prompt": "hi", "context_shift": True, "n_keep": True}, "n_keep", "valid integer"),
    ({"prompt": [[1, 2], [3, "x"]]}, "prompt", "a list of lists of token ids"),
    ({"prompt": "hi", "max_tokens": 3, "min_tokens": 10}, "min_tokens", "more than the 3 tokens"),
    ({"prompt": ["a", "b"] * 200}, "prompt", "queues at most 256"),
])
def test_careless_values_are_refused_naming_the_field(server, body, param, words):
    """Found by a new-user trial: each was accepted (or blamed another field) before."""
    r = httpx.post(server[0] + "/v1/completions", json={"model": "tiny", "max_tokens": 1, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"], r.text


def test_a_body_that_is_not_a_json_object_says_so(server):
    empty = httpx.post(server[0] + "/v1/completions", timeout=30)
    assert empty.status_code == 400 and "no body" in empty.json()["error"]["message"]
    plain = httpx.post(server[0] + "/v1/completions", content=b'{"prompt": "x"}', timeout=30,
                       headers={"content-type": "text/plain"})
    assert plain.status_code == 400 and "application/json" in plain.json()["error"]["message"]
    bools = httpx.post(server[0] + "/detokenize", json={"tokens": [True]}, timeout=30)
    assert bools.status_code == 400 and bools.json()["error"]["param"] == "tokens.0"


def test_tokenize_counts_past_the_context(server):
    r = httpx.post(server[0] + "/tokenize", json={"prompt": "hello" + " hello" * 299}, timeout=30)
    assert r.status_code == 200 and r.json()["count"] == 300 and r.json()["max_model_len"] == 96


def test_a_template_that_fails_on_any_conversation_stops_the_start(gen):
    with pytest.raises(ValueError, match="no loader"):
        create_app(gen.model, gen.tokenizer, chat_template="{% include 'x.jinja' %}")
    refusing = "{% if messages|length < 2 %}{{ raise_exception('two messages, please') }}{% endif %}ok"
    create_app(gen.model, gen.tokenizer, chat_template=refusing)  # refuses one conversation, not every one
