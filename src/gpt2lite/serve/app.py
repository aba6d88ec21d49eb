"""The OpenAI-compatible HTTP layer: requests in, scheduler submissions out, responses back. No model code here.

``create_app(generator)`` builds a FastAPI app around an already loaded
``TextGenerator``; ``gpt2lite serve`` runs it under uvicorn. Endpoints:
``POST /v1/completions`` (streaming over server-sent events), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text format).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from gpt2lite.generation.options import GenerationOptions
from gpt2lite.serve.scheduler import QueueFull, Scheduler
from gpt2lite.serve.scheduler import Request as ScheduledRequest
from gpt2lite.text.assembler import TextAssembler
from gpt2lite.text.generator import TextGenerator

__all__ = ["CompletionRequest", "create_app"]


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``: the OpenAI parameters, plus top_k, min_p, repetition_penalty."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    user: str | None = None


class _ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, param: str | None, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


class _SchedulerCollector:
    """Reads the scheduler's counters at each scrape."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self):
        s = self.scheduler.stats
        for name, value, text in (
            ("gpt2lite_requests", s.requests, "requests accepted"),
            ("gpt2lite_requests_finished", s.finished, "requests that ended by stop or length"),
            ("gpt2lite_requests_failed", s.failed, "requests that failed"),
            ("gpt2lite_requests_cancelled", s.cancelled, "requests cancelled (client gone, stop string)"),
            ("gpt2lite_generated_tokens", s.generated_tokens, "tokens generated"),
            ("gpt2lite_prompt_tokens", s.prompt_tokens, "prompt tokens prefilled"),
            ("gpt2lite_decode_steps", s.steps, "batched decode steps"),
        ):
            yield CounterMetricFamily(name, text, value=value)
        yield GaugeMetricFamily("gpt2lite_queue_depth", "requests waiting for a row", value=self.scheduler.queue_depth)
        yield GaugeMetricFamily("gpt2lite_running_batch_size", "requests decoding", value=self.scheduler.running)


class _Choice:
    """One choice of a request: its scheduler request, its text, and events passed from the scheduler thread."""

    def __init__(self, index: int, prompt_ids: list[int], prompt_text: str, generator: TextGenerator,
                 stops: list[str], options: GenerationOptions, loop: asyncio.AbstractEventLoop) -> None:
        self.index = index
        self.prompt_ids, self.prompt_text = prompt_ids, prompt_text
        self.text = TextAssembler(generator.tokenizer, stops, options.eos_token_id)
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.prompt_logprobs: list[float | None] | None = None
        self.reason: str | None = None
        call = loop.call_soon_threadsafe
        self.scheduled = ScheduledRequest(
            prompt=prompt_ids, options=options,
            on_token=lambda t, lp, top: call(self.events.put_nowait, ("token", (t, lp, top))),
            on_done=lambda reason, exc: call(self.events.put_nowait, ("done", (reason, exc))),
        )

    def want_prompt_logprobs(self) -> None:
        def keep(values: list[float | None]) -> None:
            self.prompt_logprobs = values

        self.scheduled.on_prompt_logprobs = keep

    async def next_piece(self) -> tuple[str, list[tuple[int, float, list[tuple[int, float]]]], bool]:
        """Wait for the next event: (new text, its tokens, whether the choice is over)."""
        kind, payload = await self.events.get()
        if kind == "done":
            reason, exc = payload
            if exc is not None:
                raise _ApiError(500 if not isinstance(exc, ValueError) else 400, f"generation failed: {exc}",
                                kind="server_error" if not isinstance(exc, ValueError) else "invalid_request_error")
            if self.reason is None:
                self.reason = "length" if reason == "length" else "stop"
            self.text.finish()
            return self.text.take(), [], True
        token, logprob, top = payload
        self.text.add(token, logprob, top)
        piece = self.text.take()
        if self.text.done:  # a stop string or the end token: the scheduler can drop the row now
            self.reason = "stop"
            self.scheduled.cancel()
            self.text.finish()
            return piece + self.text.take(), [(token, logprob, top)], True
        return piece, [(token, logprob, top)], False


