"""The OpenAI-compatible server, driven by the official openai client on 127.0.0.1, bounded in count and time."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

from gpt2lite import GenerationOptions, TextGenerator
from gpt2lite.serve.app import create_app
from gpt2lite.serve.scheduler import Request, Scheduler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    app = create_app(gen, model_name="tiny", max_batch=16, max_queue=256)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_completion_equals_the_text_api(client, gen):
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=8, temperature=0)
    assert r.choices[0].text == gen("Hello there", max_new_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (2, 8)
    assert r.object == "text_completion" and r.model == "tiny"


def test_streamed_text_equals_non_streamed(client):
    for kw in (dict(temperature=0), dict(seed=5, top_k=40), dict(seed=7, temperature=0.8, top_p=0.9)):
        extra = {"top_k": kw.pop("top_k")} if "top_k" in kw else {}
        whole = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, extra_body=extra, **kw)
        pieces = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, stream=True,
                                           extra_body=extra, **kw)
        chunks = list(pieces)
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_n_and_prompt_lists(client):
    r = client.completions.create(model="tiny", prompt=["one", "two"], max_tokens=4, n=2, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0] != by_index[1]  # the n choices of a prompt draw with different seeds
    ids = client.completions.create(model="tiny", prompt=[[505], [734]], max_tokens=4, n=2, seed=1)  # "one", "two"
    assert {c.index: c.text for c in ids.choices} == by_index


def test_logprobs_equal_the_models_distribution(client, gen, hf_tiny):
    r = client.completions.create(model="tiny", prompt="The cat", max_tokens=6, temperature=0, logprobs=3,
                                  echo=True)
    lp = r.choices[0].logprobs
    prompt_ids = gen.tokenizer.encode("The cat")
    ids = prompt_ids + [gen.tokenizer.encode(t)[0] for t in lp.tokens[len(prompt_ids) :]]
    with torch.no_grad():
        logp = hf_tiny(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = [None] + [float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0]
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-4)
    assert r.choices[0].text.startswith("The cat")
    assert all(len(top) == 3 for top in lp.top_logprobs[len(prompt_ids) :])
    assert lp.text_offset[: len(prompt_ids)] == [0, 3]


def test_echo_with_no_new_tokens_scores_the_prompt(client):
    r = client.completions.create(model="tiny", prompt="The cat sat", max_tokens=0, logprobs=0, echo=True)
    choice = r.choices[0]
    assert choice.text == "The cat sat" and r.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.token_logprobs) == 3
    assert all(v < 0 for v in choice.logprobs.token_logprobs[1:])


def test_stop_strings(client):
    free = client.completions.create(model="tiny", prompt="Hi", max_tokens=10, seed=3).choices[0].text
    stop = free[3:6]
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=10, seed=3, stop=[stop])
    assert r.choices[0].text == free[: free.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (dict(prompt="x", temperature=-1), "temperature"),
        (dict(prompt="x", top_p=0), "top_p"),
        (dict(prompt="x", logprobs=6), "logprobs"),
        (dict(prompt="x", max_tokens=5000), "max_tokens"),
        (dict(prompt=[99999999]), "prompt"),
        (dict(prompt="x", logit_bias={"abc": 1}), "logit_bias"),
        (dict(prompt="x", best_of=3), "best_of"),
        (dict(prompt="x", stop=["a", "b", "c", "d", "e"]), "stop"),
    ],
)
def test_bad_parameters_are_400_naming_them(server, body, param):
    r = httpx.post(server[0] + "/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_api_key(gen):
    app = create_app(gen, model_name="tiny", api_key="sekret")
    with running(app) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].text is not None


def test_full_queue_is_429(gen):
    app = create_app(gen, model_name="tiny", max_batch=1, max_queue=0)
    with running(app) as url:
        with pytest.raises(openai.RateLimitError) as info:
            openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).completions.create(
                model="tiny", prompt="a", max_tokens=2)
        assert "busy" in info.value.body["message"]


def test_disconnect_cancels_and_frees_the_row(server):
    url, app = server
    engine = app.state.scheduler
    before = engine.stats.cancelled
    with httpx.stream("POST", url + "/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": "go", "max_tokens": 80, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one chunk, then hang up
    deadline = time.monotonic() + 10
    while engine.stats.cancelled == before or engine.running:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.02)
    assert engine.stats.generated_tokens < 10_000


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


def test_an_error_in_one_request_fails_that_request_only(gen):
    engine = Scheduler(gen.model, max_batch=4)
    results: dict[str, object] = {}
    done = threading.Semaphore(0)

    def request(name, **options):
        def finish(reason, error):
            results[name] = (reason, error)
            done.release()

        return Request([1, 2, 3], GenerationOptions(max_new_tokens=6, **options), on_token=lambda *a: None,
                       on_done=finish)

    try:
        engine.submit(request("good", temperature=0))
        engine.submit(request("bad", temperature=0, logits_processor=lambda t, logits: 1 / 0))
        engine.submit(request("also good", seed=1))
        for _ in range(3):
            assert done.acquire(timeout=30)
    finally:
        engine.stop()
    assert results["good"] == ("length", None) and results["also good"] == ("length", None)
    assert results["bad"][0] == "error" and isinstance(results["bad"][1], ZeroDivisionError)


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


def test_cli_serve_runs_the_engine_in_its_main_thread(tiny_dir):
    import subprocess
    import sys

    port = free_port()
    command = [sys.executable, "-m", "gpt2lite", "serve", "--model", str(tiny_dir), "--port", str(port),
               "--max-batch", "4", "--device", "cpu", "--model-name", "tiny"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_quantized_model_serves_what_the_text_api_gives(tiny_dir):
    quantized = TextGenerator.from_pretrained(tiny_dir, quantize="int8")
    app = create_app(quantized, model_name="tiny-int8")
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        got = client.completions.create(model="tiny-int8", prompt="Hello there", max_tokens=6, temperature=0)
    assert got.choices[0].text == quantized("Hello there", max_new_tokens=6, temperature=0)
