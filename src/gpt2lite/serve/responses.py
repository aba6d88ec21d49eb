"""The pieces of an answer: each choice's stream of events from the scheduler, and the OpenAI response bodies.

``Choice`` bridges one choice between the scheduler's thread and the event loop;
``ResponseBuilder`` makes the bodies and stream chunks of both endpoints from
finished or running choices. Nothing here decides what runs.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from gpt2lite.generation.options import GenerationOptions
from gpt2lite.serve.errors import KINDS, ApiError, api_error
from gpt2lite.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    token_text,
)
from gpt2lite.serve.scheduler import PromptToken
from gpt2lite.serve.scheduler import Request as ScheduledRequest
from gpt2lite.text.assembler import TextAssembler
from gpt2lite.tokenizers.protocol import TokenizerProtocol

__all__ = ["Choice", "ResponseBuilder", "ToolCalls", "cancel", "text_offsets"]

# What tool_calls_schema found: (the forced function's name, or None for a list of calls, and the schema), or None.
ToolCalls = tuple[str | None, dict[str, Any]] | None


class Choice:
    """One choice of a request: what it submits, its text so far, and the events the scheduler's thread sends."""

    def __init__(self, index: int, prompt_ids: list[int], prompt_text: str, assembler: TextAssembler,
                 options: GenerationOptions, loop: asyncio.AbstractEventLoop, prompt_top: int | None) -> None:
        self.index = index
        self.prompt_ids, self.prompt_text = prompt_ids, prompt_text
        self.text = assembler
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.prompt_tokens: list[PromptToken] | None = None
        self.prompt_scored = asyncio.Event()  # set once the prompt's scores came, or the choice ended without
        self.tokens: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.reason: str | None = None
        self.call_ids: list[str] = []  # the ids of its tool calls, once made
        self._call = loop.call_soon_threadsafe  # the scheduler's thread hands events to this loop
        self.scheduled = ScheduledRequest(
            prompt=prompt_ids, options=options,
            on_token=lambda t, lp, top: self._call(self.events.put_nowait, ("token", (t, lp, top))),
            on_done=lambda reason, exc: self._call(self._ended, reason, exc),
        )
        if prompt_top is not None:
            self.scheduled.prompt_top = prompt_top
            self.scheduled.on_prompt_logprobs = lambda tokens: self._call(self._scored, tokens)

    def _scored(self, tokens: list[PromptToken]) -> None:
        self.prompt_tokens = tokens
        self.prompt_scored.set()

    def _ended(self, reason: str, exc: BaseException | None) -> None:
        self.prompt_scored.set()
        self.events.put_nowait(("done", (reason, exc)))

    async def next_piece(self) -> tuple[str, int, bool]:
        """Wait for the next event: (new text, how many new tokens, whether the choice is over)."""
        while True:
            kind, payload = await self.events.get()
            if kind == "done":
                return self._done(*payload)
            token, logprob, top = payload
            before = len(self.tokens)
            self.tokens.append((token, logprob, top))
            try:
                self.text.add(token, logprob, top)
            except ValueError:  # an id the tokenizer cannot decode: end with an error, not a hang
                self.scheduled.cancel()
                raise ApiError(500, f"the model produced token {token}, which the tokenizer cannot decode",
                               kind="server_error") from None
            piece = self.text.take()
            if self.text.done:  # a stop string or the end token: the scheduler can drop the row now
                self.reason = "stop"
                self.scheduled.cancel()
                self.text.finish()
                return piece + self.text.take(), len(self.tokens) - before, True
            return piece, len(self.tokens) - before, False

    def _done(self, reason: str, exc: BaseException | None) -> tuple[str, int, bool]:
        if reason == "error":
            raise api_error(exc) if exc is not None else ApiError(500, "generation failed", kind="server_error")
        if reason == "shutdown":
            raise ApiError(503, "the server shut down before this request finished", kind=KINDS[503])
        if self.reason is None:
            self.reason = "length" if reason == "length" else "stop"
        self.text.finish()
        return self.text.take(), 0, True

    @property
    def kept(self) -> int:
        """How many of the tokens belong to the text (those after a stop string's cut do not)."""
        return sum(1 for s in self.text.starts if s < len(self.text.text))

    def mean_logprob(self) -> float:
        """The mean log-probability of the kept tokens (best_of's ranking, as OpenAI's legacy API)."""
        kept = [lp for _, lp, _ in self.tokens[: self.kept]]
        return sum(kept) / len(kept) if kept else 0.0


