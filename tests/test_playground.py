"""The playground page in a real browser (headless Chromium) against a real `gpt2lite serve` process."""

from __future__ import annotations

import contextlib
import json
import re
import time
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
        # Without the key the page points to its key box, with no error shown.
        with open_page(page_url(url, prompt=PROMPT)) as page:
            message = page.wait_for("document.getElementById('status').textContent")
            asked = page.evaluate("!document.getElementById('key-row').classList.contains('hidden')")
            focused = page.evaluate("document.activeElement.id")
            error = page.evaluate("document.getElementById('error').textContent")
        assert "API key" in message and asked and focused == "key" and error == ""


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


def test_counts_speed_continue_every_stop_chat_picker_and_dark_mode_match_the_api(tiny_dir, tmp_path):
    """One server and one browser for the page's newer parts, each against the API's own answer to the same request."""
    import peft
    import torch
    import transformers

    torch.manual_seed(0)  # a LoRA adapter made by peft, with random B so that it changes the text
    transformers.logging.set_verbosity_error()
    lora = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(tiny_dir),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False,
                                                fan_in_fan_out=True))
    lora.save_pretrained(tmp_path / "alpha")
    with serve(tiny_dir, "--lora", f"alpha={tmp_path / 'alpha'}") as (url, _), \
            open_page(page_url(url, prompt=PROMPT, max_tokens="8", temperature="0", autorun="1")) as page:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        js = page.evaluate

        def run(button: str = "run") -> tuple[str, str]:
            js(f"document.getElementById('output').dataset.done = ''; document.getElementById('{button}').click()")
            page.wait_for("document.getElementById('output').dataset.done === '1'")
            assert js("document.getElementById('error').textContent") == ""
            return js("document.getElementById('output').textContent"), \
                js("document.getElementById('status').textContent")

        def navigate(link: str) -> None:
            """Open ``link`` in the page and wait for it (not the page before it) to have loaded."""
            js("window.before = true")
            page.call("Page.navigate", url=link)
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(RuntimeError):  # its context is destroyed while the next one loads
                    if js("!window.before && document.readyState === 'complete'"):
                        return
                assert time.monotonic() < deadline, link
                time.sleep(0.05)

        def speed(status: str) -> tuple[str, int]:
            found = re.fullmatch(r"done \((\w+)\) · (\d+) tokens in [\d.]+ s · [\d.]+ tok/s", status)
            assert found, status
            return found[1], int(found[2])

        # The autorun link: its text, and the speed from the server's own token count.
        page.wait_for("document.getElementById('output').dataset.done === '1'")
        first = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
        assert js("document.getElementById('output').textContent") == first.choices[0].text
        status = js("document.getElementById('status').textContent")
        assert speed(status) == (first.choices[0].finish_reason, first.usage.completion_tokens)
        # The token count beside the context is /tokenize's.
        counted = httpx.post(url + "/tokenize", json={"prompt": PROMPT}).json()
        shown = page.wait_for("document.getElementById('count').dataset.count")
        count_text = js("document.getElementById('count').textContent")
        assert int(shown) == counted["count"] and f"{counted['max_model_len']}-token context" in count_text

        # Continue: the output joins the prompt and runs again.
        text, status = run("continue")
        longer = PROMPT + first.choices[0].text
        assert js("document.getElementById('prompt').value") == longer
        again = client.completions.create(model="tiny", prompt=longer, max_tokens=8, temperature=0)
        assert text == again.choices[0].text and speed(status)[1] == again.usage.completion_tokens

        # Every stop string goes to the server (the page kept 4): decoys with a comma, a newline and a backslash
        # first, the one that cuts this text last. Typed one a line, with \n and \\ as escapes.
        js(f"document.getElementById('prompt').value = {json.dumps(PROMPT)}; "
           "document.getElementById('max_tokens').value = '24'")
        full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
        cut = full[len(full) // 2:len(full) // 2 + 2]
        stops = ["zq,x", "no\nsuch", "back\\slash", "qqq1", "qqq2", "qqq3", cut]
        typed = "\n".join(s.replace("\\", "\\\\").replace("\n", "\\n") for s in stops)
        js(f"document.getElementById('stop_strings').value = {json.dumps(typed)}")
        text, status = run()
        stopped = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=stops)
        assert text == stopped.choices[0].text and len(text) < len(full)
        assert speed(status) == ("stop", stopped.usage.completion_tokens)
        assert js("new URLSearchParams(location.search).getAll('stop')") == stops  # the link holds each one

        # Chat, for a model without a chat template (the server's default one): count, text and speed.
        js("document.getElementById('stop_strings').value = ''; document.getElementById('tab-chat').click()")
        assert js("!document.getElementById('tab-chat').classList.contains('hidden')")
        assert "no chat template" in js("document.getElementById('chat-note').textContent")
        js("const box = document.getElementById('chat-input'); box.value = 'Hello there';"
           "box.dispatchEvent(new Event('input'))")
        messages = [{"role": "user", "content": "Hello there"}]
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
        assert int(page.wait_for("document.getElementById('chat-count').dataset.count")) == reply.usage.prompt_tokens
        js("document.getElementById('send').click()")
        page.wait_for("document.getElementById('chat-output') && document.getElementById('chat-output').dataset.done")
        assert js("document.getElementById('error').textContent") == ""
        assert js("document.getElementById('chat-output').textContent") == reply.choices[0].message.content
        chat_speed = speed(js("document.getElementById('chat-status').textContent"))
        assert chat_speed == (reply.choices[0].finish_reason, reply.usage.completion_tokens)

        # The picker lists what /v1/models lists, the adapter marked; a link picking the adapter gets its text.
        listed = [m.id for m in client.models.list().data]
        assert listed == ["tiny", "alpha"]
        assert js("[...document.getElementById('model').options].map(o => o.value)") == listed
        navigate(page_url(url, model="alpha", prompt=PROMPT, max_tokens="8", temperature="0", autorun="1"))
        page.wait_for("document.getElementById('output').dataset.done === '1'")
        adapted = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
        assert js("document.getElementById('output').textContent") == adapted != first.choices[0].text
        assert js("document.getElementById('model-info').textContent").startswith("LoRA adapter of tiny")
        assert js("document.getElementById('model').selectedOptions[0].textContent") == "alpha (adapter)"
        # A link naming a model this server does not serve says so, and runs nothing.
        navigate(page_url(url, model="nonesuch", prompt=PROMPT, autorun="1"))
        message = page.wait_for("document.getElementById('error').textContent")
        assert "nonesuch" in message and "not served here" in message
        assert js("document.getElementById('output').textContent") == ""

        # Dark mode follows the system's setting: light text on a dark page, and the reverse.
        def luminance(css: str) -> float:
            r, g, b = (int(v) / 255 for v in re.findall(r"\d+", css)[:3])
            return 0.2126 * r + 0.7152 * g + 0.0722 * b

        colours = ("[getComputedStyle(document.body).backgroundColor, getComputedStyle(document.body).color, "
                   "getComputedStyle(document.getElementById('prompt')).backgroundColor]")
        for scheme, dark in (("light", False), ("dark", True)):
            page.call("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": scheme}])
            page_bg, fg, box_bg = (luminance(c) for c in js(colours))
            assert (page_bg < 0.2 and box_bg < 0.2 and fg > 0.7) if dark else (page_bg > 0.9 and fg < 0.3), scheme


