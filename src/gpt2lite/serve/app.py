"""The OpenAI-compatible HTTP layer: routes that translate requests into scheduler submissions and back.

``create_app(model, tokenizer)`` builds a FastAPI app around an already loaded
model and its tokenizer; ``gpt2lite serve`` runs it under uvicorn. Endpoints:

- ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed over
  server-sent events with ``"stream": true``);
- ``POST /classify`` (vLLM's) instead, for a sequence classifier (``classification.py``);
- ``POST /v1/embeddings``: pooled final hidden states (``text/embeddings.py``);
- ``POST /v1/messages`` (Anthropic's) and ``POST /v1/responses`` (OpenAI's,
  stateless): translated onto the chat path (``anthropic_messages.py``,
  ``openai_responses.py``);
- ``GET /v1/models``, ``GET /v1/models/{id}``: the base model and each LoRA adapter (with its ``parent``);
- ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter`` (vLLM's): adapters chosen per
  request by ``model``, decoded in one batch with the base model's rows (``gpt2lite.transforms.adapters``);
- ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info`` (vLLM's);
- ``GET /health``, ``GET /metrics`` (Prometheus text format), without the key;
- ``GET /``: the playground, a self-contained page (``playground.html``) that
  calls the API above from the browser (also without the key: it asks for one).

The layers: ``access.py`` checks the API key and the body's size before the
body is read; ``gate.py`` checks each request before anything is queued;
``scheduler.py`` decides which rows run; ``responses.py`` makes the answers;
``errors.py`` answers every failure in OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from gpt2lite.errors import CheckpointError, OptionError
from gpt2lite.models.classifier import GPT2ForSequenceClassification
from gpt2lite.models.gpt2 import GPT2
from gpt2lite.models.protocol import DecoderModel
from gpt2lite.serve import anthropic_messages, openai_responses
from gpt2lite.serve.access import AccessGate
from gpt2lite.serve.anthropic_messages import MessageEvents, MessagesRequest
from gpt2lite.serve.classification import ClassifierServer, ClassifyBatcher
from gpt2lite.serve.errors import KINDS, ApiError, add_error_handlers
from gpt2lite.serve.gate import Prompt, RequestGate
from gpt2lite.serve.metrics import Metrics
from gpt2lite.serve.openai_responses import ResponseEvents, ResponsesRequest
from gpt2lite.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoadLoraAdapterRequest,
    TokenizeRequest,
    UnloadLoraAdapterRequest,
    check_chat_extras,
    token_text,
    tool_calls_schema,
)
from gpt2lite.serve.responses import Choice, ResponseBuilder, ToolCalls, cancel
from gpt2lite.serve.scheduler import QueueFull, Scheduler, UnknownAdapter
from gpt2lite.text.assembler import TextAssembler
from gpt2lite.text.classifier import TextClassifier
from gpt2lite.text.embeddings import embed
from gpt2lite.text.generator import TextGenerator
from gpt2lite.tokenizers.protocol import TokenizerProtocol
from gpt2lite.transforms.adapters import LoraSlots
from gpt2lite.transforms.lora import has_lora

__all__ = ["ApiError", "ServerOptions", "create_app"]

log = logging.getLogger("gpt2lite.serve")


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
    # Cross-origin browser calls (CORS), as vLLM's flags: none by default, so only the server's own pages call it.
    allowed_origins: tuple[str, ...] = ()  # e.g. ("https://app.example.com",) or ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    loras: tuple[tuple[str, str], ...] = ()  # LoRA adapters served from the start: (name, PEFT directory)
    max_loras: int | None = None  # adapters held at once (default: as many as loras, at least 1)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_body_size < 1:
            raise ValueError("max_batch, max_queue and max_body_size must be >= 1")
        names = [name for name, _ in self.loras]
        if len(set(names)) != len(names) or self.model_name in names or not all(names):
            raise ValueError(f"each LoRA adapter needs a name of its own, other than the model's ({self.model_name!r})")
        if self.max_loras is not None and self.max_loras < max(1, len(self.loras)):
            raise ValueError(f"max_loras ({self.max_loras}) must be at least 1 and hold the {len(self.loras)} "
                             "adapters given")


class _Server:
    """The route handlers, over one request gate, one scheduler and one response builder."""

    def __init__(self, gate: RequestGate, scheduler: Scheduler, lora_paths: dict[str, str]) -> None:
        self.gate, self.scheduler = gate, scheduler
        self.lora_paths = lora_paths  # each adapter's directory, as given (vLLM's "root")
        gate.adapters = lambda: scheduler.adapter_names
        self.tokenizer = gate.tokenizer
        self.build = ResponseBuilder(gate.tokenizer, gate.model_name)
        self.metrics = Metrics(scheduler)

    # small endpoints --------------------------------------------------------------------

    async def health(self) -> JSONResponse:
        ok = self.scheduler.accepting
        status = "ok" if ok else ("shutting down" if self.scheduler.alive else "stopped")
        return JSONResponse({"status": status, "running": self.scheduler.running,
                             "waiting": self.scheduler.queue_depth}, 200 if ok else 503)

    async def metrics_text(self) -> Response:
        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4")

    def _card(self, adapter: str | None = None) -> dict[str, Any]:
        card = {"id": adapter or self.gate.model_name, "object": "model", "created": 0, "owned_by": "gpt2lite",
                "max_model_len": self.gate.context}
        if adapter is not None:  # vLLM's card of an adapter
            card.update(root=self.lora_paths.get(adapter, adapter), parent=self.gate.model_name)
        return card

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._card(), *(self._card(a) for a in self.scheduler.adapter_names)]}

    async def model(self, model_id: str) -> dict[str, Any]:
        return self._card(self.gate.check_model(model_id))

    async def load_lora_adapter(self, body: LoadLoraAdapterRequest) -> PlainTextResponse:
        name = body.lora_name
        if body.load_inplace:
            raise ApiError(400, "load_inplace is not supported: unload the adapter, then load it", "load_inplace")
        if self.scheduler.adapters is None:
            raise ApiError(400, "this server cannot load LoRA adapters: its model carries an unmerged one",
                           "lora_name")
        if name == self.gate.model_name:
            raise ApiError(400, f"{name!r} is the base model's name; give the adapter another", "lora_name")
        try:
            weights = await run_in_threadpool(self.scheduler.adapters.read, body.lora_path)
        except (CheckpointError, OSError, ValueError) as exc:
            raise ApiError(400, f"lora_path: {exc}", "lora_path") from None
        try:
            await asyncio.wrap_future(self.scheduler.load_adapter(name, weights))
        except ValueError as exc:
            raise ApiError(400, str(exc), "lora_name") from None
        except RuntimeError as exc:
            raise ApiError(503, str(exc), kind=KINDS[503]) from None
        self.lora_paths[name] = body.lora_path
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, body: UnloadLoraAdapterRequest) -> PlainTextResponse:
        """Refuse the adapter to new requests at once; answer once the requests using it have ended."""
        try:
            done = self.scheduler.unload_adapter(body.lora_name)
        except UnknownAdapter as exc:
            raise ApiError(404, str(exc), "lora_name", KINDS[404]) from None
        try:
            await asyncio.shield(asyncio.wrap_future(done))  # a client that leaves does not stop the unload
        except RuntimeError as exc:
            raise ApiError(503, str(exc), kind=KINDS[503]) from None
        self.lora_paths.pop(body.lora_name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def tokenizer_info(self) -> dict[str, Any]:
        eos = self.tokenizer.decode([self.tokenizer.eot_token])
        return {"eos_token": eos, "bos_token": eos, "pad_token": None, "model_max_length": self.gate.context,
                "chat_template": self.gate.text.chat_template}

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        self.gate.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt or messages", "prompt")
        if body.messages is not None:
            ids = await self.gate.encode(await self.gate.chat_prompt(body.messages), "messages", special=True,
                                         fit=False)
        else:
            ids = await self.gate.encode(body.prompt, "prompt", special=True, fit=False)  # as completions reads it
        out: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": self.gate.context}
        if body.return_token_strs:
            out["token_strs"] = await run_in_threadpool(lambda: [token_text(self.tokenizer, t) for t in ids])
        return out

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        self.gate.check_model(body.model)
        try:  # off the event loop: a long list takes a while, and /health must not wait for it
            return {"prompt": await run_in_threadpool(self.tokenizer.decode, body.tokens)}
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise ApiError(400, f"tokens: {exc}", "tokens") from None

    async def embeddings(self, body: EmbeddingRequest) -> dict[str, Any]:
        """OpenAI's embeddings: the pooled, normalised final hidden states of each input (``text/embeddings.py``)."""
        if self.gate.check_model(body.model) is not None:
            raise ApiError(400, f"embeddings are read from the base model alone: send model={self.gate.model_name!r}",
                           "model")
        model = self.scheduler.model
        if not isinstance(model, GPT2):
            raise ApiError(400, f"embeddings are read from a GPT-2's hidden states; this server's model is a "
                                f"{type(model).__name__}", "model")
        if body.dimensions is not None and body.dimensions != model.config.n_embd:
            raise ApiError(400, f"dimensions: this model's embeddings have {model.config.n_embd} dimensions, "
                                f"not {body.dimensions}", "dimensions")
        prompts = await self.gate.inputs(body.input, "input")
        try:  # in the scheduler's thread, between two decode steps: it alone uses the model
            vectors = await asyncio.wrap_future(self.scheduler.call(lambda: embed(
                model, [ids for ids, _ in prompts], pooling=body.pooling, normalize=body.normalize)))
        except RuntimeError as exc:
            raise ApiError(503, str(exc), kind=KINDS[503]) from None

        def encoded(vector: Any) -> list[float] | str:
            if body.encoding_format == "base64":  # little-endian float32, as OpenAI's
                return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
            return vector.tolist()

        tokens = sum(len(ids) for ids, _ in prompts)
        return {"object": "list", "model": self.gate.model_name,
                "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # helpers ------------------------------------------------------------------------------

    async def _choices(self, prompts: list[Prompt], body: Any, per_prompt: int, max_tokens: int | None,
                 top_logprobs: int, stops: list[str], prompt_top: int | None, prompt_param: str, *,
                 adapter: str | None = None) -> list[Choice]:
        """``per_prompt`` choices for each prompt, choice ``i`` seeded with ``seed + i``; ``adapter``: its LoRA."""
        options = await self.gate.options(prompts, body, per_prompt, max_tokens, top_logprobs, prompt_param)
        loop = asyncio.get_running_loop()
        choices = []
        for p, ((ids, text), base) in enumerate(zip(prompts, options, strict=True)):
            for i in range(per_prompt):
                seed = None if body.seed is None else (body.seed + i) % 2**64
                opts = base.replace(seed=seed) if i else base
                eos = None if opts.ignore_eos else opts.eos_token_id
                assembler = TextAssembler(self.tokenizer, stops, eos, skip_special=True)  # as vLLM's text
                choices.append(Choice(p * per_prompt + i, ids, text, assembler, opts, loop, prompt_top))
                choices[-1].scheduled.adapter = adapter
        return choices

    def _submit(self, choices: list[Choice]) -> None:
        try:
            self.scheduler.submit([c.scheduled for c in choices])
        except QueueFull as exc:
            raise ApiError(429, f"server busy: {exc}; retry later", kind=KINDS[429]) from None
        except UnknownAdapter as exc:  # unloaded since the request was checked
            raise ApiError(404, str(exc), "model", KINDS[404]) from None
        except RuntimeError as exc:
            raise ApiError(503, str(exc), kind=KINDS[503]) from None

    async def _collect(self, choices: list[Choice], request: Request) -> bool:
        """Run every choice to its end; False when the client went away first (its choices are cancelled)."""

        async def run(choice: Choice) -> None:
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
            cancel(work, choices)
            raise
        cancel(work, choices)
        return False

    async def _stream(self, choices: list[Choice], chunk: Callable[[Choice, str, int, bool], Any],
                      usage: Callable[[], dict[str, Any]] | None, started: float,
                      first: Callable[[Choice], Awaitable[Any]] | None = None) -> AsyncIterator[dict[str, str]]:
        """Server-sent events: the chunks ``chunk`` makes of each choice's pieces, then usage, then [DONE]."""
        merged: asyncio.Queue[tuple[Choice, Any]] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
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
                data = chunk(choice, piece, count, done)
                if data is not None:
                    yield {"data": json.dumps(data)}
                open_choices -= done
            if usage is not None:
                yield {"data": json.dumps(usage())}
            self.metrics.latency.observe(time.perf_counter() - started)
            yield {"data": "[DONE]"}
        finally:  # also when the client disconnects: the scheduler frees the rows at its next step
            for task in tasks:
                task.cancel()
            for c in choices:
                c.scheduled.cancel()

    # /v1/completions ------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        started = time.perf_counter()
        adapter = self.gate.check_model(body.model)
        if body.suffix is not None:
            raise ApiError(400, "suffix is not supported: GPT-2 continues text, it does not fill in", "suffix")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options needs stream=true", "stream_options")
        best_of = body.best_of or body.n
        if best_of < body.n:
            raise ApiError(400, f"best_of ({best_of}) must be at least n ({body.n})", "best_of")
        if body.stream and best_of > body.n:
            raise ApiError(400, "best_of > n cannot be streamed: the best are known only at the end", "best_of")
        stops = self.gate.stops(body.stop)
        prompts = await self.gate.prompts(body.prompt)
        echo_scores = body.echo and body.logprobs is not None
        prompt_top = None
        if echo_scores or body.prompt_logprobs is not None:
            prompt_top = max(body.logprobs or 0, body.prompt_logprobs or 0)
        choices = await self._choices(prompts, body, best_of, body.max_tokens, body.logprobs or 0, stops, prompt_top,
                                "prompt", adapter=adapter)
        self._submit(choices)
        meta = self.build.meta("text_completion")
        meta["model"] = adapter or meta["model"]  # as vLLM: the adapter asked for
        if body.stream:
            usage = None
            if body.stream_options is not None and body.stream_options.include_usage:
                def usage() -> dict[str, Any]:
                    return {**meta, "choices": [], "usage": self.build.usage(choices, prompts)}

            async def first(choice: Choice) -> dict[str, Any] | None:
                return await self.build.echo_chunk(choice, body, meta) if body.echo else None

            return EventSourceResponse(
                self._stream(choices, lambda c, piece, count, done: self.build.completion_chunk(
                    c, piece, count, done, body, meta), usage, started, first), ping=15, sep="\n")
        if not await self._collect(choices, request):
            return Response(status_code=499)  # nobody is listening
        self.metrics.latency.observe(time.perf_counter() - started)
        chosen = self.build.best(choices, len(prompts), best_of, body.n)
        return JSONResponse({**meta, "choices": [self.build.completion_choice(c, body) for c in chosen],
                             "usage": self.build.usage(choices, prompts)})

    # /v1/chat/completions -------------------------------------------------------------------

    async def _start_chat(self, body: ChatCompletionRequest) -> tuple[list[Choice], list[Prompt], ToolCalls]:
        """Check a chat request, render its prompt and submit its choices: what every chat dialect shares."""
        adapter = self.gate.check_model(body.model)
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options needs stream=true", "stream_options")
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        try:
            check_chat_extras(body)
        except ValueError as exc:
            raise ApiError(400, str(exc), getattr(exc, "param", None)) from None
        stops = self.gate.stops(body.stop)
        text = await self.gate.chat_prompt(body.messages, body.tools)
        ids = (await self.gate.encode(text, "messages", special=True)) or [self.tokenizer.eot_token]
        prompts = [(ids, text)]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else 0
        choices = await self._choices(prompts, body, body.n, max_tokens, top, stops, None, "messages",
                                      adapter=adapter)
        tools = tool_calls_schema(body)  # whether the reply is a tool call, read once
        self._submit(choices)
        return choices, prompts, tools

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        started = time.perf_counter()
        choices, prompts, tools = await self._start_chat(body)
        meta = self.build.meta("chat.completion.chunk" if body.stream else "chat.completion")
        meta["model"] = choices[0].scheduled.adapter or meta["model"]  # as vLLM: the adapter asked for
        if body.stream:
            usage = None
            if body.stream_options is not None and body.stream_options.include_usage:
                def usage() -> dict[str, Any]:
                    return {**meta, "choices": [], "usage": self.build.usage(choices, prompts)}

            async def first(choice: Choice) -> dict[str, Any]:
                return self.build.chat_first(choice, meta)

            return EventSourceResponse(
                self._stream(choices, lambda c, piece, count, done: self.build.chat_chunk(
                    c, piece, count, done, body, meta, tools), usage, started, first), ping=15, sep="\n")
        if not await self._collect(choices, request):
            return Response(status_code=499)
        self.metrics.latency.observe(time.perf_counter() - started)
        return JSONResponse({**meta, "choices": [self.build.chat_choice(c, body, tools) for c in choices],
                             "usage": self.build.usage(choices, prompts)})


    # /v1/messages (Anthropic's) and /v1/responses (OpenAI's): translations onto the chat path ---------------

    @staticmethod
    def _as_chat(translate: Callable[[Any], ChatCompletionRequest], body: Any) -> ChatCompletionRequest:
        """The chat request another dialect's body asks for; what cannot be translated is a 400 naming its field."""
        try:
            return translate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ApiError(400, f"{where}: {first['msg']}", where) from None
        except OptionError as exc:
            raise ApiError(400, str(exc), exc.param) from None

    async def _events(self, choice: Choice, writer: MessageEvents | ResponseEvents,
                      started: float) -> AsyncIterator[dict[str, str]]:
        """Server-sent events of one choice, written by ``writer``; an error mid-way is an ``error`` event."""
        try:
            for event in writer.start():
                yield event
            done = False
            while not done:
                try:
                    piece, _, done = await choice.next_piece()
                except ApiError as exc:
                    yield {"event": "error", "data": json.dumps({"type": "error", **exc.body()})}
                    return
                for event in writer.piece(piece, done):
                    yield event
            self.metrics.latency.observe(time.perf_counter() - started)
        finally:  # also when the client disconnects: the scheduler frees the row at its next step
            choice.scheduled.cancel()

    async def messages(self, body: MessagesRequest, request: Request) -> Any:
        started = time.perf_counter()
        choices, prompts, tools = await self._start_chat(self._as_chat(anthropic_messages.to_chat, body))
        (choice,), prompt_tokens = choices, len(prompts[0][0])
        if body.stream:
            writer = MessageEvents(self.build, choice, prompt_tokens, tools)
            return EventSourceResponse(self._events(choice, writer, started), ping=15, sep="\n")
        if not await self._collect(choices, request):
            return Response(status_code=499)
        self.metrics.latency.observe(time.perf_counter() - started)
        return JSONResponse(anthropic_messages.message_body(self.build, choice, prompt_tokens, tools))

    async def responses(self, body: ResponsesRequest, request: Request) -> Any:
        started = time.perf_counter()
        choices, prompts, tools = await self._start_chat(self._as_chat(openai_responses.to_chat, body))
        (choice,), prompt_tokens = choices, len(prompts[0][0])
        if body.stream:
            writer = ResponseEvents(body, self.build, choice, prompt_tokens, tools)
            return EventSourceResponse(self._events(choice, writer, started), ping=15, sep="\n")
        if not await self._collect(choices, request):
            return Response(status_code=499)
        self.metrics.latency.observe(time.perf_counter() - started)
        return JSONResponse(openai_responses.response_body(body, self.build, choice, prompt_tokens, tools))


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


Routes = list[tuple[str, str, Callable[..., Any]]]


def create_app(model: DecoderModel | GPT2ForSequenceClassification, tokenizer: TokenizerProtocol,
               options: ServerOptions = ServerOptions(), *, chat_template: str | None = None,
               background: bool = True) -> FastAPI:
    """An OpenAI-compatible app serving ``model`` with ``tokenizer``; one scheduler loop owns the model.

    ``chat_template`` is the model's Jinja chat template (None: DialoGPT's
    convention); it is tried once here, so that a template that cannot render
    a plain conversation within its budget stops the start, not every request.
    The loop runs in a thread of its own; with ``background=False`` the caller runs
    ``app.state.scheduler.run()`` in the thread that should own the model (see ``Scheduler``).
    ``options.loras`` are read and checked here: one that does not fit stops the start.
    A model that carries an unmerged LoRA adapter serves no others.
    A ``GPT2ForSequenceClassification`` is served for ``POST /classify`` instead
    (``classification.py``), its batches in a thread of their own.
    """
    if isinstance(model, GPT2ForSequenceClassification):
        if options.loras:
            raise ValueError("LoRA adapters per request are served over a language model, not a classifier")
        batcher = ClassifyBatcher(TextClassifier(model, tokenizer), max_batch=options.max_batch,
                                  max_queue=options.max_queue)
        classifier = ClassifierServer(batcher, options.model_name)
        return _app(options, batcher.stop, [
            ("GET", "/health", classifier.health), ("GET", "/v1/models", classifier.models),
            ("POST", "/classify", classifier.classify)])
    text = TextGenerator(model, tokenizer, chat_template=chat_template)
    text.check_chat_template()
    adapters = None
    if not has_lora(model):
        adapters = LoraSlots(model, options.max_loras or max(1, len(options.loras)))
        for name, path in options.loras:
            try:
                adapters.add(name, adapters.read(path))
            except (CheckpointError, OSError) as exc:
                raise type(exc)(f"the LoRA adapter {name!r}: {exc}") from None
    elif options.loras:
        raise ValueError("the model carries an unmerged LoRA adapter: merge it (merge_lora) to serve others beside")
    scheduler = Scheduler(model, max_batch=options.max_batch, max_queue=options.max_queue,
                          background=background, prefix_cache=options.prefix_cache, tokenizer=tokenizer,
                          adapters=adapters)
    server = _Server(RequestGate(text, options.model_name, options.max_queue), scheduler, dict(options.loras))
    app = _app(options, scheduler.stop, [
        ("GET", "/health", server.health), ("GET", "/metrics", server.metrics_text),
        ("GET", "/v1/models", server.models), ("GET", "/v1/models/{model_id:path}", server.model),
        ("POST", "/v1/completions", server.completions), ("POST", "/v1/chat/completions", server.chat_completions),
        ("POST", "/v1/messages", server.messages), ("POST", "/v1/responses", server.responses),
        ("POST", "/v1/embeddings", server.embeddings),
        ("POST", "/tokenize", server.tokenize), ("POST", "/detokenize", server.detokenize),
        ("GET", "/tokenizer_info", server.tokenizer_info),
        ("POST", "/v1/load_lora_adapter", server.load_lora_adapter),
        ("POST", "/v1/unload_lora_adapter", server.unload_lora_adapter),
    ])
    app.state.scheduler = scheduler
    return app


def _app(options: ServerOptions, stop: Callable[[], None], routes: Routes) -> FastAPI:
    """The FastAPI app around ``routes``: the playground, the error shapes, the key, body size and CORS gates."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        stop()

    docs = dict(docs_url="/docs", openapi_url="/openapi.json") if options.docs else dict(docs_url=None,
                                                                                          openapi_url=None)
    app = FastAPI(title="gpt2lite", lifespan=lifespan, redoc_url=None, **docs)
    add_error_handlers(app)
    if options.playground:
        page = playground_page()

        async def playground() -> HTMLResponse:
            return page

        routes = [*routes, ("GET", "/", playground)]
    for method, path, handler in routes:
        # HEAD answers wherever GET does (load balancers and uptime checks probe with it).
        app.add_api_route(path, handler, methods=[method, "HEAD"] if method == "GET" else [method])
    app.add_middleware(AccessGate, api_key=options.api_key, max_body_size=options.max_body_size)
    if options.allowed_origins:  # outside the key check: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=list(options.allowed_origins),
                           allow_methods=list(options.allowed_methods), allow_headers=list(options.allowed_headers))
    return app