class ResponseBuilder:
    """OpenAI's response bodies and stream chunks, for one tokenizer and the served model's name."""

    def __init__(self, tokenizer: TokenizerProtocol, model_name: str) -> None:
        self.tokenizer, self.model_name = tokenizer, model_name

    def meta(self, kind: str) -> dict[str, Any]:
        """The fields every body and chunk of one response shares: its id, object kind, time and model."""
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.model_name}

    @staticmethod
    def usage(choices: list[Choice], prompts: list[tuple[list[int], str]]) -> dict[str, int]:
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        completion_tokens = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # /v1/completions ------------------------------------------------------------------------

    @staticmethod
    def best(choices: list[Choice], prompts: int, best_of: int, n: int) -> list[Choice]:
        """The ``n`` of each prompt's ``best_of`` choices with the highest mean log-probability (OpenAI's legacy)."""
        if best_of <= n:
            return choices
        chosen = []
        for p in range(prompts):
            group = sorted(choices[p * best_of : (p + 1) * best_of], key=lambda c: -c.mean_logprob())
            for rank, c in enumerate(group[:n]):
                c.index = p * n + rank
                chosen.append(c)
        return chosen

    def completion_choice(self, c: Choice, body: CompletionRequest) -> dict[str, Any]:
        """A finished completion choice (with the prompt first when echoed)."""
        kept = c.tokens[: c.kept]
        text = c.text.text
        offsets = list(c.text.starts[: c.kept])
        tokens: list[Any] = [(t, lp, top) for t, lp, top in kept]
        if body.echo:
            shift = len(c.prompt_text)
            text = c.prompt_text + text
            offsets = [o + shift for o in offsets]
            if c.prompt_tokens is not None:
                tokens = [(t, lp, top) for t, (lp, _, top) in zip(c.prompt_ids, c.prompt_tokens, strict=True)] + tokens
                offsets = text_offsets(self.tokenizer, c.prompt_ids) + offsets
        out = {"text": text, "index": c.index, "finish_reason": c.reason,
               "logprobs": completion_logprobs(self.tokenizer, tokens, offsets) if body.logprobs is not None else None}
        if body.prompt_logprobs is not None and c.prompt_tokens is not None:
            out["prompt_logprobs"] = self.vllm_prompt_logprobs(c)
        return out

    def vllm_prompt_logprobs(self, c: Choice) -> list[dict[str, Any] | None]:
        """vLLM's ``prompt_logprobs``: per prompt token ``{id: {logprob, rank, decoded_token}}`` (None first)."""
        out: list[dict[str, Any] | None] = []
        for t, (lp, rank, top) in zip(c.prompt_ids, c.prompt_tokens or [], strict=True):
            if lp is None:
                out.append(None)
                continue
            entry = {str(i): {"logprob": v, "rank": r + 1, "decoded_token": token_text(self.tokenizer, i)}
                     for r, (i, v) in enumerate(top)}
            entry[str(t)] = {"logprob": lp, "rank": rank, "decoded_token": token_text(self.tokenizer, t)}
            out.append(entry)
        return out

    async def echo_chunk(self, c: Choice, body: CompletionRequest, meta: dict[str, Any]) -> dict[str, Any]:
        """The first chunk of a streamed echo: the prompt, with its tokens' log-probabilities when asked."""
        block = None
        if body.logprobs is not None:
            await c.prompt_scored.wait()  # at prefill, before any token comes (an early end: next_piece says)
            if c.prompt_tokens is not None:
                tokens = [(t, lp, top) for t, (lp, _, top) in zip(c.prompt_ids, c.prompt_tokens, strict=True)]
                block = completion_logprobs(self.tokenizer, tokens, text_offsets(self.tokenizer, c.prompt_ids))
        return {**meta, "choices": [{"text": c.prompt_text, "index": c.index, "logprobs": block,
                                     "finish_reason": None}]}

    def completion_chunk(self, c: Choice, piece: str, count: int, done: bool, body: CompletionRequest,
                         meta: dict[str, Any]) -> dict[str, Any] | None:
        """A streamed completion chunk of the ``count`` newest tokens (None: nothing to send)."""
        block = None
        if body.logprobs is not None and count:
            new = c.tokens[len(c.tokens) - count :]
            kept = [tok for k, tok in enumerate(new) if len(c.tokens) - count + k < c.kept or not c.text.done]
            shift = len(c.prompt_text) if body.echo else 0
            starts = c.text.starts[len(c.tokens) - count : len(c.tokens) - count + len(kept)]
            block = completion_logprobs(self.tokenizer, kept, [s + shift for s in starts]) if kept else None
        if not (piece or block or done):
            return None
        return {**meta, "choices": [{"text": piece, "index": c.index, "logprobs": block,
                                     "finish_reason": c.reason if done else None}]}

    # /v1/chat/completions -------------------------------------------------------------------

    def chat_first(self, choice: Choice, meta: dict[str, Any]) -> dict[str, Any]:
        """A streamed choice's first chunk: the assistant's role."""
        return {**meta, "choices": [{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]}

    def chat_chunk(self, c: Choice, piece: str, count: int, done: bool, body: ChatCompletionRequest,
                   meta: dict[str, Any], tools: ToolCalls = None) -> dict[str, Any] | None:
        """A streamed chat chunk of the ``count`` newest tokens (None: nothing to send)."""
        logprobs = None
        if body.logprobs and count:
            new = [tok for k, tok in enumerate(c.tokens[len(c.tokens) - count :])
                   if len(c.tokens) - count + k < c.kept or not c.text.done]
            logprobs = chat_logprobs(self.tokenizer, new) if new else None
        delta: dict[str, Any] = {"content": piece} if piece else {}
        reason = c.reason if done else None
        if tools is not None and tools[0] is not None:  # one named function: its arguments stream as they come
            delta = {"tool_calls": [self._call_delta(c, tools[0], piece)]} if piece else {}
            reason = "tool_calls" if done and self.finished_calls(c, tools) else reason
        elif tools is not None:  # a list of calls: sent whole once it is (a cut one is sent as text)
            calls = self.calls(c, tools) if done else None
            delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]} if calls else \
                ({"content": c.text.text} if done else {})
            reason = "tool_calls" if calls and self.finished_calls(c, tools) else reason
        if not (delta or logprobs or done):
            return None
        return {**meta, "choices": [{"index": c.index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": reason}]}

    def chat_choice(self, c: Choice, body: ChatCompletionRequest, tools: ToolCalls = None) -> dict[str, Any]:
        """A finished chat choice: its text, or the tool calls it makes (``tools``: ``tool_calls_schema``'s)."""
        message: dict[str, Any] = {"role": "assistant", "content": c.text.text, "refusal": None}
        reason = c.reason
        calls = self.calls(c, tools)
        if calls is not None:
            message.update(content=None, tool_calls=calls)
            reason = "tool_calls" if self.finished_calls(c, tools) else reason
        return {"index": c.index, "message": message,
                "logprobs": chat_logprobs(self.tokenizer, c.tokens[: c.kept]) if body.logprobs else None,
                "finish_reason": reason}

    def finished_calls(self, c: Choice, tools: ToolCalls) -> list[dict[str, Any]] | None:
        """A finished reply's tool calls; None when it is text, or calls that max_tokens or a stop string cut.

        The one rule for ``finish_reason: "tool_calls"`` (and Anthropic's ``tool_use``): a stop string can end
        the text before the JSON does, and then it is no finished call.
        """
        calls = self.calls(c, tools)
        return calls if calls is not None and c.reason == "stop" and _is_json(c.text.text) else None

    @staticmethod
    def _call_id(c: Choice, i: int) -> str:
        """The id of a choice's ``i``-th tool call, the same in every chunk."""
        while len(c.call_ids) <= i:
            c.call_ids.append(f"call_{uuid.uuid4().hex[:24]}")
        return c.call_ids[i]

    def _call_delta(self, c: Choice, name: str, piece: str) -> dict[str, Any]:
        """A streamed piece of a named function's arguments; the first carries its id and name."""
        if c.call_ids:
            return {"index": 0, "function": {"arguments": piece}}
        return {"index": 0, "id": self._call_id(c, 0), "type": "function",
                "function": {"name": name, "arguments": piece}}

    def calls(self, c: Choice, tools: ToolCalls) -> list[dict[str, Any]] | None:
        """OpenAI's ``tool_calls`` of a reply written under a tool choice (None: a text reply, or a cut list)."""
        if tools is None:
            return None
        if tools[0] is not None:
            return [{"id": self._call_id(c, 0), "type": "function",
                     "function": {"name": tools[0], "arguments": c.text.text}}]
        try:
            items = json.loads(c.text.text)
        except json.JSONDecodeError:
            return None  # max_tokens cut the list
        return [{"id": self._call_id(c, i), "type": "function",
                 "function": {"name": item["name"], "arguments": json.dumps(item["arguments"])}}
                for i, item in enumerate(items)]


def _is_json(text: str) -> bool:
    """Whether ``text`` is whole JSON (a tool call's arguments that no stop string or max_tokens cut)."""
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def cancel(work: asyncio.Future, choices: list[Choice]) -> None:
    work.cancel()
    work.add_done_callback(_forget)
    for c in choices:
        c.scheduled.cancel()


def _forget(future: asyncio.Future) -> None:
    """Take a cancelled task's outcome, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


def text_offsets(tokenizer: Any, ids: list[int]) -> list[int]:
    """Where each token's text begins in the decoded text of ``ids`` (a token inside a character: that character)."""
    decoder = tokenizer.stream_decoder()
    offsets, length = [], 0
    for t in ids:
        offsets.append(length)
        length += len(decoder.add(t))
    return offsets