def test_a_served_classifier_gets_the_classify_tab_with_transformers_probabilities(tmp_path):
    """A classifier folder: the page shows Classify alone, each text's label and probabilities as transformers'."""
    import torch
    import transformers

    from gpt2lite import TextClassifier
    from gpt2lite.serve.app import ServerOptions, create_app
    from oracles import tiktoken_gpt2

    from .conftest import TINY

    labels = ("negative", "neutral", "positive")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(2)
    config = transformers.GPT2Config(**TINY, num_labels=3, pad_token_id=50256, id2label=dict(enumerate(labels)),
                                     label2id={n: i for i, n in enumerate(labels)})
    hf = transformers.GPT2ForSequenceClassification(config).eval()
    with torch.no_grad():  # a larger random head, so that these texts get different labels
        hf.score.weight.normal_(0, 0.3)
    hf.save_pretrained(tmp_path)
    texts = ["a fine, warm film", "dull and far too long", "The cat sat on the mat."]
    ids = [tiktoken_gpt2().encode(t) for t in texts]  # tiktoken's ids, transformers' probabilities
    with torch.no_grad():
        expected = [hf(torch.tensor([row])).logits[0].softmax(-1).tolist() for row in ids]
    clf = TextClassifier.from_pretrained(tmp_path)
    with running(create_app(clf.model, clf.tokenizer, ServerOptions(model_name="clf"))) as url, \
            open_page(page_url(url, input="\n".join(texts), autorun="1")) as page:
        page.wait_for("document.getElementById('classify-output').dataset.done === '1'")
        js = page.evaluate
        assert js("document.getElementById('error').textContent") == ""
        rows = js("[...document.querySelectorAll('#classify-output tbody tr')].map(r => "
                  "[r.cells[0].textContent, r.dataset.label, JSON.parse(r.dataset.probs), "
                  "r.querySelector('.bar.top span').textContent])")
        visible = js("['tab-complete', 'tab-chat', 'tab-classify', 'controls'].map(id => "
                     "!document.getElementById(id).classList.contains('hidden'))")
        status = js("document.getElementById('classify-status').textContent")
        address = js("location.search")
    assert [r[0] for r in rows] == texts
    for (_, label, probs, top), want in zip(rows, expected, strict=True):
        assert probs == pytest.approx(want, abs=1e-5) and label == top == labels[max(range(3), key=want.__getitem__)]
    assert len({r[1] for r in rows}) > 1  # not one label for everything
    assert visible == [False, False, True, False]
    tokens = sum(len(row) for row in ids)
    assert re.fullmatch(rf"done · 3 texts, {tokens} tokens in [\d.]+ s · [\d.]+ tok/s", status), status
    assert "input=" in address and "model=clf" in address
