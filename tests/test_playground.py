"""The playground page in a real browser (headless Chromium) against a real `gpt2lite serve` process."""

from __future__ import annotations

import json
import urllib.parse

import httpx
import openai
import pytest

from browser import find_chromium, open_page
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
