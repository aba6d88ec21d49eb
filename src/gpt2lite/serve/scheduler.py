"""Continuous batching: one thread owns the model and a ``DecodeSession`` of ``max_batch`` rows.

The scheduler only decides which rows run. Between decode steps it prefills
waiting requests into free rows; every step then decodes all running rows
together, and a row that finishes (end token, stop sequence, length, or its client
went away) leaves at once, freeing its row. Tokens are chosen by
``gpt2lite.generation.rules``: each row has its own ``TokenRules`` (its options and
its own seeded ``torch.Generator``), so a request draws the same tokens alone or in
company, and the same as ``generate`` would. Running rows are kept at the front of
the batch (rows ``0 .. n-1``), so a step reads the cache through views, never copies.

Prefix caching: a freed row keeps the keys and values of the tokens it held. A
new request goes into the free row that shares the longest prefix with its prompt
(as llama.cpp's server reuses a slot), which is cut back to that prefix; only the
rest of the prompt is prefilled. Few-shot prompts and chat histories repeat their
beginnings, so their prefills shrink to the new part.

LoRA adapters (``adapters``, a ``LoraSlots``): each request names its adapter
(None: the base model); rows with different adapters decode in one batch, the
scheduler routing each forward's rows to their adapters' slots. A freed row's
cache is reused only by a request of the same adapter (the same load of it).
``load_adapter`` and ``unload_adapter`` run between steps, in the loop's thread;
an unload waits for the requests that use the adapter, and new ones naming it
are refused at once (``UnknownAdapter``).

Faults stay with their requests: a request whose prefill or token choice fails
ends with an error alone; a batched forward that fails is retried row by row, so
only the rows that fail again end. ``drain()`` stops taking requests and lets the
running ones finish (a graceful shutdown); ``stop()`` ends everything at once.

The HTTP layer only submits ``Request`` objects and receives their events.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from gpt2lite.generation.context import fit_prompt, shifted
from gpt2lite.generation.options import GenerationOptions
from gpt2lite.generation.rules import Step, TokenRules, prompt_logprobs, step_rows
from gpt2lite.generation.session import DecodeSession
from gpt2lite.models.protocol import DecoderModel
from gpt2lite.tokenizers.protocol import TokenizerProtocol
from gpt2lite.transforms.adapters import LoraSlots
from gpt2lite.transforms.peft import AdapterWeights

__all__ = ["PromptToken", "QueueFull", "Request", "Scheduler", "SchedulerStats", "UnknownAdapter"]

log = logging.getLogger("gpt2lite.serve")

# A prompt token's log-probability (None for the first), its rank and the best alternatives [(id, logprob)].
PromptToken = tuple[float | None, int, list[tuple[int, float]]]


class QueueFull(RuntimeError):
    """The queue is at capacity: the requests were not accepted."""


class UnknownAdapter(LookupError):
    """A request names a LoRA adapter that is not loaded (or is being unloaded): the requests were not accepted."""


@dataclass
class Request:
    """One sequence to generate. Events arrive through ``on_token``/``on_done`` from the scheduler's thread.

    ``on_token(token, logprob, top)`` gets each token, its log-probability and the
    ``top_logprobs`` best ``[(id, logprob)]``; ``on_done(reason, error)`` ends the
    request with "stop", "length", "cancelled", "shutdown" or "error". With
    ``on_prompt_logprobs``, the prompt's tokens are scored first (``prompt_top``
    alternatives each) and the prompt is prefilled whole.
    """

    prompt: list[int]
    options: GenerationOptions
    on_token: Callable[[int, float, list[tuple[int, float]]], None]
    on_done: Callable[[str, BaseException | None], None]
    on_prompt_logprobs: Callable[[list[PromptToken]], None] | None = None
    prompt_top: int = 0
    adapter: str | None = None  # the LoRA adapter it decodes with, by name (None: the base model)
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
    cached_prompt_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    context_shifts: int = 0  # rows that filled the context and went on with the later half
    steps: int = 0


class _Row:
    """A running request, the rules that choose its tokens, and its logits for the next choice."""

    def __init__(self, request: Request, rules: TokenRules, logits: torch.Tensor) -> None:
        self.request = request
        self.rules = rules
        self.logits = logits


class Scheduler:
    """The serving loop: ``submit()`` requests from any thread; the loop runs in its own thread or in ``run()``."""

    def __init__(
        self, model: DecoderModel, *, max_batch: int = 16, max_queue: int = 256, background: bool = True,
        prefix_cache: bool = True, tokenizer: TokenizerProtocol | None = None, adapters: LoraSlots | None = None,
    ) -> None:
        """Allocate ``max_batch`` rows of the model's whole context; start the loop in a thread if ``background``.

        ``tokenizer`` gives requests with a structured-output constraint their vocabulary.
        ``adapters``: the slot table of the LoRA adapters requests may name (those it holds serve at once).

        Otherwise call ``run()`` from the thread that should own the model: on some
        CPUs torch's kernels run markedly slower outside the main thread (60% here),
        so ``gpt2lite serve`` runs the loop in its main thread and the HTTP server beside it.
        """
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context = model.config.n_positions  # None: no limit (recurrent models)
        self.session = DecodeSession(model, max_batch, self.context or 1)
        self.stats = SchedulerStats()
        self.prefix_cache = prefix_cache
        self._rows: list[_Row] = []
        self._held: list[list[int]] = [[] for _ in range(max_batch)]  # the tokens each row's state holds
        self._held_by = [0] * max_batch  # and which load of an adapter made them (0: the base model)
        self.adapters = adapters
        self._loads = 0  # adapters loaded so far: each load's number keys the prefix cache
        self._adapters: dict[str, int] = {}  # name -> its load's number; 0 while loading
        self._unloading: dict[str, Future[None]] = {}  # names being unloaded, waiting for their requests
        self._control: collections.deque[tuple[str, AdapterWeights, Future[None]]] = collections.deque()
        for name in adapters.slots if adapters is not None else ():
            self._loads += 1
            self._adapters[name] = self._loads
        self._waiting: collections.deque[Request] = collections.deque()
        self._jobs: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._draining = False
        self._running = background
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="gpt2lite-scheduler", daemon=True)
            self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a row."""
        return sum(not r.cancelled for r in list(self._waiting))

    @property
    def running(self) -> int:
        """Requests decoding now."""
        return len(self._rows)

    @property
    def alive(self) -> bool:
        """Whether the loop runs (or is about to)."""
        return self._running and not self._stopped

    @property
    def accepting(self) -> bool:
        """Whether new requests are taken (not once a drain or stop began)."""
        return self.alive and not self._draining

    def run(self) -> None:
        """Run the loop in the calling thread until ``stop()``, or until a drain has finished every request."""
        if self._thread is not None:
            raise RuntimeError("this scheduler already runs in a background thread")
        self._running = True
        self._loop()

    @property
    def adapter_names(self) -> list[str]:
        """The LoRA adapters requests may name now."""
        with self._wake:
            return [name for name, load in self._adapters.items() if load and name not in self._unloading]

    def submit(self, requests: Request | Sequence[Request]) -> None:
        """Queue requests, all or none: ``QueueFull`` when they do not fit beside those that wait.

        ``UnknownAdapter`` when one names an adapter that is not loaded, or is being unloaded.
        """
        batch = [requests] if isinstance(requests, Request) else list(requests)
        with self._wake:
            if not self.accepting:
                raise RuntimeError("the server is shutting down" if self._draining else "the scheduler is not running")
            for r in batch:
                if r.adapter is not None and (not self._adapters.get(r.adapter) or r.adapter in self._unloading):
                    raise UnknownAdapter(f"the LoRA adapter {r.adapter!r} is not loaded")
            self._prune()
            if len(self._waiting) + len(batch) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting and this server queues {self.max_queue}")
            self._waiting.extend(batch)
            self.stats.requests += len(batch)
            self._wake.notify()

    def load_adapter(self, name: str, weights: AdapterWeights) -> Future[None]:
        """Add an adapter (read by ``LoraSlots.read``) between steps; the future is done once requests may name it.

        A name in use, or no free slot, is a ``ValueError`` at once.
        """
        with self._wake:
            if self.adapters is None:
                raise ValueError("this scheduler serves no LoRA adapters")
            if name in self._adapters:
                raise ValueError(f"the LoRA adapter {name!r} is " +
                                 ("being unloaded" if name in self._unloading else "loaded already"))
            if len(self._adapters) >= self.adapters.max_loras:
                raise ValueError(f"{len(self._adapters)} LoRA adapters are loaded and this server holds at most "
                                 f"{self.adapters.max_loras} (max_loras): unload one first")
            self._adapters[name] = 0
            done: Future[None] = Future()
            self._control.append((name, weights, done))
            self._wake.notify()
        return done

    def unload_adapter(self, name: str) -> Future[None]:
        """Refuse new requests naming ``name`` now; the future is done once those running have ended and it is gone.

        An adapter that is not loaded is an ``UnknownAdapter`` at once.
        """
        with self._wake:
            if not self._adapters.get(name) or name in self._unloading:
                raise UnknownAdapter(f"the LoRA adapter {name!r} is not loaded")
            done: Future[None] = Future()
            self._unloading[name] = done
            self._wake.notify()
        return done

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` in the loop's thread between two steps; its result (or error) comes in the future.

        For other work on the model (embeddings): the loop's thread stays its only user.
        """
        future: Future = Future()
        with self._wake:
            if not self.accepting:
                raise RuntimeError("the server is shutting down" if self._draining else "the scheduler is not running")
            self._jobs.append((fn, future))
            self._wake.notify()
        return future

    def drain(self) -> None:
        """Take no new requests; the loop ends once those waiting and running have finished."""
        with self._wake:
            self._draining = True
            self._wake.notify()

    def stop(self) -> None:
        """End the loop; waiting and running requests end with reason "shutdown"."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # the loop (its own thread only) ---------------------------------------------------------

    def _prune(self) -> None:
        """Forget waiting requests whose clients went away (with the lock held)."""
        if any(r.cancelled for r in self._waiting):
            gone = [r for r in self._waiting if r.cancelled]
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
            for r in gone:
                self.stats.cancelled += 1
                r.on_done("cancelled", None)

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    self._prune()
                    while not self._stopped and not self._waiting and not self._rows and not self._control \
                            and not self._unloading and not self._jobs:
                        if self._draining:
                            return
                        self._wake.wait(timeout=0.5)
                        self._prune()
                    if self._stopped:
                        return
                    admitted = []
                    while self._waiting and len(self._rows) + len(admitted) < self.max_batch:
                        admitted.append(self._waiting.popleft())
                    loads, self._control = list(self._control), collections.deque()
                    unloads = self._unused(admitted)
                    jobs, self._jobs = list(self._jobs), collections.deque()
                self._change_adapters(loads, unloads)
                try:
                    with torch.inference_mode():
                        if jobs:
                            self._route([])  # a job's forward reads the base model alone
                        for fn, future in jobs:
                            if future.set_running_or_notify_cancel():
                                try:
                                    future.set_result(fn())
                                except Exception as exc:  # the job's own fault: its caller hears of it
                                    future.set_exception(exc)
                        for request in admitted:
                            self._prefill(request)
                        if self._rows:
                            self._step()
                except Exception as exc:  # a fault outside any one request: fail those running, start afresh
                    log.exception("a decode step failed; ending the %d running requests", len(self._rows))
                    running, self._rows = self._rows, []
                    self._held = [[] for _ in range(self.max_batch)]
                    self.session.reset()
                    for row in running:
                        self.stats.failed += 1
                        row.request.on_done("error", exc)
        finally:
            self._running = False
            with self._wake:
                ending = [row.request for row in self._rows] + list(self._waiting)
                self._rows, self._waiting = [], collections.deque()
                pending = [done for _, _, done in self._control] + list(self._unloading.values())
                self._control, self._unloading = collections.deque(), {}
                jobs, self._jobs = list(self._jobs), collections.deque()
            for request in ending:
                request.on_done("shutdown", None)
            for done in pending:
                done.set_exception(RuntimeError("the server is shutting down"))
            for _, future in jobs:
                if future.set_running_or_notify_cancel():
                    future.set_exception(RuntimeError("the server shut down before this request ran"))

    def _unused(self, admitted: list[Request]) -> list[str]:
        """The adapters being unloaded that no request uses any more (with the lock held)."""
        used = {r.adapter for r in admitted} | {r.adapter for r in self._waiting} | \
            {row.request.adapter for row in self._rows}
        return [name for name in self._unloading if name not in used]

    def _change_adapters(self, loads: list[tuple[str, AdapterWeights, Future[None]]], unloads: list[str]) -> None:
        """Load and unload adapters, between steps: nothing runs the model now."""
        for name in unloads:
            self.adapters.remove(name)  # type: ignore[union-attr]  # only loaded names get here
            with self._wake:
                del self._adapters[name]
                done = self._unloading.pop(name)
            done.set_result(None)
            log.info("unloaded the LoRA adapter %r", name)
        for name, weights, done in loads:
            try:
                self.adapters.add(name, weights)  # type: ignore[union-attr]
            except Exception as exc:  # a bad adapter fails its own load only
                with self._wake:
                    del self._adapters[name]
                done.set_exception(exc)
                continue
            with self._wake:
                self._loads += 1
                self._adapters[name] = self._loads
            done.set_result(None)
            log.info("loaded the LoRA adapter %r", name)

    def _route(self, requests: Sequence[Request]) -> None:
        """Before a forward: row ``i`` of its batch decodes with the adapter of ``requests[i]`` (none: every row
        of the next forward reads the base model alone)."""
        if self.adapters is not None:
            self.adapters.route([r.adapter for r in requests] or [None])

    def _prefill(self, request: Request) -> None:
        slot = len(self._rows)
        try:
            if request.cancelled:
                self.stats.cancelled += 1
                request.on_done("cancelled", None)
                return
            opts = request.options
            if not request.prompt:
                raise ValueError("the prompt holds no tokens")
            # The HTTP layer asked the same before submitting; a request submitted directly is checked here.
            fit_prompt(len(request.prompt), self.context, max_new_tokens=opts.max_new_tokens,
                       context_shift=opts.context_shift, n_keep=opts.n_keep)
            device = self.session.state.device
            ids = torch.tensor([request.prompt], device=device)
            rules = TokenRules(opts, self.model.config, ids, tokenizer=self.tokenizer)
            echo = request.on_prompt_logprobs is not None
            key = self._adapters[request.adapter] if request.adapter is not None else 0
            cached = self._reuse_prefix(slot, request.prompt, echo, key)
            self._route([request])
            logits = self.session.feed(ids[:, cached:], rows=[slot], last_only=not echo)  # (1, T or 1, vocab)
            self._held[slot], self._held_by[slot] = list(request.prompt), key
            if echo:
                request.on_prompt_logprobs(_prompt_tokens(logits, ids, request.prompt_top))
            self.stats.prompt_tokens += len(request.prompt)
            self.stats.cached_prompt_tokens += cached
            if opts.max_new_tokens == 0:  # only the prompt was asked for (echo)
                self.stats.finished += 1
                request.on_done("length", None)
                return
            self._rows.append(_Row(request, rules, logits[0, -1]))
        except Exception as exc:  # one bad request fails alone
            self._held[slot] = []
            self.stats.failed += 1
            request.on_done("error", exc)

    def _reuse_prefix(self, slot: int, prompt: list[int], whole: bool, key: int) -> int:
        """Put the free row sharing the longest prefix with ``prompt`` at ``slot``, cut back to it; its length.

        Only rows made by the same adapter (``key``, its load's number) count. With
        ``whole`` (the prompt's logits are wanted) the row is emptied instead.
        """
        best, common = slot, 0
        if self.prefix_cache and not whole:
            for row in range(slot, self.max_batch):
                if self._held_by[row] != key:  # another adapter's keys and values
                    continue
                n = _common_prefix(self._held[row], prompt, len(prompt) - 1)  # at least one token is fed
                if n > common:
                    best, common = row, n
        if best != slot:
            index = list(range(self.max_batch))
            index[slot], index[best] = best, slot
            self.session.reorder(index)
            self._held[slot], self._held[best] = self._held[best], self._held[slot]
            self._held_by[slot], self._held_by[best] = self._held_by[best], self._held_by[slot]
        if common:
            try:
                self.session.truncate([slot], [common])
                return common
            except NotImplementedError:  # a recurrent state cannot be cut back: no prefix cache for it
                self.prefix_cache = False
        self.session.reset([slot])
        return 0

    def _step(self) -> None:
        """Have each row's rules choose its next token, retire finished rows, then decode the rest in one batch."""
        rows = self._rows
        live = [i for i, row in enumerate(rows) if not row.request.cancelled]
        steps = dict(zip(live, step_rows([rows[i].rules for i in live], torch.stack([rows[i].logits for i in live])),
                         strict=True)) if live else {}
        chosen: list[int] = []
        finished: list[bool] = []
        for i, row in enumerate(rows):
            token, reason = self._report(row, steps.get(i))
            chosen.append(token)
            finished.append(reason is not None)
        self.stats.steps += 1
        self._compact(finished, chosen)
        if self._rows:
            self._decode([chosen[i] for i in range(len(self._rows))])

    def _report(self, row: _Row, step: Step | Exception | None) -> tuple[int, str | None]:
        """Hand a row's new token to its request; return the token and why the row ends (None: it goes on)."""
        token, reason, error = 0, None, None
        if step is None:
            reason = "cancelled"
            self.stats.cancelled += 1
        elif isinstance(step, Exception):
            reason, error = "error", step
            self.stats.failed += 1
        else:
            token = int(step.tokens[0])
            top = list(zip(step.top_ids[0].tolist(), step.top_logprobs[0].tolist(), strict=True)) \
                if step.top_ids is not None else []
            self.stats.generated_tokens += 1
            row.request.on_token(token, float(step.logprobs[0]), top)
            if bool(step.finished[0]):
                reason = "stop"
            elif row.rules.done:
                reason = "length"
            self.stats.finished += reason is not None
        if reason is not None:
            row.request.on_done(reason, error)
        return token, reason

    def _compact(self, finished: list[bool], chosen: list[int]) -> None:
        """Drop finished rows, keeping running rows at the front; a freed row's cache moves, not vanishes."""
        if not any(finished):
            return
        n = finished.count(False)
        holes = [i for i in range(n) if finished[i]]
        movers = [i for i in range(n, len(finished)) if not finished[i]]
        if holes:
            index = list(range(self.max_batch))
            for hole, mover in zip(holes, movers, strict=True):
                index[hole], index[mover] = mover, hole  # a swap: the finished row's keys and values stay cached
                self._rows[hole], self._rows[mover] = self._rows[mover], self._rows[hole]
                chosen[hole], chosen[mover] = chosen[mover], chosen[hole]
                self._held[hole], self._held[mover] = self._held[mover], self._held[hole]
                self._held_by[hole], self._held_by[mover] = self._held_by[mover], self._held_by[hole]
            self.session.reorder(index)
        self._rows = self._rows[:n]

    def _decode(self, chosen: list[int]) -> None:
        """Feed each running row its chosen token in one batch; rows whose forward fails alone end.

        A row of ``context_shift`` that the token would fill runs its shifted window instead.
        """
        n = len(self._rows)
        full = [i for i in range(n) if self.context is not None and self._rows[i].rules.options.context_shift
                and len(self._held[i]) + 1 >= self.context]
        shift_errors = self._shift(full, chosen)
        going = [i for i in range(n) if i not in full]
        ids = torch.tensor(chosen, device=self.session.state.device)[:, None]
        try:
            if not full:
                self._route([row.request for row in self._rows])
                logits = self.session.feed(ids, rows=None if n == self.max_batch else range(n))[:, -1]  # (n, vocab)
                results: list[torch.Tensor | Exception | None] = list(logits)
            else:
                results = [None] * n
                if going:
                    self._route([self._rows[i].request for i in going])
                    for i, row_logits in zip(going, self.session.feed(ids[going], rows=going)[:, -1], strict=True):
                        results[i] = row_logits
        except Exception as exc:
            log.warning("a batched forward of %d rows failed (%s); retrying each row alone", n, exc)
            results = self._decode_alone(ids, skip=full)
        for i, exc in shift_errors.items():
            results[i] = exc
        failed = []
        for i, (row, result) in enumerate(zip(self._rows, results, strict=True)):
            if result is None:  # shifted above: its logits are set already
                continue
            if isinstance(result, Exception):
                failed.append(i)
                self._held[i] = []
                self.stats.failed += 1
                row.request.on_done("error", result)
            else:
                row.logits = result
                self._held[i].append(chosen[i])
        if failed:
            self._compact([i in failed for i in range(n)], [0] * n)

    def _shift(self, rows: list[int], chosen: list[int]) -> dict[int, Exception]:
        """Run the shifted window (the row's tokens and its new one) into each of ``rows``, emptied first.

        Returns the rows whose forward failed, with the error.
        """
        failed: dict[int, Exception] = {}
        for i in rows:
            window = shifted([*self._held[i], chosen[i]], self.context,  # type: ignore[arg-type]
                             self._rows[i].rules.options.n_keep)
            self.session.reset([i])
            self._held[i] = []
            try:
                ids = torch.tensor([window], device=self.session.state.device)
                self._route([self._rows[i].request])
                self._rows[i].logits = self.session.feed(ids, rows=[i])[0, -1]
            except Exception as exc:  # this row fails alone
                failed[i] = exc
                continue
            self._held[i] = window  # the whole window is in the cache now
            self.stats.context_shifts += 1
        return failed

    def _decode_alone(self, ids: torch.Tensor, skip: list[int]) -> list[torch.Tensor | Exception | None]:
        """Each row's step on its own, after the batch failed: rolled back first, so nothing is fed twice."""
        n = len(self._rows)
        going = [i for i in range(n) if i not in skip]
        try:
            self.session.truncate(going, [len(self._held[i]) for i in going])
        except NotImplementedError as exc:  # a recurrent state cannot be rolled back: the batch fails
            return [None if i in skip else exc for i in range(n)]
        results: list[torch.Tensor | Exception | None] = []
        for i in range(n):
            if i in skip:
                results.append(None)
                continue
            try:
                self._route([self._rows[i].request])
                results.append(self.session.feed(ids[i : i + 1], rows=[i])[0, -1])
            except Exception as exc:  # this row fails; its state is reset when the row is reused
                results.append(exc)
        return results


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """The length of the longest common prefix of ``a`` and ``b``, at most ``limit``."""
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _prompt_tokens(logits: torch.Tensor, ids: torch.Tensor, k: int) -> list[PromptToken]:
    """Each prompt token's log-probability, rank and ``k`` best alternatives, from the prompt's logits."""
    scored = prompt_logprobs(logits, ids, k=k)
    values, ranks = scored.values[0].tolist(), scored.ranks[0].tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in values]
    if scored.top_ids is not None:
        tops = [list(zip(i, v, strict=True)) for i, v in zip(scored.top_ids[0].tolist(),
                                                             scored.top_values[0].tolist(), strict=True)]
    return [(None if v != v else v, r, top) for v, r, top in zip(values, ranks, tops, strict=True)]
