"""Serving a sequence classifier: ``POST /classify`` (vLLM's shape), batched across requests.

One thread owns the classifier, as the scheduler owns a language model: the
texts of requests that wait together are classified in one batch (up to
``max_batch`` texts), so many small requests cost about what one larger one
does. A batch that fails is retried request by request, so a fault stays with
the request that caused it. The HTTP layer (``app.py``) only translates.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

from starlette.concurrency import run_in_threadpool

from gpt2lite.serve.errors import KINDS, ApiError, unknown_model
from gpt2lite.serve.protocol import ClassifyRequest
from gpt2lite.serve.scheduler import QueueFull
from gpt2lite.text.classifier import Classification, TextClassifier

__all__ = ["ClassifierServer", "ClassifyBatcher"]


class ClassifyBatcher:
    """The classifier's own thread: requests waiting together are classified as one batch."""

    def __init__(self, classifier: TextClassifier, *, max_batch: int = 16, max_queue: int = 256) -> None:
        self.classifier, self.max_batch, self.max_queue = classifier, max_batch, max_queue
        self.batches = 0  # batches run, of one request or several
        self._waiting: collections.deque[tuple[list[list[int]], Future]] = collections.deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="gpt2lite-classifier", daemon=True)
        self._thread.start()

    @property
    def accepting(self) -> bool:
        """Whether requests are taken."""
        return not self._stopped

    def submit(self, texts: list[list[int]]) -> Future:
        """Queue one request's encoded texts; its classifications come in the future (``QueueFull`` when full)."""
        future: Future = Future()
        with self._wake:
            if self._stopped:
                raise RuntimeError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting and this server queues {self.max_queue}")
            self._waiting.append((texts, future))
            self._wake.notify()
        return future

    def stop(self) -> None:
        """End the thread; waiting requests fail."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._waiting:
                    self._wake.wait(timeout=0.5)
                if self._stopped:
                    for _, future in self._waiting:
                        future.set_exception(RuntimeError("the server shut down before this request ran"))
                    return
                taken = [self._waiting.popleft()]
                count = len(taken[0][0])
                while self._waiting and count + len(self._waiting[0][0]) <= self.max_batch:
                    count += len(self._waiting[0][0])
                    taken.append(self._waiting.popleft())
            self._run(taken)

    def _run(self, taken: list[tuple[list[list[int]], Future]]) -> None:
        texts = [text for texts, _ in taken for text in texts]
        try:
            results = self.classifier.classify_ids(texts, batch_size=self.max_batch)
        except Exception as exc:
            if len(taken) > 1:  # one request's fault stays its own
                for item in taken:
                    self._run([item])
            else:
                taken[0][1].set_exception(exc)
            return
        self.batches += 1
        start = 0
        for texts, future in taken:
            future.set_result(results[start : start + len(texts)])
            start += len(texts)


class ClassifierServer:
    """The routes of a classifier server: ``/classify``, and the model's card."""

    def __init__(self, batcher: ClassifyBatcher, model_name: str) -> None:
        self.batcher, self.model_name = batcher, model_name
        self.classifier = batcher.classifier

    def card(self) -> dict[str, Any]:
        """The model's entry in ``/v1/models``: a classifier, with its labels."""
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "gpt2lite", "task": "classify",
                "labels": list(self.classifier.labels), "max_model_len": self.classifier.model.config.n_positions}

    def check_model(self, name: str | None) -> None:
        """A request for another model than the one served is a 404."""
        if name is not None and name != self.model_name:
            raise unknown_model(name, self.model_name)

    async def health(self) -> dict[str, Any]:
        return {"status": "ok" if self.batcher.accepting else "stopped", "task": "classify"}

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.card()]}

    async def classify(self, body: ClassifyRequest) -> dict[str, Any]:
        """vLLM's ``/classify``: each text's label and the probability of every label."""
        self.check_model(body.model)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise ApiError(400, "input is empty", "input")
        context = self.classifier.model.config.n_positions
        tokenizer = self.classifier.tokenizer

        def encode(text: str, i: int) -> list[int]:
            if not text:
                raise ApiError(400, f"input.{i} is empty: there is nothing to classify", "input")
            try:
                return tokenizer.encode(text)[:context]  # read from its start, as training reads it
            except ValueError as exc:  # a character a character-level vocabulary lacks
                raise ApiError(400, f"input.{i}: {exc}", "input") from None

        encoded = await run_in_threadpool(lambda: [encode(t, i) for i, t in enumerate(texts)])
        tokens = sum(map(len, encoded))
        try:
            future = self.batcher.submit(encoded)
        except QueueFull as exc:
            raise ApiError(429, f"server busy: {exc}; retry later", kind=KINDS[429]) from None
        except RuntimeError as exc:
            raise ApiError(503, str(exc), kind=KINDS[503]) from None
        results: list[Classification] = await asyncio.wrap_future(future)
        labels = self.classifier.labels
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": self.model_name,
                "data": [{"index": i, "label": r.label, "probs": [r.probabilities[name] for name in labels],
                          "num_classes": len(labels)} for i, r in enumerate(results)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}
