"""Anthropic's Messages API (``POST /v1/messages``) as a thin translation onto the chat path.

A Messages body becomes a ``ChatCompletionRequest`` (``system`` first, content
blocks joined to text, ``tool_use``/``tool_result`` blocks as OpenAI's tool calls
and tool messages, ``tools`` and ``tool_choice`` in OpenAI's shape), runs through
the same gate, template and scheduler, and the finished choice (or its stream of
pieces) is written back as Anthropic's message and its events (``message_start``
... ``message_stop``). Errors keep the server's one JSON shape.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpt2lite.errors import OptionError
from gpt2lite.serve.protocol import ChatCompletionRequest
from gpt2lite.serve.responses import Choice, ResponseBuilder, ToolCalls

__all__ = ["MessageEvents", "MessagesRequest", "message_body", "to_chat"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AnthropicMessage(BaseModel):
    """One turn: ``user`` or ``assistant``, its content a string or a list of blocks."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicTool(BaseModel):
    """A tool: its name, description and the JSON schema of its input."""

    model_config = ConfigDict(extra="allow", strict=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    input_schema: dict[str, Any]


class AnthropicToolChoice(_Strict):
    """``tool_choice``: ``auto``, ``any`` (some tool), ``tool`` (the named one) or ``none``."""

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class OutputFormat(_Strict):
    """``output_config.format``: JSON valid under a schema."""

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Strict):
    """``output_config``: the output's ``format`` (``effort`` is accepted and changes nothing)."""

    format: OutputFormat | None = None
    effort: str | None = None


class MessagesRequest(_Strict):
    """The body of ``POST /v1/messages`` (Anthropic's fields; thinking and images are not supported)."""

    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    output_config: OutputConfig | None = None
    thinking: dict[str, Any] | None = None  # only {"type": "disabled"}
    # Anthropic's fields that change nothing here: accepted and ignored.
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None
    container: Any = None
    diagnostics: Any = None
    inference_geo: str | None = None
    speed: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None


def _text(content: str | list[dict[str, Any]], param: str) -> str:
    """The text of a content: a string, or text blocks joined."""
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise OptionError(f"{param}.{i}", f"{param}.{i}: only text blocks can be read here, got "
                                              f"{block.get('type')!r}")
        parts.append(block["text"])
    return "".join(parts)


def _turn(message: AnthropicMessage, index: int) -> list[dict[str, Any]]:
    """One Anthropic turn as OpenAI chat messages (tool results become ``tool`` messages)."""
    param = f"messages.{index}.content"
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for i, block in enumerate(message.content):
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and message.role == "assistant":
            calls.append({"id": str(block.get("id", "")), "type": "function",
                          "function": {"name": str(block.get("name", "")),
                                       "arguments": json.dumps(block.get("input", {}))}})
        elif kind == "tool_result" and message.role == "user":
            content = block.get("content", "")
            results.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")),
                            "content": _text(content, f"{param}.{i}.content")})
        else:
            raise OptionError(f"{param}.{i}", f"{param}.{i}: a {message.role} turn cannot hold a {kind!r} block "
                                              f"here (text, tool_use from the assistant, tool_result from the user)")
    out = list(results)
    if texts or calls or not results:
        turn: dict[str, Any] = {"role": message.role, "content": "".join(texts)}
        if calls:
            turn["tool_calls"] = calls
        out.append(turn)
    return out


def to_chat(body: MessagesRequest) -> ChatCompletionRequest:
    """The chat request a Messages body asks for."""
    messages: list[dict[str, Any]] = []
    if body.system is not None:
        messages.append({"role": "system", "content": _text(body.system, "system")})
    for index, message in enumerate(body.messages):
        messages.extend(_turn(message, index))
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "max_tokens": body.max_tokens,
                            "stream": body.stream, "stop": body.stop_sequences}
    for field in ("temperature", "top_p", "top_k"):
        if getattr(body, field) is not None:
            chat[field] = getattr(body, field)
    if body.tools:
        chat["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                           "parameters": t.input_schema}} for t in body.tools]
    if body.thinking is not None and body.thinking.get("type") != "disabled":
        raise OptionError("thinking", "thinking is not supported: GPT-2 has no reasoning mode")
    if body.output_config is not None and body.output_config.format is not None:
        chat["response_format"] = {"type": "json_schema", "json_schema": {"schema": body.output_config.format.schema_}}
    choice = body.tool_choice
    if choice is not None:
        if choice.type == "tool" and not choice.name:
            raise OptionError("tool_choice", "tool_choice of type 'tool' needs the tool's name")
        chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or \
            {"type": "function", "function": {"name": choice.name}}
        if choice.disable_parallel_tool_use:
            chat["parallel_tool_calls"] = False
    return ChatCompletionRequest.model_validate(chat)


def _stop(c: Choice, calls: list[dict[str, Any]] | None) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` of a finished choice."""
    if calls:
        return "tool_use", None
    if c.reason == "length":
        return "max_tokens", None
    if c.text.stopped_by is not None:
        return "stop_sequence", c.text.stopped_by
    return "end_turn", None


def _blocks(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool calls as Anthropic ``tool_use`` blocks."""
    return [{"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"), "name": call["function"]["name"],
             "input": json.loads(call["function"]["arguments"])} for call in calls]


def message_body(build: ResponseBuilder, c: Choice, prompt_tokens: int, tools: ToolCalls) -> dict[str, Any]:
    """The Messages API's answer for a finished choice."""
    calls = build.finished_calls(c, tools)
    reason, sequence = _stop(c, calls)
    content = _blocks(calls) if calls else [{"type": "text", "text": c.text.text}]
    return {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": build.model_name,
            "content": content, "stop_reason": reason, "stop_sequence": sequence,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": len(c.tokens)}}


def _event(kind: str, **data: Any) -> dict[str, str]:
    return {"event": kind, "data": json.dumps({"type": kind, **data})}


class MessageEvents:
    """The stream of one choice as Anthropic's events: text arrives as it comes, tool calls once whole."""

    def __init__(self, build: ResponseBuilder, c: Choice, prompt_tokens: int, tools: ToolCalls) -> None:
        self.build, self.choice, self.tools = build, c, tools
        self.prompt_tokens = prompt_tokens
        self.text_open = False

    def start(self) -> Iterator[dict[str, str]]:
        """``message_start``, then (for a text reply) the text block's start."""
        message = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "content": [],
                   "model": self.build.model_name, "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0}}
        yield _event("message_start", message=message)
        if self.tools is None:
            yield from self._open_text()

    def _open_text(self) -> Iterator[dict[str, str]]:
        self.text_open = True
        yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})

    def piece(self, piece: str, done: bool) -> Iterator[dict[str, str]]:
        """The events for a new piece of text, and the last ones once the choice is done."""
        if piece and self.tools is None:
            yield _event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
        if not done:
            return
        c = self.choice
        calls = self.build.finished_calls(c, self.tools)
        if calls:
            for i, block in enumerate(_blocks(calls)):
                yield _event("content_block_start", index=i, content_block={**block, "input": {}})
                yield _event("content_block_delta", index=i,
                             delta={"type": "input_json_delta", "partial_json": json.dumps(block["input"])})
                yield _event("content_block_stop", index=i)
        else:
            if not self.text_open:  # a tool call cut short: its text, as a text block
                yield from self._open_text()
                yield _event("content_block_delta", index=0, delta={"type": "text_delta", "text": c.text.text})
            yield _event("content_block_stop", index=0)
        reason, sequence = _stop(c, calls)
        yield _event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                     usage={"output_tokens": len(c.tokens)})
        yield _event("message_stop")
