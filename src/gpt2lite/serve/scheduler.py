"""Continuous batching: one thread owns the model and a ``DecodeSession`` of ``max_batch`` rows.

The scheduler only decides which rows run. Between decode steps it prefills
waiting requests into free rows; every step then decodes all running rows
together, and a row that finishes (end token, stop sequence, length, or its client
went away) leaves at once, freeing its row. Tokens are chosen by
``gpt2lite.generation.rules``: each row has its own ``TokenRules`` (its options and
its own seeded ``torch.Generator``), so a request draws the same tokens alone or in
company, and the same as ``generate`` would. Running rows are kept at the front of
the batch (rows ``0 .. n-1``), so a step reads the cache through views, never copies.

The HTTP layer only submits ``Request`` objects and receives their events.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpt2lite.generation.options import GenerationOptions
from gpt2lite.generation.rules import TokenRules, prompt_logprobs, step_rows
from gpt2lite.generation.session import DecodeSession
from gpt2lite.models.protocol import DecoderModel

__all__ = ["QueueFull", "Request", "Scheduler", "SchedulerStats"]


class QueueFull(RuntimeError):
    """The queue is at capacity: the request was not accepted."""


@dataclass
class Request:
    """One sequence to generate. Events arrive through ``on_token``/``on_done`` from the scheduler's thread.

    ``on_token(token, logprob, top)`` gets each token, its log-probability and the
    ``top_logprobs`` best ``[(id, logprob)]``; ``on_done(reason, error)`` ends the
    request with "stop", "length", "cancelled" or "error".
    """

    prompt: list[int]
    options: GenerationOptions
    on_token: Callable[[int, float, list[tuple[int, float]]], None]
    on_done: Callable[[str, BaseException | None], None]
    on_prompt_logprobs: Callable[[list[float | None]], None] | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Ask the scheduler to drop this request at its next step (its row is freed)."""
        self.cancelled = True


@dataclass
class SchedulerStats:
    """Counters for ``/metrics``."""

    requests: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    steps: int = 0


class _Row:
    """A running request, the rules that choose its tokens, and its logits for the next choice."""

    def __init__(self, request: Request, rules: TokenRules, logits: torch.Tensor) -> None:
        self.request = request
        self.rules = rules
        self.logits = logits


