"""``/v1/embeddings`` against transformers' hidden states, through the openai client and LangChain."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F
import transformers

from gpt2lite import TextGenerator
from gpt2lite.serve.app import ServerOptions, create_app
from gpt2lite.text.embeddings import embed
from test_serve import running

TEXTS = ["The cat sat on the mat.", "Errors should never pass silently.", "Hi"]


@pytest.fixture(scope="module")
def served(tiny_dir):
    gen = TextGenerator.from_pretrained(tiny_dir)
    with running(create_app(gen.model, gen.tokenizer, ServerOptions(model_name="tiny", max_batch=4))) as url:
        yield url, gen


def _oracle(tiny_dir, gen, texts, pooling="mean"):
    """transformers' GPT2Model: its last hidden states (after ln_f), pooled, L2-normalised."""
    model = transformers.GPT2Model.from_pretrained(tiny_dir).eval()
    out = []
    for text in texts:
        with torch.no_grad():
            hidden = model(torch.tensor([gen.tokenizer.encode(text)])).last_hidden_state[0]  # (T, C)
        out.append(F.normalize(hidden.mean(0) if pooling == "mean" else hidden[-1], dim=-1))
    return torch.stack(out)


def test_the_openai_client_gets_transformers_pooled_hidden_states(served, tiny_dir):
    url, gen = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    expected = _oracle(tiny_dir, gen, TEXTS)
    reply = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 and decodes it
    got = torch.tensor([d.embedding for d in reply.data])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert [d.index for d in reply.data] == [0, 1, 2]
    assert reply.usage.prompt_tokens == sum(len(gen.tokenizer.encode(t)) for t in TEXTS)
    floats = client.embeddings.create(model="tiny", input=TEXTS[0], encoding_format="float")
    torch.testing.assert_close(torch.tensor(floats.data[0].embedding), expected[0], atol=1e-5, rtol=1e-4)
    ids = client.embeddings.create(model="tiny", input=[gen.tokenizer.encode(TEXTS[1])])  # token ids
    torch.testing.assert_close(torch.tensor(ids.data[0].embedding), expected[1], atol=1e-5, rtol=1e-4)
    last = httpx.post(url + "/v1/embeddings", json={"input": TEXTS, "pooling": "last"}).json()
    torch.testing.assert_close(torch.tensor([d["embedding"] for d in last["data"]]),
                               _oracle(tiny_dir, gen, TEXTS, "last"), atol=1e-5, rtol=1e-4)
    # The library function the endpoint calls, on its own.
    torch.testing.assert_close(embed(gen.model, [gen.tokenizer.encode(t) for t in TEXTS]), expected,
                               atol=1e-5, rtol=1e-4)


def test_langchain_embeddings_and_bad_input(served, tiny_dir):
    from langchain_openai import OpenAIEmbeddings

    url, gen = served
    # check_embedding_ctx_length=False: LangChain sends the texts, not tiktoken's ids of them.
    lc = OpenAIEmbeddings(model="tiny", base_url=url + "/v1", api_key="x", check_embedding_ctx_length=False)
    torch.testing.assert_close(torch.tensor(lc.embed_documents(TEXTS)), _oracle(tiny_dir, gen, TEXTS),
                               atol=1e-5, rtol=1e-4)
    assert len(lc.embed_query("A question")) == gen.model.config.n_embd
    for body, param in (({"input": ""}, "input"), ({"input": ["ok", ""]}, "input"),
                        ({"input": "hello " * 200}, "input"), ({"input": "x", "dimensions": 3}, "dimensions"),
                        ({"input": "x", "model": "other"}, "model")):
        error = httpx.post(url + "/v1/embeddings", json=body)
        assert error.status_code in (400, 404) and error.json()["error"]["param"] == param, body
    # Embeddings run between decode steps: a long generation beside them is not disturbed.
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    with client.completions.create(model="tiny", prompt="Once", max_tokens=40, stream=True, seed=3) as stream:
        first = next(iter(stream))
        assert client.embeddings.create(model="tiny", input="x").data
        text = first.choices[0].text + "".join(c.choices[0].text for c in stream)
    assert text == client.completions.create(model="tiny", prompt="Once", max_tokens=40, seed=3).choices[0].text
