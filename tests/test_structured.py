"""Structured output: every text parses and validates (jsonschema, re), and every token is one llguidance allows."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import llguidance
import openai
import pydantic
import pytest
import torch

from gpt2lite import GPT2, GenerationOptions, GPT2Config, TextGenerator, Tokenizer, generate
from gpt2lite.errors import OptionError
from gpt2lite.generation.constraints import _vocabulary, constraint_grammar
from gpt2lite.serve.app import ServerOptions, create_app
from test_serve import running

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["red", "green", "blue"]}},
     "required": ["ok", "tag"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
    {"type": "string", "maxLength": 12},
]


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    return TextGenerator(GPT2(GPT2Config.from_preset("tiny")).eval(), Tokenizer.gpt2())


def _allowed_by_llguidance(gen, options, tokens):
    """Replay the tokens through a fresh matcher of the same constraint: each must be accepted in turn."""
    _, grammar = constraint_grammar(options)
    matcher = llguidance.LLMatcher(_vocabulary(gen.tokenizer, gen.tokenizer.eot_token), grammar)
    return all(matcher.consume_token(t) for t in tokens)


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "ints", "enum", "nested", "string"])
def test_fifty_seeds_all_parse_and_validate(gen, schema):
    opts = GenerationOptions(json_schema=schema, max_new_tokens=60, seed=0)
    completions = gen.complete(["Data:"] * 50, opts)
    for c in completions:
        assert c.finish_reason == "stop", c.text  # the end token came only once the JSON was whole
        jsonschema.validate(json.loads(c.text), schema)
        assert _allowed_by_llguidance(gen, opts, c.token_ids)


def test_regex_choice_and_grammar(gen):
    for seed in range(10):
        text = gen("x", regex=r"[0-9]{3}-[a-z]{2,4}", max_new_tokens=12, seed=seed)
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
        assert gen("x", choice=["yes", "no", "maybe"], max_new_tokens=5, seed=seed) in ("yes", "no", "maybe")
        said = gen("x", grammar='start: "hi " NAME\nNAME: /[a-z]{1,5}/', max_new_tokens=8, seed=seed)
        assert re.fullmatch(r"hi [a-z]{1,5}", said), said


def test_streamed_equals_whole_and_greedy_is_a_pydantic_model(gen):
    class Person(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")  # else any key may follow: unbounded
        name: str = pydantic.Field(max_length=6)
        age: int = pydantic.Field(ge=0, le=99)

    whole = gen("A person:", json_schema=Person, max_new_tokens=40, seed=4)
    streamed = "".join(gen.stream("A person:", json_schema=Person, max_new_tokens=40, seed=4))
    assert whole == streamed
    Person.model_validate_json(whole)


def test_an_unfinished_object_ends_by_length_and_bad_options_are_refused(gen):
    c = gen.complete("x", json_schema=SCHEMAS[0], max_new_tokens=3, seed=0)[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 3
    with pytest.raises(OptionError, match="json_schema cannot be used"):
        gen("x", json_schema={"type": "nonsense"})
    with pytest.raises(OptionError, match="give one structured-output constraint"):
        GenerationOptions(regex="a", choice=["b"])
    with pytest.raises(OptionError, match="does not combine with num_beams"):
        GenerationOptions(regex="a", num_beams=2, temperature=0)
    ids = generate(gen.model, [[1, 2]], choice=["ab"], max_new_tokens=4, temperature=0)  # GPT-2's vocabulary
    assert gen.tokenizer.decode(ids[0, 2:].tolist()).startswith("ab")


def test_the_server_constrains_every_spelling_with_the_openai_client(gen):
    class Item(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        label: str = pydantic.Field(max_length=6)
        count: int = pydantic.Field(ge=0, le=9)

    app = create_app(gen.model, gen.tokenizer, ServerOptions(model_name="tiny", max_batch=4))
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        chat = [{"role": "user", "content": "An item, as JSON:"}]
        parsed = client.chat.completions.parse(model="tiny", messages=chat, response_format=Item, max_tokens=60,
                                               seed=1)
        assert isinstance(parsed.choices[0].message.parsed, Item)
        for seed in range(4):  # any object: a random model may write keys until max_tokens, then it is cut
            anything = client.chat.completions.create(model="tiny", messages=chat, max_tokens=40, seed=seed,
                                                      response_format={"type": "json_object"}).choices[0]
            if anything.finish_reason == "stop":
                assert isinstance(json.loads(anything.message.content), dict)
            else:
                assert anything.finish_reason == "length" and anything.message.content.startswith("{")
        for extra in ({"guided_choice": ["left", "right"]}, {"structured_outputs": {"choice": ["left", "right"]}}):
            r = client.completions.create(model="tiny", prompt="Go", max_tokens=5, seed=3, extra_body=extra)
            assert r.choices[0].text in ("left", "right")
        streamed = client.completions.create(model="tiny", prompt="Code:", max_tokens=10, seed=5, stream=True,
                                             extra_body={"guided_regex": "[A-Z]{2}[0-9]{2}"})
        assert re.fullmatch("[A-Z]{2}[0-9]{2}", "".join(c.choices[0].text for c in streamed))
        # Rows of a batch with different constraints, and none, side by side.
        bodies = [{"prompt": "a", "max_tokens": 30, "seed": i, **extra} for i, extra in enumerate(
            [{"json_schema": SCHEMAS[2]}, {"guided_regex": "[0-9]{4}"}, {}, {"guided_choice": ["x", "y"]}])]
        with httpx.Client(timeout=60) as http:
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                texts = list(pool.map(lambda b: http.post(url + "/v1/completions", json=b).json()["choices"][0]
                                      ["text"], bodies))
            jsonschema.validate(json.loads(texts[0]), SCHEMAS[2])
            assert re.fullmatch("[0-9]{4}", texts[1]) and texts[3] in ("x", "y")
            bad = http.post(url + "/v1/chat/completions", json={"messages": chat, "stream": True, "response_format": {
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format", bad.text
            two = http.post(url + "/v1/completions", json={"prompt": "a", "guided_regex": "a", "guided_choice": ["b"]})
            assert two.status_code == 400 and two.json()["error"]["param"] == "guided_choice"


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 10},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


def test_tool_calls_named_required_and_streamed_with_the_openai_client(gen):
    with running(create_app(gen.model, gen.tokenizer, ServerOptions(model_name="tiny"))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        chat = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
        named = client.chat.completions.create(
            model="tiny", messages=chat, tools=[WEATHER, TIME], max_tokens=40, seed=1,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
        assert named.finish_reason == "tool_calls" and named.message.content is None
        (call,) = named.message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        required = client.chat.completions.create(model="tiny", messages=chat, tools=[WEATHER, TIME], seed=2,
                                                  tool_choice="required", parallel_tool_calls=False,
                                                  max_tokens=60).choices[0]
        assert required.finish_reason == "tool_calls" and len(required.message.tool_calls) == 1
        picked = required.message.tool_calls[0].function
        schema = {"get_weather": WEATHER, "get_time": TIME}[picked.name]["function"]["parameters"]
        jsonschema.validate(json.loads(picked.arguments), schema)
        # Streamed: the id and name first, then the arguments in pieces that join to the whole call.
        chunks = list(client.chat.completions.create(
            model="tiny", messages=chat, tools=[WEATHER], max_tokens=40, seed=1, stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}))
        deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        assert deltas[0].id and deltas[0].function.name == "get_weather"
        assert "".join(d.function.arguments for d in deltas) == call.function.arguments
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # The reply to a call comes back as a tool message.
        follow = [*chat, named.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        assert client.chat.completions.create(model="tiny", messages=follow, max_tokens=3).choices[0].message.content
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", messages=chat, tools=[WEATHER],
                                           tool_choice={"type": "function", "function": {"name": "nope"}})
        assert info.value.body["param"] == "tool_choice"


def test_langchain_with_structured_output(gen):
    from langchain_openai import ChatOpenAI

    class Forecast(pydantic.BaseModel):
        """A forecast."""

        model_config = pydantic.ConfigDict(extra="forbid")
        city: str = pydantic.Field(max_length=8)
        days: int = pydantic.Field(ge=1, le=7)

    with running(create_app(gen.model, gen.tokenizer, ServerOptions(model_name="tiny"))) as url:
        llm = ChatOpenAI(model="tiny", base_url=url + "/v1", api_key="x", max_retries=0, max_tokens=60, seed=1)
        for method in ("json_schema", "function_calling"):
            result = llm.with_structured_output(Forecast, method=method).invoke("The forecast for Oslo:")
            assert isinstance(result, Forecast), method


@pytest.mark.slow  # trains a tiny model for a few seconds
def test_instructor_every_json_mode_returns_a_validated_object():
    """instructor's TOOLS, TOOLS_STRICT, JSON_SCHEMA, JSON and MD_JSON modes return a validated pydantic object.

    JSON and MD_JSON send no schema (JSON asks only for some JSON object), so a random model writes strings that
    never end; the model here is first taught, in a few seconds, to answer with short forecasts in JSON, as a
    user's fine-tune would be.
    """
    instructor = pytest.importorskip("instructor", reason="CI installs instructor without its jiter pin: see .ci/run")

    class Forecast(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=8)
        days: int = pydantic.Field(ge=1, le=7)

    torch.manual_seed(0)
    tokenizer = Tokenizer.gpt2()
    # JSON mode's system message holds the schema, about 270 tokens: the tiny preset's 128 positions are too few.
    model = GPT2(GPT2Config.from_preset("tiny", n_positions=512))
    cities = ["Oslo", "Paris", "Rome", "Lima", "Cairo", "Tokyo", "Bern", "Riga"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(120):
        answers = [json.dumps({"city": cities[(step + n) % 8], "days": 1 + (step * n) % 7}, separators=(",", ":"))
                   for n in range(12)]
        ids = [i for text in answers for i in [*tokenizer.encode(text), tokenizer.eot_token]]
        x = torch.tensor(ids[:128])[None]  # (1, T)
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1.0
    with running(create_app(model.eval(), tokenizer, ServerOptions(model_name="tiny"))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        chat = [{"role": "user", "content": "The forecast for Oslo"}]
        modes = (instructor.Mode.TOOLS, instructor.Mode.TOOLS_STRICT, instructor.Mode.JSON_SCHEMA,
                 instructor.Mode.JSON, instructor.Mode.MD_JSON)
        for mode in modes:
            patched = instructor.from_openai(client, mode=mode)
            result = patched.chat.completions.create(model="tiny", response_model=Forecast, messages=chat,
                                                     max_retries=0, max_tokens=60, seed=1)
            assert isinstance(result, Forecast) and result.city in cities, mode


def test_found_by_review_padded_vocabulary_conflicts_and_cut_calls(gen):
    """A vocabulary padded to 50304, a ban that leaves a constraint nothing, a stop string inside a call."""
    padded = TextGenerator(GPT2(GPT2Config.from_preset("tiny", vocab_size=50304)).eval(), gen.tokenizer)
    assert padded("Hi", choice=["yes", "no"], max_new_tokens=5, temperature=0) in ("yes", "no")
    with pytest.raises(OptionError, match="leaves no token that the other options allow"):
        gen("Hi", choice=["yes"], bad_words=["yes"], max_new_tokens=12, seed=0)
    with pytest.raises(OptionError, match="does not combine with min_new_tokens"):
        GenerationOptions(choice=["a"], min_new_tokens=1)
    with running(create_app(gen.model, gen.tokenizer, ServerOptions(model_name="tiny"))) as url:
        body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER], "stop": [","],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "seed": 1,
                "max_tokens": 40}
        choice = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
        arguments = choice["message"]["tool_calls"][0]["function"]["arguments"]
        with pytest.raises(json.JSONDecodeError):
            json.loads(arguments)  # the stop string cut it ...
        assert choice["finish_reason"] == "stop"  # ... so it is no finished call


def test_seeds_per_schema_over_http_streamed_and_not(gen):
    """Each schema over HTTP: 26 choices (2 requests of n=13, seeds apart), one streamed, every one validates.

    The fifty seeds per schema run in-process (test_fifty_seeds_all_parse_and_validate); this is the HTTP path.
    """
    with running(create_app(gen.model, gen.tokenizer, ServerOptions(model_name="tiny", max_batch=16))) as url, \
            httpx.Client(timeout=120) as http:
        for schema in SCHEMAS:
            texts: list[str] = []
            for k, stream in enumerate((False, True)):
                body = {"prompt": "Data:", "max_tokens": 60, "n": 13, "seed": 13 * k, "stream": stream,
                        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
                if not stream:
                    r = http.post(url + "/v1/completions", json=body).json()
                    assert all(c["finish_reason"] == "stop" for c in r["choices"]), r
                    texts += [c["text"] for c in r["choices"]]
                    continue
                pieces = [""] * 13
                with http.stream("POST", url + "/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            for c in json.loads(line[6:])["choices"]:
                                pieces[c["index"]] += c["text"]
                texts += pieces
            assert len(texts) == 26
            for text in texts:
                jsonschema.validate(json.loads(text), schema)


@pytest.mark.slow  # a server process
def test_llm_cli_schema_against_a_server_process(tiny_dir, tmp_path):
    """Simon Willison's `llm --schema`, configured for an OpenAI-compatible server, gets valid JSON back."""
    import os
    import shutil
    import subprocess

    from test_serve_process import serve

    llm = shutil.which("llm")
    assert llm is not None, "the test extra installs llm"
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    with serve(tiny_dir) as (url, _):
        (tmp_path / "extra-openai-models.yaml").write_text(
            f'- model_id: tiny\n  model_name: tiny\n  api_base: "{url}/v1"\n  supports_schema: true\n')
        env = {**os.environ, "LLM_USER_PATH": str(tmp_path), "OPENAI_API_KEY": "x"}
        done = subprocess.run([llm, "-m", "tiny", "--schema", json.dumps(schema), "-o", "max_tokens", "40",
                               "A person"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    jsonschema.validate(json.loads(done.stdout), schema)
