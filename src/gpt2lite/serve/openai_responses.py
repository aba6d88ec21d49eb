"""OpenAI's Responses API (``POST /v1/responses``), stateless, as a thin translation onto the chat path.

``input`` (a string, or message and function-call items) and ``instructions``
become a ``ChatCompletionRequest``; ``text.format`` becomes its
``response_format`` and function ``tools`` its tools. The finished choice is
written back as a ``response`` object with ``output`` items (a message of
``output_text``, or ``function_call`` items), streamed as the typed events
``response.created`` ... ``response.completed``. Nothing is stored, so
``previous_response_id`` is refused by name.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpt2lite.errors import OptionError
from gpt2lite.serve.protocol import ChatCompletionRequest
from gpt2lite.serve.responses import Choice, ResponseBuilder, ToolCalls

__all__ = ["ResponseEvents", "ResponsesRequest", "response_body", "to_chat"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextFormat(BaseModel):
    """``text.format``: free text, any JSON object, or JSON under a named schema."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextOptions(_Strict):
    """``text``: its ``format`` (and ``verbosity``, accepted)."""

    format: TextFormat | None = None
    verbosity: str | None = None


class FunctionTool(BaseModel):
    """A function tool, in the Responses API's flat shape."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(_Strict):
    """``tool_choice: {"type": "function", "name": ...}``."""

    type: Literal["function"]
    name: str


class ResponsesRequest(_Strict):
    """The body of ``POST /v1/responses`` (the stateless part of OpenAI's fields)."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: bool = False
    text: TextOptions | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)  # vLLM's extra


