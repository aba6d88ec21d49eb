"""The OpenAI-compatible HTTP layer: requests in, scheduler submissions out, responses back. No model code here.

``create_app(text_generator)`` builds a FastAPI app around an already loaded
``TextGenerator``; ``gpt2lite serve`` runs it under uvicorn. Endpoints:

- ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed over
  server-sent events with ``"stream": true``);
- ``GET /v1/models``, ``GET /v1/models/{id}``;
- ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info`` (vLLM's);
- ``GET /health``, ``GET /metrics`` (Prometheus text format), without the key;
- ``GET /``: the playground, a self-contained page (``playground.html``) that
  calls the API above from the browser (also without the key: it asks for one).

Before a body is read, a gate checks the API key (``hmac.compare_digest``) and
the body's size (413 past ``max_body_size``); every error is OpenAI's JSON
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt2lite.generation.options import GenerationOptions
from gpt2lite.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_logprobs,
    check_chat_extras,
    completion_logprobs,
    sampling_options,
    stop_strings,
    token_text,
)
from gpt2lite.serve.scheduler import PromptToken, QueueFull, Scheduler
from gpt2lite.serve.scheduler import Request as ScheduledRequest
from gpt2lite.text.assembler import TextAssembler
from gpt2lite.text.generator import TextGenerator

__all__ = ["ApiError", "ServerOptions", "create_app"]

log = logging.getLogger("gpt2lite.serve")

PUBLIC_PATHS = ("/health", "/metrics", "/")  # served without the API key


@dataclass(frozen=True)
class ServerOptions:
    """How the server runs: its name for the model, batch and queue sizes, and its limits."""

    model_name: str = "gpt2"  # the id clients send as "model" and /v1/models lists
    max_batch: int = 16  # requests decoded together
    max_queue: int = 256  # requests that may wait for a row; more get 429
    api_key: str | None = None  # require "Authorization: Bearer KEY" (all but /health and /metrics)
    max_body_size: int = 4 * 2**20  # bytes; a larger request body gets 413 before it is parsed
    docs: bool = False  # serve /docs and /openapi.json (behind the key)
    prefix_cache: bool = True  # reuse the keys and values of a prompt prefix a freed row still holds
    playground: bool = True  # serve the playground page at /

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_body_size < 1:
            raise ValueError("max_batch, max_queue and max_body_size must be >= 1")


_TOO_LONG = "context_length_exceeded"  # OpenAI's code for a prompt that does not fit


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}``."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(ApiError(status, message, param, kind).body(), status)


_KINDS = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "server_error"}


def _from_exception(exc: BaseException) -> ApiError:
    """A failed request's error: bad input is a 400, anything else a 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (ValueError, TypeError)):
        return ApiError(400, str(exc))
    return ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error")