def create_app(
    generator: TextGenerator,
    *,
    model_name: str = "gpt2",
    max_batch: int = 16,
    max_queue: int = 256,
    api_key: str | None = None,
    background: bool = True,
) -> FastAPI:
    """An OpenAI-compatible app serving ``generator``'s model; one scheduler loop owns the model.

    The loop runs in a thread of its own; with ``background=False`` the caller runs
    ``app.state.scheduler.run()`` in the thread that should own the model (see ``Scheduler``).
    """
    scheduler = Scheduler(generator.model, max_batch=max_batch, max_queue=max_queue, background=background)
    registry = CollectorRegistry()
    registry.register(_SchedulerCollector(scheduler))
    latency = Histogram("gpt2lite_request_latency_seconds", "time from request to last token",
                        registry=registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
    tokenizer = generator.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.stop()

    app = FastAPI(title="gpt2lite", lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(_ApiError)
    async def api_error(request: Request, exc: _ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        return _error(400, f"invalid {param or 'request'}: {first.get('msg', 'bad value')}", param,
                      "invalid_request_error")

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {api_key}":
            raise _ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", None,
                            "authentication_error")

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.alive
        return JSONResponse({"status": "ok" if ok else "scheduler stopped", "running": scheduler.running,
                             "waiting": scheduler.queue_depth}, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "gpt2lite"}]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        started = time.perf_counter()
        prompts = _prompts(body.prompt, tokenizer, generator.model.config.vocab_size)
        choices = _make_choices(body, prompts, generator)
        if not scheduler.alive:
            raise _ApiError(503, "the scheduler is not running", kind="server_error")
        try:
            for c in choices:
                scheduler.submit(c.scheduled)
        except QueueFull as exc:
            for c in choices:
                c.scheduled.cancel()
            raise _ApiError(429, f"server busy: {exc}; retry later", kind="rate_limit_error") from None
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        if body.stream:
            return EventSourceResponse(_stream(choices, body, meta, tokenizer, latency, started),
                                       ping=15, sep="\n")
        return await _complete(choices, body, meta, tokenizer, request, latency, started)

    return app


def _prompts(prompt: Any, tokenizer: Any, vocab: int) -> list[tuple[list[int], str]]:
    """The prompts as (token ids, text) pairs; an empty text prompt starts from <|endoftext|>."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise _ApiError(400, "prompt is empty", "prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            ids = tokenizer.encode(item) or [tokenizer.eot_token]
            out.append((ids, item))
        else:
            if not item or any(not 0 <= t < vocab for t in item):
                raise _ApiError(400, f"prompt token ids must be non-empty and in 0..{vocab - 1}", "prompt")
            out.append((list(item), tokenizer.decode(item)))
    return out


def _make_choices(body: CompletionRequest, prompts: list[tuple[list[int], str]],
                  generator: TextGenerator) -> list[_Choice]:
    loop = asyncio.get_running_loop()
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or not all(stops):
        raise _ApiError(400, "stop takes up to 4 non-empty strings", "stop")
    try:
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    except ValueError:
        raise _ApiError(400, "logit_bias keys must be token ids", "logit_bias") from None
    choices = []
    for p, (ids, text) in enumerate(prompts):
        for i in range(body.n):
            try:
                options = GenerationOptions(
                    max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                    top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                    presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                    logit_bias=bias, seed=None if body.seed is None else (body.seed + i) % 2**64,
                    top_logprobs=body.logprobs or 0, eos_token_id=generator.tokenizer.eot_token,
                )
            except ValueError as exc:
                message = str(exc)
                raise _ApiError(400, message, message.split()[0]) from None
            if bias and max(bias) >= generator.model.config.vocab_size:
                raise _ApiError(400, f"logit_bias names token {max(bias)}, outside the vocabulary", "logit_bias")
            context = generator.model.config.n_positions
            if len(ids) + body.max_tokens > context:
                raise _ApiError(400, f"prompt of {len(ids)} tokens + max_tokens={body.max_tokens} exceeds the "
                                     f"context of {context} tokens", "max_tokens")
            choice = _Choice(p * body.n + i, ids, text, generator, stops, options, loop)
            if body.echo and body.logprobs is not None:
                choice.want_prompt_logprobs()
            choices.append(choice)
    return choices


def _logprobs_block(tokenizer: Any, tokens: list[tuple[int, float, list[tuple[int, float]]]], offset: int,
                    prompt: list[tuple[int, float | None]] | None = None) -> dict[str, Any]:
    """OpenAI's ``logprobs`` object for some tokens (prompt tokens first, when echoed)."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, logprob, top in [*((t, lp, []) for t, lp in (prompt or [])), *tokens]:
        text = tokenizer.decode([token])
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append({tokenizer.decode([i]): v for i, v in top} if top else None)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


async def _complete(choices: list[_Choice], body: CompletionRequest, meta: dict[str, Any], tokenizer: Any,
                    request: Request, latency: Histogram, started: float) -> JSONResponse:
    async def run(choice: _Choice) -> dict[str, Any]:
        tokens: list[tuple[int, float, list[tuple[int, float]]]] = []
        text = ""
        while True:
            piece, new, done = await choice.next_piece()
            text += piece
            tokens.extend(new)
            if done:
                break
        kept = [t for t, s in zip(tokens, choice.text.starts, strict=False) if s < len(choice.text.text)]
        prompt = None
        if body.echo:
            text = choice.prompt_text + text
            if choice.prompt_logprobs is not None:
                prompt = list(zip(choice.prompt_ids, choice.prompt_logprobs, strict=True))
        block = _logprobs_block(tokenizer, kept, 0, prompt) if body.logprobs is not None else None
        return {"text": text, "index": choice.index, "logprobs": block, "finish_reason": choice.reason,
                "_tokens": len(tokens)}

    work = asyncio.gather(*(run(c) for c in choices))
    try:
        while True:
            done, _ = await asyncio.wait({work}, timeout=0.1)
            if done:
                break
            if await request.is_disconnected():  # the client went away: free its rows
                raise asyncio.CancelledError
        results = work.result()
    except BaseException:
        work.cancel()
        for c in choices:
            c.scheduled.cancel()
        raise
    latency.observe(time.perf_counter() - started)
    completion_tokens = sum(r.pop("_tokens") for r in results)
    prompt_tokens = sum(len(c.prompt_ids) for c in choices[:: body.n])
    return JSONResponse({**meta, "choices": results, "usage": {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens}})


async def _stream(choices: list[_Choice], body: CompletionRequest, meta: dict[str, Any], tokenizer: Any,
                  latency: Histogram, started: float) -> AsyncIterator[dict[str, str]]:
    """Server-sent events: one chunk per piece of text per choice, a final chunk each, then [DONE]."""
    merged: asyncio.Queue[tuple[_Choice, Any]] = asyncio.Queue()

    async def pump(choice: _Choice) -> None:
        try:
            if body.echo:
                await merged.put((choice, (choice.prompt_text, [], False)))
            while True:
                item = await choice.next_piece()
                await merged.put((choice, item))
                if item[2]:
                    return
        except _ApiError as exc:
            await merged.put((choice, exc))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    offsets = dict.fromkeys((c.index for c in choices), 0)
    open_choices = len(choices)
    try:
        while open_choices:
            choice, item = await merged.get()
            if isinstance(item, _ApiError):
                yield {"data": json.dumps({"error": {"message": item.message, "type": item.kind, "param": None,
                                                     "code": None}})}
                open_choices -= 1
                continue
            piece, tokens, done = item
            block = None
            if body.logprobs is not None and tokens:
                block = _logprobs_block(tokenizer, tokens, offsets[choice.index])
            offsets[choice.index] += len(piece)
            if piece or block or done:
                chunk = {"text": piece, "index": choice.index, "logprobs": block,
                         "finish_reason": choice.reason if done else None}
                yield {"data": json.dumps({**meta, "choices": [chunk]})}
            open_choices -= done
        latency.observe(time.perf_counter() - started)
        yield {"data": "[DONE]"}
    finally:  # also when the client disconnects: the scheduler frees the rows at its next step
        for task in tasks:
            task.cancel()
        for c in choices:
            c.scheduled.cancel()

