"""The text-level API: a model and its tokenizer, strings in and strings out."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from gpt2lite.errors import ModelNotFoundError
from gpt2lite.generation.engine import iter_tokens, left_pad
from gpt2lite.generation.options import GenerationOptions
from gpt2lite.hub import HUB_ALIASES
from gpt2lite.models.gpt2 import GPT2
from gpt2lite.tokenizer import Tokenizer

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from gpt2lite.generation.options import GenerationKwargs

__all__ = ["TextGenerator"]


class TextGenerator:
    """GPT-2 with its tokenizer: call it with a string (or a list of them) and get the continuation.

    Example (the README runs it)::

        gen = TextGenerator.from_pretrained("gpt2")
        gen("The meaning of life is", max_new_tokens=20, seed=0)
    """

    def __init__(self, model: GPT2, tokenizer: Tokenizer) -> None:
        """Pair a loaded model with the tokenizer its vocabulary was built with."""
        if tokenizer.n_vocab > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.n_vocab} tokens but the model only {model.config.vocab_size}"
            )
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str] = "gpt2",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
    ) -> TextGenerator:
        """Load model and tokenizer from a hub id or local path (see ``GPT2.from_pretrained``).

        Where no tokenizer files are found beside a model with GPT-2's 50257-token
        vocabulary, the GPT-2 tokenizer bundled with the package is used.
        """
        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        model = GPT2.from_pretrained(name_or_path, device=device, dtype=dtype, **hub)
        gpt2_vocab = model.config.vocab_size == 50257
        if gpt2_vocab and (str(name_or_path) in HUB_ALIASES or os.path.isfile(name_or_path)):
            tokenizer = Tokenizer.gpt2()  # the published GPT-2 models all use these exact files
        else:
            try:
                tokenizer = Tokenizer.from_pretrained(name_or_path, **hub)
            except ModelNotFoundError:
                if not gpt2_vocab:
                    raise
                tokenizer = Tokenizer.gpt2()
        return cls(model, tokenizer)

    def __call__(
        self,
        prompt: str | Sequence[str],
        options: GenerationOptions | None = None,
        *,
        stop: str | Sequence[str] | None = None,
        generator: torch.Generator | None = None,
        **overrides: Unpack[GenerationKwargs],
    ) -> str | list[str] | list[list[str]]:
        """Continue a prompt (or a batch of prompts); the result holds the new text only.

        Options are those of ``gpt2lite.GenerationOptions`` (``max_new_tokens``,
        ``temperature``, ``top_k``, ``top_p``, ``seed``, ...), as an object or as
        keywords. Text ends before the first of the ``stop`` strings or at the
        end token (the tokenizer's ``<|endoftext|>``). With
        ``num_return_sequences=n > 1`` each prompt gets a list of ``n`` texts.
        """
        opts = GenerationOptions.build(options, overrides, "TextGenerator")
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompt must be a str or a non-empty list of str")
        completions = self._run(prompts, stop, generator, opts)
        texts = [c.text for c in completions]
        n = opts.num_return_sequences
        if n > 1:
            grouped = [texts[i : i + n] for i in range(0, len(texts), n)]
            return grouped[0] if single else grouped
        return texts[0] if single else texts

    def stream(
        self,
        prompt: str,
        options: GenerationOptions | None = None,
        *,
        stop: str | Sequence[str] | None = None,
        generator: torch.Generator | None = None,
        **overrides: Unpack[GenerationKwargs],
    ) -> Iterator[str]:
        """Yield the continuation of one prompt piece by piece, as it is generated.

        Pieces never split a character, and text that might begin a stop string is
        held back until it is clear that it does not.
        """
        opts = GenerationOptions.build(options, overrides, "stream")
        if not isinstance(prompt, str):
            raise TypeError("stream() takes one prompt str; call the generator itself for a batch")
        if opts.num_return_sequences != 1:
            raise ValueError("stream() makes one sequence; num_return_sequences must be 1")
        (row,) = self._prepare([prompt], stop, 1, opts)
        # Built here, not inside the generator, so that bad options fail at the call.
        steps = self._steps([prompt], generator, opts)
        return self._stream(row, steps)

    @staticmethod
    def _stream(row: _Completion, steps: Iterator[torch.Tensor]) -> Iterator[str]:
        for step in steps:
            row.add(int(step[0]))
            piece = row.take()
            if piece:
                yield piece
            if row.done:
                return
        row.finish()
        piece = row.take()
        if piece:
            yield piece

    def perplexity(
        self, text: str, *, max_length: int | None = None, stride: int | None = None, progress: bool = False
    ) -> float:
        """Perplexity of ``text`` (sliding windows; see ``gpt2lite.perplexity``)."""
        from gpt2lite.scoring import perplexity

        return perplexity(
            self.model, self.tokenizer.encode(text), max_length=max_length, stride=stride, progress=progress
        )

    def logprobs(self, prompt: str, continuation: str) -> list[tuple[str, float]]:
        """Each token of ``continuation`` with its log-probability after ``prompt`` (encoded separately).

        An empty prompt means the start of a document (``<|endoftext|>``).
        """
        from gpt2lite.scoring import token_logprobs

        prompt_ids = self.tokenizer.encode(prompt) or [self.tokenizer.eot_token]
        ids = self.tokenizer.encode(continuation)
        scores = token_logprobs(self.model, prompt_ids, ids)
        return [(self.tokenizer.decode([i]), float(lp)) for i, lp in zip(ids, scores, strict=True)]

    def _run(
        self, prompts: list[str], stop: str | Sequence[str] | None, generator: torch.Generator | None,
        opts: GenerationOptions,
    ) -> list[_Completion]:
        completions = self._prepare(prompts, stop, opts.num_return_sequences, opts)
        for step in self._steps(prompts, generator, opts):
            for completion, token in zip(completions, step.tolist(), strict=True):
                completion.add(token)
            if all(c.done for c in completions):
                break
        for completion in completions:
            completion.finish()
        return completions

    def _prepare(
        self, prompts: list[str], stop: str | Sequence[str] | None, n: int, opts: GenerationOptions
    ) -> list[_Completion]:
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError("stop must be a non-empty str or a list of non-empty str")
        eos = None if opts.ignore_eos else self._eos(opts)
        return [_Completion(self.tokenizer, stops, eos) for _ in range(len(prompts) * n)]

    def _eos(self, opts: GenerationOptions) -> int:
        return opts.eos_token_id if opts.eos_token_id is not None else self.tokenizer.eot_token

    def _steps(
        self, prompts: list[str], generator: torch.Generator | None, opts: GenerationOptions
    ) -> Iterator[torch.Tensor]:
        """Encode and left-pad the prompts, then yield each step's new tokens."""
        eot = self.tokenizer.eot_token
        context = self.model.config.n_positions
        # Every token holds at most max_token_bytes bytes (so characters): refuse a prompt that
        # cannot fit before spending time and memory encoding it.
        limit = (context - opts.max_new_tokens) * self.tokenizer.max_token_bytes
        for i, p in enumerate(prompts):
            if len(p) > limit:
                raise ValueError(
                    f"prompt {i} has {len(p)} characters: more tokens than fit in the model's context of {context} "
                    f"positions with max_new_tokens={opts.max_new_tokens}; shorten it"
                )
        # An empty prompt starts from <|endoftext|>, as GPT-2's unconditional samples do.
        ids, mask = left_pad([self.tokenizer.encode(p) or [eot] for p in prompts], eot)
        opts = opts.replace(eos_token_id=self._eos(opts))
        return iter_tokens(self.model, ids, opts, attention_mask=mask, generator=generator)


class _Completion:
    """The text of one row as tokens arrive: decoded at character boundaries, cut at a stop string."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], eos: int | None) -> None:
        self.decoder = tokenizer.stream_decoder()
        self.stops = stops
        self.hold = max(map(len, stops), default=1) - 1  # characters that could start a stop string
        self.eos = eos
        self.text = ""
        self.taken = 0  # text[:taken] was handed out by take()
        self.done = False

    def add(self, token: int) -> None:
        if self.done:
            return
        if token == self.eos:
            self.finish()
            return
        self._append(self.decoder.add(token))

    def finish(self) -> None:
        if not self.done:
            self._append(self.decoder.flush())
            self.done = True

    def take(self) -> str:
        """The text that is now certain and not yet taken."""
        end = len(self.text) if self.done else max(self.taken, len(self.text) - self.hold)
        piece = self.text[self.taken : end]
        self.taken = end
        return piece

    def _append(self, piece: str) -> None:
        if not piece:
            return
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.taken = min(self.taken, len(self.text))
            self.done = True
