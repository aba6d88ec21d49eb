"""The request gate: a body in, checked work out (prompts as token ids, one ``GenerationOptions`` each), or a 400.

Every check of a request happens here, before anything is queued, as vLLM does
at its one front door: the model's name, the prompts (encoded off the event
loop, a text too long refused before it is encoded), the context through the
library's one gate (``gpt2lite.generation.context``), ``n_keep``, ``logit_bias``
and the sampling values. The library's ``OptionError`` names its option; the
gate answers with the request's name for it (``max_new_tokens`` is
``max_tokens`` here).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from starlette.concurrency import run_in_threadpool

from gpt2lite.errors import ContextLengthError, OptionError
from gpt2lite.generation.constraints import RowConstraints
from gpt2lite.generation.context import check_text_fits, fit_prompt
from gpt2lite.generation.options import CONSTRAINTS, GenerationOptions
from gpt2lite.serve.errors import TOO_LONG, ApiError, api_error, unknown_model
from gpt2lite.serve.protocol import ChatMessage, Tool, constraint, sampling_options, stop_strings
from gpt2lite.text.generator import TextGenerator

__all__ = ["Prompt", "RequestGate"]

Prompt = tuple[list[int], str]  # a prompt's token ids and its text

# OpenAI's (and vLLM's) wording of context_length_exceeded, which clients such as LiteLLM recognise.
_MAXIMUM = "This model's maximum context length is {} tokens."


class RequestGate:
    """The checks of every endpoint over one model and tokenizer (wrapped in a ``TextGenerator`` for its text rules)."""

    def __init__(self, text: TextGenerator, model_name: str, max_queue: int) -> None:
        self.text, self.tokenizer = text, text.tokenizer
        self.model_name, self.max_queue = model_name, max_queue
        self.context = text.model.config.n_positions
        self.vocab = text.model.config.vocab_size
        self.adapters: Callable[[], Collection[str]] = tuple  # the LoRA adapters a request may name now

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` names (None: the base model); any other model is a 404."""
        if name is None or name == self.model_name:
            return None
        if name in self.adapters():
            return name
        raise unknown_model(name, self.model_name)

    async def chat_prompt(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] | None = None) -> str:
        """The chat template's rendering of ``messages`` (and ``tools``), off the event loop (it has a time budget)."""
        plain = [m.model_dump(exclude_none=True) for m in messages]
        specs = [t.model_dump(exclude_none=True) for t in tools] if tools else None
        try:
            return await run_in_threadpool(self.text.chat_prompt, plain, specs)
        except ValueError as exc:
            raise ApiError(400, str(exc), "messages") from None

    async def encode(self, text: str, param: str, *, special: bool = False, fit: bool = True) -> list[int]:
        """Tokenize off the event loop, refusing first a text too long to fit (no time spent on it).

        ``special``: special-token strings are tokens (a chat template writes them), not text.
        ``fit=False`` (``/tokenize``, which counts) skips the context: the body's size limit bounds the work.
        """
        try:
            if fit:
                check_text_fits(len(text), self.context, self.tokenizer.max_token_bytes, context_shift=True,
                                what=param)
        except ContextLengthError as exc:
            raise ApiError(400, f"{_MAXIMUM.format(exc.context)} However, your {param} of {len(text)} characters "
                                f"holds more tokens than that. Please reduce the length of the {param}.",
                           param, code=TOO_LONG) from None
        try:
            return await run_in_threadpool(self.tokenizer.encode, text, allowed_special="all" if special else ())
        except ValueError as exc:  # a character a character-level vocabulary lacks
            raise ApiError(400, f"{param}: {exc}", param) from None

    async def prompts(self, prompt: Any, param: str = "prompt") -> list[Prompt]:
        """The prompts as (token ids, text) pairs; an empty text prompt starts from the end token."""
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise ApiError(400, f"{param} is empty", param)
        out = []
        known = self.tokenizer.n_vocab  # a padded model has rows the tokenizer cannot decode
        for item in items:
            if isinstance(item, str):
                # Special-token strings are tokens, as in vLLM and transformers: "<|endoftext|>" is [50256].
                out.append(((await self.encode(item, param, special=True)) or [self.tokenizer.eot_token], item))
                continue
            if not item or any(not 0 <= t < known for t in item):
                raise ApiError(400, f"{param} token ids must be non-empty and in 0..{known - 1}", param)
            self._fit(len(item), 0, True, param, None)  # before decoding it
            out.append((list(item), self.tokenizer.decode(item)))
        return out

    async def inputs(self, value: Any, param: str) -> list[Prompt]:
        """Texts (or token ids) read whole, as embeddings read them: none empty, each within the context."""
        if value == "" or (isinstance(value, list) and "" in value):
            raise ApiError(400, f"{param} holds an empty text: there is nothing to read", param)
        prompts = await self.prompts(value, param)
        for ids, _ in prompts:
            self._fit(len(ids), 0, False, param, None)
        return prompts

    async def options(self, prompts: list[Prompt], body: Any, completions: int, max_tokens: int | None,
                      top_logprobs: int, prompt_param: str) -> list[GenerationOptions]:
        """Each prompt's options (the seed of its first choice), checked against the context and the queue.

        ``completions`` choices per prompt; ``max_tokens`` None is as many as fit.
        """
        if len(prompts) * completions > self.max_queue:  # a 429 would be retried in vain
            param = "best_of" if getattr(body, "best_of", None) == completions != body.n else \
                "n" if body.n > 1 else prompt_param
            raise ApiError(400, f"this request asks for {len(prompts) * completions} completions (prompts x "
                                f"{param}); this server queues at most {self.max_queue}: split it", param)
        max_param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None \
            else "max_tokens"
        params = {"max_new_tokens": max_param, "min_new_tokens": "min_tokens", "stop": "stop_token_ids",
                  "top_logprobs": "top_logprobs" if prompt_param == "messages" else "logprobs",
                  "num_return_sequences": "n", "prompt": prompt_param}
        try:
            structured = constraint(body)
            if structured is not None:  # the library names its own field; the request had another
                params.update({name: structured[0] for name in CONSTRAINTS})
            # Built once per request: its logit_bias and other values are shared by every prompt and choice.
            base = self.text.text_options(sampling_options(
                body, max_tokens=max_tokens or 0, eos=self.tokenizer.eot_token, vocab=self.vocab,
                top_logprobs=top_logprobs, structured=structured[1] if structured is not None else None))
            if base.constraint is not None:  # one that cannot be compiled is refused before anything streams
                await run_in_threadpool(RowConstraints.check, base, self.tokenizer, self.tokenizer.eot_token)
        except (ValueError, ImportError) as exc:
            raise api_error(exc, params) from None
        out = []
        for ids, _ in prompts:
            allowed = self._fit(len(ids), max_tokens, body.context_shift, prompt_param, max_param, body.n_keep)
            if body.min_tokens > allowed:  # as vLLM: a minimum the maximum cannot reach is refused
                raise ApiError(400, f"min_tokens={body.min_tokens} is more than the {allowed} tokens this request may "
                                    f"generate ({max_param})", "min_tokens")
            try:
                out.append(base.replace(max_new_tokens=allowed, min_new_tokens=body.min_tokens))
            except ValueError as exc:
                raise api_error(exc, params) from None
        return out

    def _fit(self, length: int, asked: int | None, shift: bool, prompt_param: str, max_param: str | None,
             n_keep: int = 0) -> int:
        """``max_tokens`` for a prompt of ``length`` tokens, checked by the context gate; None: as many as fit.

        Without a context limit, or with a context shift, None is OpenAI's default, 16.
        """
        if asked is None:
            asked = 16 if self.context is None or shift else max(0, self.context - length)
        try:
            fit_prompt(length, self.context, max_new_tokens=asked, context_shift=shift, n_keep=n_keep)
        except ContextLengthError as exc:
            if exc.param == "prompt":
                raise ApiError(400, f"{_MAXIMUM.format(exc.context)} However, your {prompt_param} resulted in "
                                    f"{length} tokens. Please reduce the length of the {prompt_param}.",
                               prompt_param, code=TOO_LONG) from None
            raise ApiError(400, f"{_MAXIMUM.format(exc.context)} However, you requested {length + asked} tokens "
                                f"({length} in the {prompt_param}, {asked} in the completion: {max_param}). Please "
                                f"reduce the length of the {prompt_param} or completion.", max_param,
                           code=TOO_LONG) from None
        except OptionError as exc:  # n_keep
            raise ApiError(400, str(exc), exc.param) from None
        return asked

    @staticmethod
    def stops(stop: str | list[str] | None) -> list[str]:
        """The request's stop strings, checked."""
        try:
            return stop_strings(stop)
        except ValueError as exc:
            raise ApiError(400, str(exc), "stop") from None
