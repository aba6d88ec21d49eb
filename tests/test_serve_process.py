"""`gpt2lite serve` as a real process: signals, hostile bodies, a port in use, quiet disconnects, each API dialect."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow  # every test starts a server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model_dir, *extra: str):
    """`gpt2lite serve` on a free port; yields (url, process). stderr is collected in process.err."""
    port = free_port()
    command = [sys.executable, "-m", "gpt2lite", "serve", "--model", str(model_dir), "--port", str(port),
               "--device", "cpu", "--served-model-name", "tiny", *extra]
    home = tempfile.TemporaryDirectory()  # the server's kernel-choice cache goes here, not to the real home
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HOME": home.name})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    process.err = lines
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        reader.join(timeout=10)
        home.cleanup()


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmHWM:")))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_lets_running_requests_finish_then_exits_0(tiny_dir, signum):
    with serve(tiny_dir, "--max-batch", "2", "--shutdown-timeout", "60") as (url, process):
        results: dict[int, object] = {}
        started = threading.Barrier(4)

        def request(i: int) -> None:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
            try:
                stream = client.completions.create(model="tiny", prompt=f"Request {i}", max_tokens=90,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True})
                chunks = iter(stream)
                first = next(chunks)
                started.wait(timeout=30)
                results[i] = [first, *chunks]
            except Exception as exc:  # recorded and asserted on below
                results[i] = exc

        threads = [threading.Thread(target=request, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        started.wait(timeout=30)  # every request is running or queued behind them
        process.send_signal(signum)
        for t in threads:
            t.join(timeout=60)
        assert process.wait(timeout=60) == 0, "".join(process.err)
    for i in range(3):
        chunks = results[i]
        assert isinstance(chunks, list), chunks
        assert chunks[-1].choices[0].finish_reason == "length"
    assert not any("Traceback" in line for line in process.err), "".join(process.err)


def test_new_requests_during_a_drain_are_503(tiny_dir, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    with serve(tiny_dir, "--max-batch", "1", "--shutdown-timeout", "60", "--chat-template", str(template)) as (
            url, process):
        assert httpx.get(url + "/tokenizer_info").json()["chat_template"] == template.read_text()
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": "x", "max_tokens": 90, "stream": True,
                                "ignore_eos": True}) as running:
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while httpx.get(url + "/health").status_code != 503:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            late = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "y", "max_tokens": 1})
            rest = [line for line in lines if line.startswith("data:")]
        assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
        assert process.wait(timeout=60) == 0


def test_an_unauthenticated_64_mb_body_is_refused_without_memory_growth(tiny_dir):
    with serve(tiny_dir, "--api-key", "sekret") as (url, process):
        before = peak_rss_kib(process.pid)
        chunk = b"x" * 2**20

        def body():
            for _ in range(64):
                yield chunk

        for headers in ({}, {"Authorization": "Bearer sekret"}):
            try:
                r = httpx.post(url + "/v1/completions", content=body(), timeout=60,
                               headers={"content-type": "application/json", **headers})
                assert r.status_code == (413 if headers else 401), r.text
            except httpx.TransportError:
                pass  # the server answered and closed before the client finished sending: also a refusal
        grown = peak_rss_kib(process.pid) - before
        assert grown < 30 * 1024, f"the server's peak memory grew by {grown} KiB"
        assert httpx.get(url + "/health").status_code == 200


def test_a_client_that_hangs_up_leaves_one_quiet_log_line(tiny_dir):
    with serve(tiny_dir) as (url, process):
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"model": "tiny", "prompt": "go", "max_tokens": 90, "stream": True,
                                "ignore_eos": True}) as r:
            next(line for line in r.iter_lines() if line.startswith("data:"))
        body = json.dumps({"model": "tiny", "prompt": "go", "max_tokens": 90, "ignore_eos": True}).encode()
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as raw:  # sent, then gone before the answer
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").json()["running"]:  # both end, cancelled or finished
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert not any("Traceback" in line for line in process.err), "".join(process.err)


def test_a_port_in_use_exits_1_with_one_line(tiny_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with tempfile.TemporaryDirectory() as home:  # not the real home's kernel cache
            done = subprocess.run([sys.executable, "-m", "gpt2lite", "serve", "--model", str(tiny_dir), "--port",
                                   str(port)], capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "HOME": home})
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "cannot listen on 127.0.0.1:" in done.stderr


@pytest.mark.parametrize("args", [["--port", "70000"], ["--max-queue", "0"], ["--max-batch", "-1"]])
def test_bad_serve_flags_are_one_line_errors(args):
    done = subprocess.run([sys.executable, "-m", "gpt2lite", "serve", *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr


def test_messages_responses_and_embeddings_from_a_server_process(tiny_dir):
    """The anthropic SDK, the Responses API and embeddings against `gpt2lite serve` itself.

    Oracles: the chat completion of the same conversation (same text, same token counts), and
    transformers' GPT2Model hidden states, mean-pooled and normalised.
    """
    import anthropic
    import torch
    import torch.nn.functional as F
    import transformers

    from gpt2lite import Tokenizer

    with serve(tiny_dir) as (url, process):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell me a story."}],
                                              max_tokens=8, temperature=0)
        expected = chat.choices[0].message.content
        claude = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=60)
        message = claude.messages.create(model="tiny", messages=[{"role": "user", "content": "Tell me a story."}],
                                         max_tokens=8, extra_body={"temperature": 0})
        assert message.content[0].text == expected and message.stop_reason == "max_tokens"
        assert (message.usage.input_tokens, message.usage.output_tokens) == (chat.usage.prompt_tokens, 8)
        response = client.responses.create(model="tiny", input="Tell me a story.", max_output_tokens=8, temperature=0)
        assert response.output_text == expected and response.usage.output_tokens == 8
        texts = ["The cat sat on the mat.", "Hi"]
        got = torch.tensor([d.embedding for d in client.embeddings.create(model="tiny", input=texts).data])
    tokenizer, model = Tokenizer.gpt2(), transformers.GPT2Model.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        hidden = [model(torch.tensor([tokenizer.encode(t)])).last_hidden_state[0] for t in texts]  # (T, C) each
    torch.testing.assert_close(got, F.normalize(torch.stack([h.mean(0) for h in hidden]), dim=-1),
                               atol=1e-5, rtol=1e-4)
    assert not any("Traceback" in line for line in process.err), "".join(process.err)


def test_lora_adapters_chosen_per_request_loaded_and_unloaded_at_run_time(tiny_dir, tmp_path):
    import torch

    from gpt2lite import GPT2, LoraConfig, TextGenerator, add_lora, save_model

    dirs = {}
    for seed, name in enumerate(("french", "legal")):
        model = add_lora(GPT2.from_pretrained(tiny_dir), LoraConfig(r=4, target_modules=("c_attn", "c_fc")))
        torch.manual_seed(seed)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.normal_(std=0.2)  # B starts at zero: give the adapter an effect
        dirs[name] = save_model(model.eval(), tmp_path / name)
    prompt = "Hello there, my"
    expected = {name: TextGenerator.from_pretrained(tiny_dir, adapter=path)(prompt, max_new_tokens=8, temperature=0)
                for name, path in dirs.items()}
    expected["tiny"] = TextGenerator.from_pretrained(tiny_dir)(prompt, max_new_tokens=8, temperature=0)
    assert len(set(expected.values())) == 3
    with serve(tiny_dir, "--lora", f"french={dirs['french']}", "--max-loras", "2", "--api-key", "k") as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["tiny", "french"]
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "legal", "lora_path": str(dirs["legal"])},
                       headers={"Authorization": "Bearer k"}, timeout=60)
        assert r.status_code == 200, r.text
        texts: dict[str, str] = {}

        def complete(name):
            texts[name] = client.completions.create(model=name, prompt=prompt, max_tokens=8,
                                                    temperature=0).choices[0].text

        threads = [threading.Thread(target=complete, args=(name,)) for name in ("french", "legal", "tiny") * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert texts == expected
        r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "french"},
                       headers={"Authorization": "Bearer k"}, timeout=60)
        assert r.status_code == 200, r.text
        with pytest.raises(openai.NotFoundError):
            complete("french")