def _content(content: Any, param: str) -> str:
    """A message's content: a string, or text parts (``input_text``, ``output_text``) joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise OptionError(param, f"{param} must be a string or a list of text parts")
    parts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") \
                or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise OptionError(f"{param}.{i}", f"{param}.{i}: only text parts can be read here, got {kind!r}")
        parts.append(part["text"])
    return "".join(parts)


def _messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``input`` as OpenAI chat messages: message items, function calls and their outputs."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message" and item.get("role") in ("user", "assistant", "system", "developer"):
            out.append({"role": item["role"], "content": _content(item.get("content"), f"input.{i}.content")})
        elif kind == "function_call":
            call = {"id": str(item.get("call_id", "")), "type": "function",
                    "function": {"name": str(item.get("name", "")), "arguments": str(item.get("arguments", ""))}}
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")),
                        "content": _content(item.get("output", ""), f"input.{i}.output")})
        else:
            raise OptionError(f"input.{i}", f"input.{i}: items are messages (role user, assistant, system or "
                                            f"developer), function_call or function_call_output, got {kind!r}")
    if not out:
        raise OptionError("input", "input is empty")
    return out


def to_chat(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request a Responses body asks for."""
    if body.previous_response_id is not None:
        raise OptionError("previous_response_id", "this server keeps no responses (it is stateless): send the "
                                                  "whole conversation as input instead of previous_response_id")
    messages = _messages(body.input)
    if body.instructions is not None:
        messages.insert(0, {"role": "system", "content": body.instructions})
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream,
                            "max_tokens": body.max_output_tokens}
    for field in ("temperature", "top_p", "seed", "parallel_tool_calls"):
        if getattr(body, field) is not None:
            chat[field] = getattr(body, field)
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise OptionError("text.format", "text.format of type json_schema needs its schema")
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_,
                                                                          "strict": fmt.strict}}
    if body.tools:
        chat["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                           "parameters": t.parameters}} for t in body.tools]
    if isinstance(body.tool_choice, NamedFunctionChoice):
        chat["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    elif body.tool_choice is not None:
        chat["tool_choice"] = body.tool_choice
    return ChatCompletionRequest.model_validate(chat)


def _output(build: ResponseBuilder, c: Choice, tools: ToolCalls, message_id: str) -> list[dict[str, Any]]:
    """The ``output`` items of a finished choice: its function calls, or one message of its text."""
    calls = build.finished_calls(c, tools)
    if calls:
        return [{"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"), "call_id": call["id"],
                 "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                 "status": "completed"} for call in calls]
    return [{"type": "message", "id": message_id, "status": "completed" if c.reason != "length" else "incomplete",
             "role": "assistant", "content": [_part(c.text.text)]}]


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _response(body: ResponsesRequest, build: ResponseBuilder, response_id: str, created: int,
              status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    """A ``response`` object (the body, and what the stream's events carry)."""
    fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else \
        {"type": "text"}
    return {"id": response_id, "object": "response", "created_at": created, "status": status,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": build.model_name, "output": output, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None, "temperature": body.temperature, "top_p": body.top_p,
            "tool_choice": body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel)
            else (body.tool_choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []], "text": {"format": fmt},
            "truncation": body.truncation or "disabled", "usage": usage, "metadata": body.metadata or {},
            "store": False}


def _usage(c: Choice, prompt_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": len(c.tokens), "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + len(c.tokens)}


def response_body(body: ResponsesRequest, build: ResponseBuilder, c: Choice, prompt_tokens: int,
                  tools: ToolCalls) -> dict[str, Any]:
    """The Responses API's answer for a finished choice."""
    status = "incomplete" if c.reason == "length" else "completed"
    return _response(body, build, f"resp_{uuid.uuid4().hex}", int(time.time()), status,
                     _output(build, c, tools, f"msg_{uuid.uuid4().hex}"), _usage(c, prompt_tokens))


class ResponseEvents:
    """The stream of one choice as the Responses API's typed events, numbered in order."""

    def __init__(self, body: ResponsesRequest, build: ResponseBuilder, c: Choice, prompt_tokens: int,
                 tools: ToolCalls) -> None:
        self.body, self.build, self.choice, self.tools = body, build, c, tools
        self.prompt_tokens = prompt_tokens
        self.id, self.created = f"resp_{uuid.uuid4().hex}", int(time.time())
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.number = 0
        self.text_open = False

    def _event(self, kind: str, **data: Any) -> dict[str, str]:
        self.number += 1
        return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": self.number - 1, **data})}

    def _text_open(self) -> Iterator[dict[str, str]]:
        self.text_open = True
        item = {"type": "message", "id": self.message_id, "status": "in_progress", "role": "assistant",
                "content": []}
        yield self._event("response.output_item.added", output_index=0, item=item)
        yield self._event("response.content_part.added", item_id=self.message_id, output_index=0, content_index=0,
                          part=_part(""))

    def start(self) -> Iterator[dict[str, str]]:
        """``response.created`` and ``response.in_progress``, then (for a text reply) the message's start."""
        waiting = _response(self.body, self.build, self.id, self.created, "in_progress", [], None)
        yield self._event("response.created", response=waiting)
        yield self._event("response.in_progress", response=waiting)
        if self.tools is None:
            yield from self._text_open()

    def piece(self, piece: str, done: bool) -> Iterator[dict[str, str]]:
        """The events for a new piece of text, and the last ones once the choice is done."""
        if piece and self.tools is None:
            yield self._event("response.output_text.delta", item_id=self.message_id, output_index=0,
                              content_index=0, delta=piece, logprobs=[])
        if not done:
            return
        c = self.choice
        output = _output(self.build, c, self.tools, self.message_id)
        for index, item in enumerate(output):
            if item["type"] == "function_call":
                yield self._event("response.output_item.added", output_index=index,
                                  item={**item, "arguments": "", "status": "in_progress"})
                yield self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                  delta=item["arguments"])
                yield self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                  arguments=item["arguments"])
            else:
                if not self.text_open:  # a tool call cut short: its text, as a message
                    yield from self._text_open()
                    yield self._event("response.output_text.delta", item_id=self.message_id, output_index=0,
                                      content_index=0, delta=c.text.text, logprobs=[])
                yield self._event("response.output_text.done", item_id=self.message_id, output_index=0,
                                  content_index=0, text=c.text.text, logprobs=[])
                yield self._event("response.content_part.done", item_id=self.message_id, output_index=0,
                                  content_index=0, part=_part(c.text.text))
            yield self._event("response.output_item.done", output_index=index, item=item)
        status = "incomplete" if c.reason == "length" else "completed"
        final = _response(self.body, self.build, self.id, self.created, status, output,
                          _usage(c, self.prompt_tokens))
        yield self._event(f"response.{status}", response=final)
