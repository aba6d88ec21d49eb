"""The Messages API (the anthropic SDK) and the Responses API (the openai client) against a real server.

Both are translations onto the chat path: the oracle for what they say is the
chat completion of the same conversation (the same tokens, the same stop), and
for their shape the official clients, which parse every body and event.
"""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest

from gpt2lite import TextGenerator
from gpt2lite.serve.app import ServerOptions, create_app
from test_serve import running

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tiny_dir):
    gen = TextGenerator.from_pretrained(tiny_dir)
    with running(create_app(gen.model, gen.tokenizer, ServerOptions(model_name="tiny"))) as url:
        yield url


@pytest.fixture(scope="module")
def chat(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=60)

    def complete(messages, **options):
        """The whole chat completion (its one choice, and its usage)."""
        return client.chat.completions.create(model="tiny", messages=messages, temperature=0, **options)

    return complete


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server, api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def responses(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=60).responses


def test_messages_equal_the_chat_path_plain_and_streamed(claude, chat):
    conversation = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once"},
                    {"role": "user", "content": [{"type": "text", "text": "Go "}, {"type": "text", "text": "on."}]}]
    completion = chat([{"role": "system", "content": "Be brief."}, *conversation[:2],
                       {"role": "user", "content": "Go on."}], max_tokens=12)
    expected = completion.choices[0]
    # The SDK has no sampling parameters any more; older clients and curl send them in the body.
    message = claude.messages.create(model="tiny", system="Be brief.", messages=conversation, max_tokens=12,
                                     extra_body={"temperature": 0})
    assert message.type == "message" and message.role == "assistant" and message.model == "tiny"
    assert message.content[0].type == "text" and message.content[0].text == expected.message.content
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[expected.finish_reason]
    assert message.usage.output_tokens == completion.usage.completion_tokens
    assert message.usage.input_tokens == completion.usage.prompt_tokens
    with claude.messages.stream(model="tiny", system="Be brief.", messages=conversation, max_tokens=12,
                                extra_body={"temperature": 0}) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == expected.message.content and len(pieces) > 1
    assert final.content[0].text == message.content[0].text and final.stop_reason == message.stop_reason
    assert final.usage.input_tokens == message.usage.input_tokens > 0


def test_messages_stop_sequences_and_tool_use(claude, chat):
    free = chat([{"role": "user", "content": "Hi"}], max_tokens=12).choices[0].message.content
    stop = free.strip().split(" ")[1]  # a word the reply holds, past its start
    message = claude.messages.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=12,
                                     extra_body={"temperature": 0}, stop_sequences=[stop])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert message.content[0].text == free[: free.index(stop)]
    tool = {"name": "get_weather", "description": "The forecast", "input_schema": WEATHER}
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    for stream in (False, True):
        if stream:
            with claude.messages.stream(model="tiny", messages=ask, max_tokens=40, tools=[tool],
                                        tool_choice={"type": "tool", "name": "get_weather"}) as events:
                called = events.get_final_message()
        else:
            called = claude.messages.create(model="tiny", messages=ask, max_tokens=40, tools=[tool],
                                            tool_choice={"type": "tool", "name": "get_weather"})
        assert called.stop_reason == "tool_use"
        (use,) = called.content
        assert use.type == "tool_use" and use.name == "get_weather" and use.id.startswith("toolu_")
        jsonschema.validate(use.input, WEATHER)
    # The result comes back as a tool_result block; the conversation goes on.
    follow = [*ask, {"role": "assistant", "content": [use.model_dump()]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    assert claude.messages.create(model="tiny", messages=follow, max_tokens=3).content[0].type == "text"


def test_messages_parse_a_pydantic_output_format(claude):
    from typing import Literal

    import pydantic

    class Weather(pydantic.BaseModel):  # the SDK drops maxLength and bounds from the schema: enums stay short
        city: Literal["Oslo", "Rome", "Lima"]
        sunny: bool

    parsed = claude.messages.parse(model="tiny", messages=[{"role": "user", "content": "Weather?"}], max_tokens=40,
                                   output_format=Weather)
    assert isinstance(parsed.parsed_output, Weather)


def test_messages_errors_name_the_field(claude):
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}],
            max_tokens=5)
    assert "messages.0.content.0" in info.value.message
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-9", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model="tiny", messages=[{"role": "user", "content": "hello " * 200}], max_tokens=5)
    assert "maximum context length" in info.value.message


def test_responses_equal_the_chat_path_plain_and_streamed(responses, chat):
    completion = chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}],
                      max_tokens=10)
    expected = completion.choices[0]
    reply = responses.create(model="tiny", instructions="Be brief.", input="Tell me a story.",
                             max_output_tokens=10, temperature=0)
    assert reply.object == "response" and reply.output_text == expected.message.content
    assert reply.status == ("incomplete" if expected.finish_reason == "length" else "completed")
    assert reply.usage.output_tokens == completion.usage.completion_tokens
    assert reply.usage.input_tokens == completion.usage.prompt_tokens
    events = list(responses.create(model="tiny", instructions="Be brief.", max_output_tokens=10, temperature=0,
                                   input=[{"role": "user", "content": [{"type": "input_text",
                                                                        "text": "Tell me a story."}]}],
                                   stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == f"response.{reply.status}"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == reply.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == reply.output_text


def test_responses_json_schema_and_function_calls(responses):
    reply = responses.create(model="tiny", input="A forecast:", max_output_tokens=40, temperature=0,
                             text={"format": {"type": "json_schema", "name": "weather", "schema": WEATHER,
                                              "strict": True}})
    jsonschema.validate(json.loads(reply.output_text), WEATHER)
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER}
    for stream in (False, True):
        kwargs = dict(model="tiny", input="Weather in Oslo?", max_output_tokens=40, tools=[tool],
                      tool_choice={"type": "function", "name": "get_weather"})
        if stream:
            events = list(responses.create(**kwargs, stream=True))
            output = events[-1].response.output
        else:
            output = responses.create(**kwargs).output
        (call,) = output
        assert call.type == "function_call" and call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), WEATHER)
    follow = responses.create(model="tiny", max_output_tokens=3, input=[
        {"role": "user", "content": "Weather in Oslo?"}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert follow.output[0].type == "message"
    with pytest.raises(openai.BadRequestError) as info:
        responses.create(model="tiny", input="Hi", previous_response_id="resp_1")
    assert info.value.body["param"] == "previous_response_id"