class Scheduler:
    """The serving loop: ``submit()`` requests from any thread; the loop runs in its own thread."""

    def __init__(
        self, model: DecoderModel, *, max_batch: int = 16, max_queue: int = 256, background: bool = True
    ) -> None:
        """Allocate ``max_batch`` rows of the model's whole context; start the loop in a thread if ``background``.

        Otherwise call ``run()`` from the thread that should own the model: on some
        CPUs torch's kernels run markedly slower outside the main thread (60% here),
        so ``gpt2lite serve`` runs the loop in its main thread and the HTTP server beside it.
        """
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context = model.config.n_positions
        self.session = DecodeSession(model, max_batch, self.context)
        self.stats = SchedulerStats()
        self._rows: list[_Row] = []
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._running = background
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="gpt2lite-scheduler", daemon=True)
            self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a row."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests decoding now."""
        return len(self._rows)

    @property
    def alive(self) -> bool:
        """Whether the loop runs (or is about to: requests are accepted)."""
        return self._running and not self._stopped

    def run(self) -> None:
        """Run the loop in the calling thread until ``stop()``."""
        if self._thread is not None:
            raise RuntimeError("this scheduler already runs in a background thread")
        self._running = True
        self._loop()

    def submit(self, request: Request) -> None:
        """Queue ``request``; ``QueueFull`` when ``max_queue`` requests already wait."""
        if not self.alive:
            raise RuntimeError("the scheduler is not running")
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the most this server queues")
            self._waiting.append(request)
            self.stats.requests += 1
            self._wake.notify()

    def stop(self) -> None:
        """End the loop; waiting and running requests end as cancelled."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # the loop (its own thread only) ---------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve_requests()
        finally:
            self._running = False

    def _serve_requests(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._waiting and not self._rows:
                    self._wake.wait()
                if self._stopped:
                    break
                admitted = []
                while self._waiting and len(self._rows) + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
            with torch.inference_mode():
                for request in admitted:
                    self._prefill(request)
                if self._rows:
                    self._step()
        for row in self._rows:
            row.request.on_done("cancelled", None)
        for request in self._waiting:
            request.on_done("cancelled", None)

    def _prefill(self, request: Request) -> None:
        slot = len(self._rows)
        try:
            opts = request.options
            if not request.prompt or len(request.prompt) + opts.max_new_tokens > self.context:
                raise ValueError(f"the prompt of {len(request.prompt)} tokens + max_tokens={opts.max_new_tokens} "
                                 f"does not fit the context of {self.context} tokens")
            device = self.session.state.device
            ids = torch.tensor([request.prompt], device=device)
            rules = TokenRules(opts, self.model.config, ids)
            self.session.reset([slot])
            echo = request.on_prompt_logprobs is not None
            logits = self.session.feed(ids, rows=[slot], last_only=not echo)  # (1, T or 1, vocab)
            if echo:
                values, _, _ = prompt_logprobs(logits, ids)
                request.on_prompt_logprobs([None if v != v else v for v in values[0].tolist()])
            self.stats.prompt_tokens += len(request.prompt)
            if opts.max_new_tokens == 0:  # only the prompt was asked for (echo)
                self.stats.finished += 1
                request.on_done("length", None)
                return
            self._rows.append(_Row(request, rules, logits[0, -1]))
        except Exception as exc:  # one bad request fails alone
            self.stats.failed += 1
            request.on_done("error", exc)

    def _step(self) -> None:
        """Have each row's rules choose its next token, retire finished rows, then decode the rest in one batch."""
        rows = self._rows
        live = [i for i, row in enumerate(rows) if not row.request.cancelled]
        steps = dict(zip(live, step_rows([rows[i].rules for i in live], torch.stack([rows[i].logits for i in live])),
                         strict=True)) if live else {}
        finished: list[bool] = []
        chosen: list[int] = []
        for i, row in enumerate(rows):
            step = steps.get(i)
            token, reason = 0, None
            if step is None:
                reason = "cancelled"
                self.stats.cancelled += 1
            elif isinstance(step, Exception):
                reason = "error"
                self.stats.failed += 1
            else:
                token = int(step.tokens[0])
                top: list[tuple[int, float]] = []
                if step.top_ids is not None:
                    top = list(zip(step.top_ids[0].tolist(), step.top_logprobs[0].tolist(), strict=True))
                self.stats.generated_tokens += 1
                row.request.on_token(token, float(step.logprobs[0]), top)
                if bool(step.finished[0]):
                    reason = "stop"
                elif row.rules.done:
                    reason = "length"
                if reason is not None:
                    self.stats.finished += 1
            chosen.append(token)
            finished.append(reason is not None)
            if reason is not None:
                row.request.on_done(reason, step if isinstance(step, Exception) else None)
        self.stats.steps += 1
        if any(finished):
            # Keep running rows at the front: move the last running ones into the holes.
            n = finished.count(False)
            holes = [i for i in range(n) if finished[i]]
            movers = [i for i in range(n, len(finished)) if not finished[i]]
            if holes:
                index = list(range(self.max_batch))
                for hole, mover in zip(holes, movers, strict=True):
                    index[hole] = mover
                    self._rows[hole], chosen[hole] = self._rows[mover], chosen[mover]
                self.session.reorder(index)
            self._rows, chosen = self._rows[:n], chosen[:n]
        if not self._rows:
            return
        n = len(self._rows)
        ids = torch.tensor(chosen, device=self.session.state.device)[:, None]
        logits = self.session.feed(ids, rows=None if n == self.max_batch else range(n))[:, -1]  # (n, vocab)
        for row, row_logits in zip(self._rows, logits, strict=True):
            row.logits = row_logits