class _Gate:
    """ASGI middleware: the API key and the body's size are checked before the body is read."""

    def __init__(self, app: Any, api_key: str | None, max_body_size: int) -> None:
        self.app = app
        self.key = api_key.encode() if api_key is not None else None
        self.limit = max_body_size

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] not in PUBLIC_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            # Both compared whatever the scheme, so the time taken says nothing about the key.
            if not hmac.compare_digest(token.strip(), self.key) or scheme.lower() != b"bearer":
                response = _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                  kind=_KINDS[401])
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
        too_big = _error(413, f"the request body is larger than this server's limit of {self.limit} bytes",
                         kind=_KINDS[413])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_big(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:  # read at most the limit: a larger body is never held whole
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the disconnect, when it comes

        return await self.app(scope, replay, send)


class _MetricsCollector:
    """Reads the scheduler's counters at each scrape."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Any:
        s = self.scheduler.stats
        for name, value, text in (
            ("gpt2lite_requests", s.requests, "requests accepted"),
            ("gpt2lite_requests_finished", s.finished, "requests that ended by stop or length"),
            ("gpt2lite_requests_failed", s.failed, "requests that failed"),
            ("gpt2lite_requests_cancelled", s.cancelled, "requests cancelled (client gone, stop string)"),
            ("gpt2lite_generated_tokens", s.generated_tokens, "tokens generated"),
            ("gpt2lite_prompt_tokens", s.prompt_tokens, "prompt tokens prefilled"),
            ("gpt2lite_cached_prompt_tokens", s.cached_prompt_tokens, "prompt tokens served from the prefix cache"),
            ("gpt2lite_decode_steps", s.steps, "batched decode steps"),
        ):
            yield CounterMetricFamily(name, text, value=value)
        yield GaugeMetricFamily("gpt2lite_queue_depth", "requests waiting for a row", value=self.scheduler.queue_depth)
        yield GaugeMetricFamily("gpt2lite_running_batch_size", "requests decoding", value=self.scheduler.running)


class _Choice:
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
            raise _from_exception(exc) if exc is not None else ApiError(500, "generation failed", kind="server_error")
        if reason == "shutdown":
            raise ApiError(503, "the server shut down before this request finished", kind=_KINDS[503])
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


class _Server:
    """The route handlers, over one scheduler and one tokenizer."""

    def __init__(self, text_generator: TextGenerator, options: ServerOptions, scheduler: Scheduler) -> None:
        self.text_generator = text_generator
        self.tokenizer = text_generator.tokenizer
        self.options = options
        self.scheduler = scheduler
        self.context = text_generator.model.config.n_positions
        self.vocab = text_generator.model.config.vocab_size
        self.registry = CollectorRegistry()
        self.registry.register(_MetricsCollector(scheduler))
        self.latency = Histogram("gpt2lite_request_latency_seconds", "time from request to last token",
                                 registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

    # small endpoints --------------------------------------------------------------------

    async def health(self) -> JSONResponse:
        ok = self.scheduler.accepting
        status = "ok" if ok else ("shutting down" if self.scheduler.alive else "stopped")
        return JSONResponse({"status": status, "running": self.scheduler.running,
                             "waiting": self.scheduler.queue_depth}, 200 if ok else 503)

    async def metrics(self) -> Response:
        return Response(generate_latest(self.registry), media_type="text/plain; version=0.0.4")

    def _card(self) -> dict[str, Any]:
        return {"id": self.options.model_name, "object": "model", "created": 0, "owned_by": "gpt2lite",
                "max_model_len": self.context}

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._card()]}

    async def model(self, model_id: str) -> dict[str, Any]:
        self._check_model(model_id)
        return self._card()

    async def tokenizer_info(self) -> dict[str, Any]:
        eos = self.tokenizer.decode([self.tokenizer.eot_token])
        return {"eos_token": eos, "bos_token": eos, "pad_token": None, "model_max_length": self.context,
                "chat_template": self.text_generator.chat_template}

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt or messages", "prompt")
        if body.messages is not None:
            ids = await self._encode(await run_in_threadpool(self._chat_prompt, body.messages), "messages",
                                     special=True)
        else:
            ids = await self._encode(body.prompt, "prompt")
        out: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": self.context}
        if body.return_token_strs:
            out["token_strs"] = [token_text(self.tokenizer, t) for t in ids]
        return out

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        self._check_model(body.model)
        try:
            return {"prompt": self.tokenizer.decode(body.tokens)}
        except (ValueError, TypeError) as exc:
            raise ApiError(400, str(exc), "tokens") from None

    # helpers ------------------------------------------------------------------------------

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.options.model_name:
            raise ApiError(404, f"the model {name!r} does not exist here; this server serves "
                                f"{self.options.model_name!r}", "model", _KINDS[404])

    def _chat_prompt(self, messages: list[Any]) -> str:
        try:
            return self.text_generator.chat_prompt([m.model_dump(exclude_none=True) for m in messages])
        except ValueError as exc:
            raise ApiError(400, str(exc), "messages") from None

    async def _encode(self, text: str, param: str, *, special: bool = False) -> list[int]:
        """Tokenize off the event loop, refusing first a text too long to fit (no time spent on it).

        ``special``: special-token strings are tokens (a chat template writes them), not text.
        """
        if self.context is not None and len(text) > self.context * self.tokenizer.max_token_bytes:
            raise ApiError(400, f"{param} has {len(text)} characters: more tokens than the context of "
                                f"{self.context} holds", param, code=_TOO_LONG)
        return await run_in_threadpool(self.tokenizer.encode, text, allowed_special="all" if special else ())

    async def _prompts(self, prompt: Any) -> list[tuple[list[int], str]]:
        """The prompts as (token ids, text) pairs; an empty text prompt starts from the end token."""
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise ApiError(400, "prompt is empty", "prompt")
        out = []
        for item in items:
            if isinstance(item, str):
                out.append(((await self._encode(item, "prompt")) or [self.tokenizer.eot_token], item))
            else:
                if not item or any(not 0 <= t < self.vocab for t in item):
                    raise ApiError(400, f"prompt token ids must be non-empty and in 0..{self.vocab - 1}", "prompt")
                self._refuse_too_long(len(item), "prompt")  # before decoding it
                out.append((list(item), self.tokenizer.decode(item)))
        return out

    def _refuse_too_long(self, prompt_length: int, param: str) -> None:
        """A prompt longer than the context is a 400 (a context shift, too, starts from a prompt that fits)."""
        if self.context is not None and prompt_length > self.context:
            raise ApiError(400, f"the prompt of {prompt_length} tokens exceeds the context of {self.context} tokens",
                           param, code=_TOO_LONG)

    def _max_tokens(self, asked: int | None, prompt_length: int, shift: bool, prompt_param: str) -> int:
        """``max_tokens``: checked against the context (unless it shifts); None means as many as fit.

        Without a context limit, or with a context shift, None is OpenAI's default, 16.
        A prompt longer than the context is refused here, before anything streams.
        """
        self._refuse_too_long(prompt_length, prompt_param)
        if asked is None:
            return 16 if self.context is None or shift else max(0, self.context - prompt_length)
        if self.context is not None and prompt_length + asked > self.context and not shift:
            raise ApiError(400, f"prompt of {prompt_length} tokens + max_tokens={asked} exceeds the context of "
                                f"{self.context} tokens", "max_tokens", code=_TOO_LONG)
        return asked

    def _choices(self, prompts: list[tuple[list[int], str]], body: Any, per_prompt: int, max_tokens: int | None,
                 top_logprobs: int, stops: list[str], prompt_top: int | None, prompt_param: str) -> list[_Choice]:
        """``per_prompt`` choices for each prompt, choice ``i`` seeded with ``seed + i``."""
        if len(prompts) * per_prompt > self.scheduler.max_queue:  # a 429 would be retried in vain
            param = "best_of" if getattr(body, "best_of", None) == per_prompt != body.n else "n"
            raise ApiError(400, f"this request asks for {len(prompts) * per_prompt} completions (prompts x {param}); "
                                f"this server queues at most {self.scheduler.max_queue}: split it", param)
        loop = asyncio.get_running_loop()
        choices = []
        for p, (ids, text) in enumerate(prompts):
            try:
                allowed = self._max_tokens(max_tokens, len(ids), body.context_shift, prompt_param)
                base = sampling_options(body, max_tokens=allowed, eos=self.tokenizer.eot_token, vocab=self.vocab,
                                        top_logprobs=top_logprobs)
                base = self.text_generator.text_options(base)
            except ValueError as exc:
                message = str(exc)
                raise ApiError(400, message, message.split()[0]) from None
            for i in range(per_prompt):
                seed = None if body.seed is None else (body.seed + i) % 2**64
                options = base.replace(seed=seed) if i else base
                eos = None if options.ignore_eos else options.eos_token_id
                assembler = TextAssembler(self.tokenizer, stops, eos)
                choices.append(_Choice(p * per_prompt + i, ids, text, assembler, options, loop, prompt_top))
        return choices

    def _submit(self, choices: list[_Choice]) -> None:
        try:
            self.scheduler.submit([c.scheduled for c in choices])
        except QueueFull as exc:
            raise ApiError(429, f"server busy: {exc}; retry later", kind=_KINDS[429]) from None
        except RuntimeError as exc:
            raise ApiError(503, str(exc), kind=_KINDS[503]) from None

    def _meta(self, kind: str) -> dict[str, Any]:
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.options.model_name}

    async def _collect(self, choices: list[_Choice], request: Request) -> bool:
        """Run every choice to its end; False when the client went away first (its choices are cancelled)."""

        async def run(choice: _Choice) -> None:
            done = False
            while not done:
                _, _, done = await choice.next_piece()

        work = asyncio.gather(*(run(c) for c in choices))
        try:
            while True:
                done, _ = await asyncio.wait({work}, timeout=0.1)
                if done:
                    work.result()
                    return True
                if await request.is_disconnected():
                    log.info("client went away: cancelled a request of %d choices", len(choices))
                    break
        except BaseException:
            _cancel(work, choices)
            raise
        _cancel(work, choices)
        return False

    async def _stream(self, choices: list[_Choice], chunk: Callable[[_Choice, str, int, bool], Awaitable[Any]],
                      usage: Callable[[], dict[str, Any]] | None, started: float,
                      first: Callable[[_Choice], Awaitable[Any]] | None = None) -> AsyncIterator[dict[str, str]]:
        """Server-sent events: the chunks ``chunk`` makes of each choice's pieces, then usage, then [DONE]."""
        merged: asyncio.Queue[tuple[_Choice, Any]] = asyncio.Queue()

        async def pump(choice: _Choice) -> None:
            try:
                if first is not None:
                    await merged.put((choice, ("first", await first(choice))))
                while True:
                    piece, count, done = await choice.next_piece()
                    await merged.put((choice, (piece, count, done)))
                    if done:
                        return
            except ApiError as exc:
                await merged.put((choice, exc))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        open_choices = len(choices)
        try:
            while open_choices:
                choice, item = await merged.get()
                if isinstance(item, ApiError):
                    choice.scheduled.cancel()
                    yield {"data": json.dumps(item.body())}
                    open_choices -= 1
                    continue
                if item[0] == "first":
                    if item[1] is not None:
                        yield {"data": json.dumps(item[1])}
                    continue
                piece, count, done = item
                data = await chunk(choice, piece, count, done)
                if data is not None:
                    yield {"data": json.dumps(data)}
                open_choices -= done
            if usage is not None:
                yield {"data": json.dumps(usage())}
            self.latency.observe(time.perf_counter() - started)
            yield {"data": "[DONE]"}
        finally:  # also when the client disconnects: the scheduler frees the rows at its next step
            for task in tasks:
                task.cancel()
            for c in choices:
                c.scheduled.cancel()

    @staticmethod
    def _usage(choices: list[_Choice], prompts: list[tuple[list[int], str]]) -> dict[str, int]:
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        completion_tokens = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # /v1/completions ------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        started = time.perf_counter()
        self._check_model(body.model)
        if body.suffix is not None:
            raise ApiError(400, "suffix is not supported: GPT-2 continues text, it does not fill in", "suffix")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options needs stream=true", "stream_options")
        best_of = body.best_of or body.n
        if best_of < body.n:
            raise ApiError(400, f"best_of ({best_of}) must be at least n ({body.n})", "best_of")
        if body.stream and best_of > body.n:
            raise ApiError(400, "best_of > n cannot be streamed: the best are known only at the end", "best_of")
        try:
            stops = stop_strings(body.stop)
        except ValueError as exc:
            raise ApiError(400, str(exc), "stop") from None
        prompts = await self._prompts(body.prompt)
        echo_scores = body.echo and body.logprobs is not None
        prompt_top = None
        if echo_scores or body.prompt_logprobs is not None:
            prompt_top = max(body.logprobs or 0, body.prompt_logprobs or 0)
        choices = self._choices(prompts, body, best_of, body.max_tokens, body.logprobs or 0, stops, prompt_top,
                                "prompt")
        self._submit(choices)
        meta = self._meta("text_completion")
        if body.stream:
            usage = None
            if body.stream_options is not None and body.stream_options.include_usage:
                def usage() -> dict[str, Any]:
                    return {**meta, "choices": [], "usage": self._usage(choices, prompts)}

            async def first(choice: _Choice) -> dict[str, Any] | None:
                return await self._echo_chunk(choice, body, meta) if body.echo else None

            return EventSourceResponse(
                self._stream(choices, lambda c, piece, count, done: self._completion_chunk(c, piece, count, done,
                                                                                           body, meta),
                             usage, started, first), ping=15, sep="\n")
        if not await self._collect(choices, request):
            return Response(status_code=499)  # nobody is listening
        self.latency.observe(time.perf_counter() - started)
        chosen = choices
        if best_of > body.n:  # the n of each prompt's best_of with the highest mean log-probability
            chosen = []
            for p in range(len(prompts)):
                group = sorted(choices[p * best_of : (p + 1) * best_of], key=lambda c: -c.mean_logprob())
                for rank, c in enumerate(group[: body.n]):
                    c.index = p * body.n + rank
                    chosen.append(c)
        return JSONResponse({**meta, "choices": [self._completion_choice(c, body) for c in chosen],
                             "usage": self._usage(choices, prompts)})

    def _completion_choice(self, c: _Choice, body: CompletionRequest) -> dict[str, Any]:
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
                offsets = _offsets(self.tokenizer, c.prompt_ids) + offsets
        out = {"text": text, "index": c.index, "finish_reason": c.reason,
               "logprobs": completion_logprobs(self.tokenizer, tokens, offsets) if body.logprobs is not None else None}
        if body.prompt_logprobs is not None and c.prompt_tokens is not None:
            out["prompt_logprobs"] = self._vllm_prompt_logprobs(c)
        return out

    def _vllm_prompt_logprobs(self, c: _Choice) -> list[dict[str, Any] | None]:
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

    async def _echo_chunk(self, c: _Choice, body: CompletionRequest, meta: dict[str, Any]) -> dict[str, Any]:
        """The first chunk of a streamed echo: the prompt, with its tokens' log-probabilities when asked."""
        block = None
        if body.logprobs is not None:
            await c.prompt_scored.wait()  # at prefill, before any token comes (an early end: next_piece says)
            if c.prompt_tokens is not None:
                tokens = [(t, lp, top) for t, (lp, _, top) in zip(c.prompt_ids, c.prompt_tokens, strict=True)]
                block = completion_logprobs(self.tokenizer, tokens, _offsets(self.tokenizer, c.prompt_ids))
        return {**meta, "choices": [{"text": c.prompt_text, "index": c.index, "logprobs": block,
                                     "finish_reason": None}]}

    async def _completion_chunk(self, c: _Choice, piece: str, count: int, done: bool, body: CompletionRequest,
                                meta: dict[str, Any]) -> dict[str, Any] | None:
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

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        started = time.perf_counter()
        self._check_model(body.model)
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options needs stream=true", "stream_options")
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        try:
            check_chat_extras(body)
        except ValueError as exc:
            raise ApiError(400, str(exc), str(exc).split(":")[0]) from None
        try:
            stops = stop_strings(body.stop)
        except ValueError as exc:
            raise ApiError(400, str(exc), "stop") from None
        text = await run_in_threadpool(self._chat_prompt, body.messages)
        ids = (await self._encode(text, "messages", special=True)) or [self.tokenizer.eot_token]
        prompts = [(ids, text)]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else 0
        choices = self._choices(prompts, body, body.n, max_tokens, top, stops, None, "messages")
        self._submit(choices)
        meta = self._meta("chat.completion.chunk" if body.stream else "chat.completion")
        if body.stream:
            usage = None
            if body.stream_options is not None and body.stream_options.include_usage:
                def usage() -> dict[str, Any]:
                    return {**meta, "choices": [], "usage": self._usage(choices, prompts)}

            async def first(choice: _Choice) -> dict[str, Any]:
                return {**meta, "choices": [{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]}

            async def chunk(c: _Choice, piece: str, count: int, done: bool) -> dict[str, Any] | None:
                logprobs = None
                if body.logprobs and count:
                    new = [tok for k, tok in enumerate(c.tokens[len(c.tokens) - count :])
                           if len(c.tokens) - count + k < c.kept or not c.text.done]
                    logprobs = chat_logprobs(self.tokenizer, new) if new else None
                if not (piece or logprobs or done):
                    return None
                return {**meta, "choices": [{"index": c.index, "delta": {"content": piece} if piece else {},
                                             "logprobs": logprobs, "finish_reason": c.reason if done else None}]}

            return EventSourceResponse(self._stream(choices, chunk, usage, started, first), ping=15, sep="\n")
        if not await self._collect(choices, request):
            return Response(status_code=499)
        self.latency.observe(time.perf_counter() - started)
        return JSONResponse({**meta, "choices": [
            {"index": c.index, "message": {"role": "assistant", "content": c.text.text, "refusal": None},
             "logprobs": chat_logprobs(self.tokenizer, c.tokens[: c.kept]) if body.logprobs else None,
             "finish_reason": c.reason} for c in choices], "usage": self._usage(choices, prompts)})


def _cancel(work: asyncio.Future, choices: list[_Choice]) -> None:
    work.cancel()
    work.add_done_callback(_forget)
    for c in choices:
        c.scheduled.cancel()


def _forget(future: asyncio.Future) -> None:
    """Take a cancelled task's outcome, so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


def _offsets(tokenizer: Any, ids: list[int]) -> list[int]:
    """Where each token's text begins in the decoded text of ``ids`` (a token inside a character: that character)."""
    decoder = tokenizer.stream_decoder()
    offsets, length = [], 0
    for t in ids:
        offsets.append(length)
        length += len(decoder.add(t))
    return offsets


def playground_page() -> HTMLResponse:
    """The playground page, with a content security policy that lets it reach only this server.

    Its one inline script and one inline style are allowed by their hashes, so
    nothing else (no injected script, no outside host) can run or load.
    """
    html = resources.files("gpt2lite.serve").joinpath("playground.html").read_text(encoding="utf-8")

    def digests(tag: str) -> str:
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S))

    policy = (f"default-src 'none'; script-src {digests('script')}; style-src {digests('style')}; "
              "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return HTMLResponse(html, headers={"Content-Security-Policy": policy, "Cache-Control": "no-cache",
                                       "X-Content-Type-Options": "nosniff"})


