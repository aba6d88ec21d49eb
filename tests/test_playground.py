"""The playground page in a real browser (headless Chromium) against a real `gpt2lite serve` process."""

from __future__ import annotations

import json
import urllib.parse

import httpx
import openai
import pytest

from browser import find_chromium, open_page
from test_serve import running
from test_serve_process import serve

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no Chromium here (apt-get install -y chromium)")

PROMPT = "The quick brown fox"


def page_url(base: str, **params: str) -> str:
    return f"{base}/?{urllib.parse.urlencode(params)}"


def api_text(url: str, key: str = "x", **options) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
    return client.completions.create(model="tiny", prompt=PROMPT, **options).choices[0].text


def test_autorun_link_shows_the_api_text_with_probabilities(tiny_dir):
    with serve(tiny_dir) as (url, _):
        link = page_url(url, prompt=PROMPT, max_tokens="24", temperature="0", logprobs="1", autorun="1")
        with open_page(link) as page:
            page.wait_for("document.getElementById('output').dataset.done === '1'")
            shown = page.evaluate("document.getElementById('output').textContent")
            spans = page.evaluate("document.querySelectorAll('#output span.tok').length")
            alternatives = page.evaluate(
                "Object.keys(JSON.parse(document.querySelector('#output span.tok').dataset.tip).alternatives).length")
            status = page.evaluate("document.getElementById('status').textContent")
            error = page.evaluate("document.getElementById('error').textContent")
            requests = list(page.requests)
        assert error == ""
        assert shown == api_text(url, max_tokens=24, temperature=0) and len(shown) > 0
        assert spans > 0 and alternatives == 5 and status.startswith("done")
        # Everything the page loaded came from the server that sent it.
        assert requests and all(r.startswith(url + "/") for r in requests), requests
        page_response = httpx.get(url + "/")
        policy = page_response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy


def test_the_key_comes_from_the_link_and_leaves_the_address_bar(tiny_dir):
    with serve(tiny_dir, "--api-key", "sesame") as (url, _):
        assert httpx.get(url + "/").status_code == 200  # the page itself needs no key
        link = page_url(url, key="sesame", prompt=PROMPT, max_tokens="12", temperature="0", autorun="1")
        with open_page(link) as page:
            page.wait_for("document.getElementById('output').dataset.done === '1'")
            shown = page.evaluate("document.getElementById('output').textContent")
            address = page.evaluate("location.href")
        assert shown == api_text(url, key="sesame", max_tokens=12, temperature=0)
        assert "sesame" not in address and "prompt=" in address
        # Without the key the page says what is wrong and asks for one.
        with open_page(page_url(url, prompt=PROMPT)) as page:
            message = page.wait_for("document.getElementById('error').textContent")
            asked = page.evaluate("!document.getElementById('key-row').classList.contains('hidden')")
        assert "API key" in message and asked


def test_no_playground_flag(tiny_dir):
    with serve(tiny_dir, "--no-playground") as (url, _):
        response = httpx.get(url + "/")
        assert response.status_code == 404 and "error" in response.json()


def test_a_json_schema_in_the_page_gives_the_api_s_constrained_text(tiny_dir):
    schema = '{"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, ' \
             '"required": ["n"], "additionalProperties": false}'
    with serve(tiny_dir) as (url, _):
        link = page_url(url, prompt=PROMPT, max_tokens="20", temperature="0", json_schema=schema, autorun="1")
        with open_page(link) as page:
            page.wait_for("document.getElementById('output').dataset.done === '1'")
            shown = page.evaluate("document.getElementById('output').textContent")
        expected = api_text(url, max_tokens=20, temperature=0, extra_body={"response_format": {
            "type": "json_schema", "json_schema": {"name": "playground", "schema": json.loads(schema)}}})
        assert shown == expected and 0 <= json.loads(shown)["n"] <= 9
        with open_page(page_url(url, prompt=PROMPT, json_schema="{not json", autorun="1")) as page:
            message = page.wait_for("document.getElementById('error').textContent")
        assert "not JSON" in message


def test_cors_lets_the_allowed_origin_s_pages_call_the_api_and_no_other(tiny_dir, tmp_path):
    """A page on another origin calls the API from a real browser (a preflighted POST with a key) only if allowed."""
    import functools
    import http.server
    import threading

    from gpt2lite import TextGenerator
    from gpt2lite.serve.app import ServerOptions, create_app

    (tmp_path / "index.html").write_text("<!doctype html><title>app</title>", encoding="utf-8")
    site = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=site.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{site.server_address[1]}"
    gen = TextGenerator.from_pretrained(tiny_dir)
    call = ("fetch(%r, {method: 'POST', headers: {'Authorization': 'Bearer k', 'Content-Type': 'application/json'}, "
            "body: JSON.stringify({model: 'tiny', prompt: 'Hi', max_tokens: 3, temperature: 0})})"
            ".then(r => r.json()).then(j => j.choices[0].text, e => 'refused: ' + e)")
    try:
        for allowed, expected in (((origin,), True), ((), False), (("http://elsewhere.example",), False)):
            options = ServerOptions(model_name="tiny", api_key="k", allowed_origins=allowed)
            with running(create_app(gen.model, gen.tokenizer, options)) as url, open_page(origin + "/") as page:
                text = page.evaluate(call % (url + "/v1/completions"))
            if expected:
                assert text == gen.complete("Hi", max_new_tokens=3, temperature=0)[0].text
            else:
                assert text.startswith("refused: TypeError"), (allowed, text)
    finally:
        site.shutdown()
    head = httpx.head
    with running(create_app(gen.model, gen.tokenizer, ServerOptions(model_name="tiny"))) as url:
        assert head(url + "/").status_code == 200 and head(url + "/health").status_code == 200