def create_app(text_generator: TextGenerator, options: ServerOptions = ServerOptions(), *,
               background: bool = True) -> FastAPI:
    """An OpenAI-compatible app serving ``text_generator``'s model; one scheduler loop owns the model.

    The loop runs in a thread of its own; with ``background=False`` the caller runs
    ``app.state.scheduler.run()`` in the thread that should own the model (see ``Scheduler``).
    """
    scheduler = Scheduler(text_generator.model, max_batch=options.max_batch, max_queue=options.max_queue,
                          background=background, prefix_cache=options.prefix_cache)
    server = _Server(text_generator, options, scheduler)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.stop()

    docs = dict(docs_url="/docs", openapi_url="/openapi.json") if options.docs else dict(docs_url=None,
                                                                                          openapi_url=None)
    app = FastAPI(title="gpt2lite", lifespan=lifespan, redoc_url=None, **docs)
    app.state.scheduler = scheduler
    _add_error_handlers(app)
    routes: list[tuple[str, str, Callable[..., Any]]] = [
        ("GET", "/health", server.health), ("GET", "/metrics", server.metrics),
        ("GET", "/v1/models", server.models), ("GET", "/v1/models/{model_id:path}", server.model),
        ("POST", "/v1/completions", server.completions), ("POST", "/v1/chat/completions", server.chat_completions),
        ("POST", "/tokenize", server.tokenize), ("POST", "/detokenize", server.detokenize),
        ("GET", "/tokenizer_info", server.tokenizer_info),
    ]
    if options.playground:
        page = playground_page()

        async def playground() -> HTMLResponse:
            return page

        routes.append(("GET", "/", playground))
    for method, path, handler in routes:
        app.add_api_route(path, handler, methods=[method])
    app.add_middleware(_Gate, api_key=options.api_key, max_body_size=options.max_body_size)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's JSON shape, with a message that names the problem."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"no such endpoint: {request.method} {request.url.path}" if exc.status_code in (404, 405) \
            else str(exc.detail)
        return _error(exc.status_code, message, kind=_KINDS.get(exc.status_code, "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}")
        unknown = [str(e["loc"][-1]) for e in errors if e.get("type") == "extra_forbidden"]
        if unknown:
            return _error(400, f"unknown field(s) {unknown}", unknown[0])
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return _error(400, f"invalid {param or 'request'}: {first.get('msg', 'bad value')}", param)
