"""The text-level API: a model and its tokenizer, strings in and strings out."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from gpt2lite.errors import CheckpointError
from gpt2lite.generation.batching import left_pad
from gpt2lite.generation.context import check_text_fits
from gpt2lite.generation.loop import generate, iter_steps
from gpt2lite.generation.options import GenerationKwargs, GenerationOptions
from gpt2lite.loading import load_chat_template, load_generation_defaults, load_model, load_tokenizer
from gpt2lite.models.protocol import DecoderModel
from gpt2lite.text.assembler import Completion, TextAssembler
from gpt2lite.text.chat import ChatTemplate
from gpt2lite.text.scoring import perplexity, token_logprobs
from gpt2lite.tokenizers.protocol import TokenizerProtocol
from gpt2lite.transforms.native import KernelRoute
from gpt2lite.transforms.quantize import QuantizeMode

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["TextGenerator"]


class TextGenerator:
    """GPT-2 with its tokenizer: call it with a string (or a list of them) and get the continuation.

    Example (the README runs it)::

        gen = TextGenerator.from_pretrained("gpt2")
        gen("The meaning of life is", max_new_tokens=20, seed=0)
    """

    def __init__(self, model: DecoderModel, tokenizer: TokenizerProtocol, *, chat_template: str | None = None,
                 name: str | None = None, defaults: GenerationOptions | None = None) -> None:
        """Pair a loaded model with the tokenizer its vocabulary was built with.

        ``chat_template`` is the model's Jinja chat template (None: DialoGPT's
        convention, see ``gpt2lite.text.chat``); ``name`` is where it came from;
        ``defaults`` are the options of a call given no options object (keywords still apply on top).
        """
        if tokenizer.n_vocab > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.n_vocab} tokens but the model only {model.config.vocab_size}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.name = name
        self.defaults = defaults if defaults is not None else GenerationOptions()
        self._chat: ChatTemplate | None = None
        self._chat_error: str | None = None  # why the model's chat template could not be read

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
        quantize: QuantizeMode | None = None,
        adapter: str | os.PathLike[str] | None = None,
        prepack: bool | None = None,
        cjk_spaces: bool = False,
        kernels: KernelRoute = "native",
    ) -> TextGenerator:
        """Load model and tokenizer from a hub id or local path (see ``gpt2lite.load_model``).

        ``quantize="int8"`` loads a GPT-2 with int8 weights (faster, inference only; ``"int4"``: smaller).
        ``adapter`` puts a LoRA adapter (PEFT format) on it, merged into the weights;
        a directory that holds only an adapter loads the base model it names.
        ``prepack`` chooses float32 CPU product kernels as ``load_model`` does: by
        default the one-row kernel measured fastest on this CPU; ``True`` adds
        oneDNN-reordered weights for faster batches (twice the weight memory);
        ``False`` keeps ``F.linear`` (see ``gpt2lite.transforms.packed``). ``kernels="torch"``
        keeps PyTorch's routes, without gpt2lite's own CPU kernels (``gpt2lite.transforms.native``).

        A directory saved from a ``RecurrentLM`` (RNN, LSTM, GRU) loads that model instead,
        and one with a character vocabulary (``CharTokenizer``) uses it; another vocabulary
        (``tokenizer.json``, a BERT ``vocab.txt``) goes through Hugging Face's ``tokenizers``:
        its text has no spaces between Chinese characters unless ``cjk_spaces=True``
        (transformers' ``BertTokenizer.decode`` writes one between every two).

        Where no tokenizer files are found beside a model with GPT-2's 50257-token
        vocabulary, the GPT-2 tokenizer bundled with the package is used. The sampling
        settings of a ``generation_config.json`` become ``defaults``, as transformers uses them.
        """
        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        model = load_model(name_or_path, device=device, dtype=dtype, quantize=quantize, adapter=adapter,
                           merge_adapter=True, prepack=prepack, kernels=kernels, **hub)
        tokenizer = load_tokenizer(name_or_path, model.config.vocab_size, cjk_spaces=cjk_spaces, **hub)
        defaults = load_generation_defaults(name_or_path, **hub)
        try:
            template, error = load_chat_template(name_or_path, **hub), None
        except CheckpointError as exc:
            template, error = None, str(exc)  # a broken template stops chat only, not plain generation
        generator = cls(model, tokenizer, chat_template=template, name=str(name_or_path), defaults=defaults)
        generator._chat_error = error
        return generator

    def __call__(
        self,
        prompt: str | Sequence[str],
        options: GenerationOptions | None = None,
        *,
        stop: str | Sequence[str] | None = None,
        bad_words: Sequence[str] | None = None,
        draft_model: DecoderModel | None = None,
        generator: torch.Generator | None = None,
        **overrides: Unpack[GenerationKwargs],
    ) -> str | list[str] | list[list[str]]:
        """Continue a prompt (or a batch of prompts); the result holds the new text only.

        Options are those of ``gpt2lite.GenerationOptions`` (``max_new_tokens``,
        ``temperature``, ``top_k``, ``top_p``, ``seed``, ``num_beams``, ...), as an
        object or as keywords. Text ends before the first of the ``stop`` strings
        or at the end token (the tokenizer's ``<|endoftext|>``). ``bad_words`` are
        never generated (with or without a leading space). With
        ``num_return_sequences=n > 1`` each prompt gets a list of ``n`` texts.
        """
        opts = self._options(options, overrides, bad_words, "TextGenerator")
        single = isinstance(prompt, str)
        completions = self.complete(prompt, opts, stop=stop, draft_model=draft_model, generator=generator)
        texts = [c.text for c in completions]
        n = opts.num_return_sequences
        if n > 1:
            grouped = [texts[i : i + n] for i in range(0, len(texts), n)]
            return grouped[0] if single else grouped
        return texts[0] if single else texts

    def complete(
        self,
        prompt: str | Sequence[str],
        options: GenerationOptions | None = None,
        *,
        stop: str | Sequence[str] | None = None,
        bad_words: Sequence[str] | None = None,
        draft_model: DecoderModel | None = None,
        generator: torch.Generator | None = None,
        allowed_special: Literal["all"] | Sequence[str] = (),
        **overrides: Unpack[GenerationKwargs],
    ) -> list[Completion]:
        """Like calling the generator, but return a ``Completion`` per text: tokens, log-probabilities, finish reason.

        ``top_logprobs=k`` adds the ``k`` most likely tokens at each step and
        ``prompt_logprobs=True`` the log-probability of each prompt token.
        Special-token strings (``<|endoftext|>``) in a prompt are ordinary text
        unless ``allowed_special`` names them (``"all"``: every one).
        """
        opts = self._options(options, overrides, bad_words, "complete")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompt must be a str or a non-empty list of str")
        rows = self._rows(prompts, stop, opts)
        ids, mask = self._encode(prompts, opts, allowed_special)
        prompt_lp = None  # (completions, T) with prompt_logprobs; NaN where there is no value
        if opts.num_beams > 1 or draft_model is not None or opts.prompt_lookup_num_tokens:
            out = generate(self.model, ids, opts, attention_mask=mask, generator=generator, return_dict=True,
                           draft_model=draft_model)
            prompt_lp = out.prompt_logprobs
            new = out.sequences[:, ids.shape[1] :].tolist()
            for step in range(len(new[0])):
                for r, row in enumerate(rows):
                    row.add(new[r][step], float(out.logprobs[r, step]), _top(self.tokenizer, out, r, step))
        else:
            for step in iter_steps(self.model, ids, opts, attention_mask=mask, generator=generator,
                                   tokenizer=self.tokenizer):
                if step.prompt_logprobs is not None:
                    prompt_lp = step.prompt_logprobs
                logprobs = step.logprobs.tolist()
                for r, (row, token) in enumerate(zip(rows, step.tokens.tolist(), strict=True)):
                    row.add(token, logprobs[r], _top(self.tokenizer, step, r))
                if all(row.done for row in rows):
                    break
        completions = [row.result() for row in rows]
        if prompt_lp is not None:
            per_prompt = len(rows) // len(prompts)
            for i, c in enumerate(completions):
                row = prompt_lp[i][mask[i // per_prompt].bool()].tolist()  # the prompt's own tokens
                c.prompt_logprobs = [None if v != v else v for v in row]
        return completions

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        options: GenerationOptions | None = None,
        *,
        stop: str | Sequence[str] | None = None,
        bad_words: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
        **overrides: Unpack[GenerationKwargs],
    ) -> str:
        """The model's reply to a conversation, rendered with its chat template (see ``chat_prompt``). Example::

            gen.chat([{"role": "user", "content": "Does money buy happiness?"}], max_new_tokens=40)
        """
        prompt = self.chat_prompt(messages)  # the template's special tokens are meant as such
        return self.complete(prompt, options, stop=stop, bad_words=bad_words, generator=generator,
                             allowed_special="all", **overrides)[0].text

    def chat_prompt(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> str:
        """The prompt text for ``messages`` (``[{"role": "user", "content": "..."}, ...]``), ready to continue.

        The model's chat template renders it; without one, each turn's text is
        followed by the end token (DialoGPT's convention).
        """
        return self._template().render(messages, tools=tools)

    def check_chat_template(self) -> None:
        """Compile the chat template and render one message, so that a broken or runaway template shows at load."""
        self._template().check()

    def _template(self) -> ChatTemplate:
        if self._chat_error is not None:
            raise CheckpointError(self._chat_error)
        if self._chat is None:
            self._chat = ChatTemplate.for_tokenizer(self.chat_template, self.tokenizer)
        return self._chat

    def stream(
        self,
        prompt: str,
        options: GenerationOptions | None = None,
        *,
        stop: str | Sequence[str] | None = None,
        bad_words: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
        **overrides: Unpack[GenerationKwargs],
    ) -> Iterator[str]:
        """Yield the continuation of one prompt piece by piece, as it is generated.

        Pieces never split a character, and text that might begin a stop string is
        held back until it is clear that it does not.
        """
        opts = self._options(options, overrides, bad_words, "stream")
        if not isinstance(prompt, str):
            raise TypeError("stream() takes one prompt str; call the generator itself for a batch")
        if opts.num_return_sequences != 1 or opts.num_beams != 1:
            raise ValueError("stream() makes one sequence as it goes: num_return_sequences and num_beams must be 1")
        (row,) = self._rows([prompt], stop, opts)
        ids, mask = self._encode([prompt], opts)
        # Built here, not inside the generator, so that bad options fail at the call.
        steps = iter_steps(self.model, ids, opts, attention_mask=mask, generator=generator, tokenizer=self.tokenizer)
        return self._stream(row, steps)

    @staticmethod
    def _stream(row: TextAssembler, steps: Iterator[Any]) -> Iterator[str]:
        for step in steps:
            row.add(int(step.tokens[0]))
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
        return perplexity(
            self.model, self.tokenizer.encode(text), max_length=max_length, stride=stride, progress=progress
        )

    def logprobs(self, prompt: str, continuation: str) -> list[tuple[str, float]]:
        """Each token of ``continuation`` with its log-probability after ``prompt`` (encoded separately).

        An empty prompt means the start of a document (``<|endoftext|>``).
        """
        prompt_ids = self.tokenizer.encode(prompt) or [self.tokenizer.eot_token]
        ids = self.tokenizer.encode(continuation)
        scores = token_logprobs(self.model, prompt_ids, ids)
        return [(self.tokenizer.decode([i]), float(lp)) for i, lp in zip(ids, scores, strict=True)]

    def _options(
        self, options: GenerationOptions | None, overrides: dict[str, Any], bad_words: Sequence[str] | None,
        where: str,
    ) -> GenerationOptions:
        """``text_options`` of the options object (else ``defaults``) with keyword ``overrides`` applied."""
        base = options if options is not None else self.defaults
        return self.text_options(GenerationOptions.build(base, overrides, where), bad_words)

    def text_options(self, opts: GenerationOptions, bad_words: Sequence[str] | None = None) -> GenerationOptions:
        """``opts`` as the text API (and the server) decode with them.

        The end token defaults to the tokenizer's, ``bad_words`` become token ids
        (with and without a leading space), and ids the tokenizer cannot decode
        (the padding rows of a vocabulary padded to 50304) are never chosen.
        """
        changes: dict[str, Any] = {}
        if opts.eos_token_id is None:
            changes["eos_token_id"] = self.tokenizer.eot_token
        banned = list(opts.bad_words_ids)
        if bad_words:
            if isinstance(bad_words, str) or not all(isinstance(w, str) and w for w in bad_words):
                raise ValueError("bad_words must be a list of non-empty str")
            banned += sorted({tuple(self.tokenizer.encode(v)) for w in bad_words for v in (w, " " + w.lstrip(" "))})
        banned += [(i,) for i in range(self.tokenizer.n_vocab, self.model.config.vocab_size)]
        if len(banned) > len(opts.bad_words_ids):
            changes["bad_words_ids"] = tuple(banned)
        return opts.replace(**changes) if changes else opts

    def _rows(
        self, prompts: list[str], stop: str | Sequence[str] | None, opts: GenerationOptions
    ) -> list[TextAssembler]:
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError("stop must be a non-empty str or a list of non-empty str")
        eos = None if opts.ignore_eos else opts.eos_token_id
        n = opts.num_return_sequences
        # Text leaves special tokens out, as transformers' text-generation pipeline does ([SEP], [UNK]).
        return [TextAssembler(self.tokenizer, stops, eos, skip_special=True) for _ in range(len(prompts) * n)]

    def _encode(self, prompts: list[str], opts: GenerationOptions,
                allowed_special: Literal["all"] | Sequence[str] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and left-pad the prompts, refusing one that cannot fit before encoding it."""
        eot = self.tokenizer.eot_token
        if opts.truncate_prompt == "error":
            for i, p in enumerate(prompts):
                check_text_fits(len(p), self.model.config.n_positions, self.tokenizer.max_token_bytes,
                                max_new_tokens=opts.max_new_tokens, context_shift=opts.context_shift,
                                what=f"prompt {i}")
        # An empty prompt starts from <|endoftext|>, as GPT-2's unconditional samples do.
        encode = self.tokenizer.encode
        return left_pad([encode(p, allowed_special=allowed_special) or [eot] for p in prompts], eot)


def _top(tokenizer: TokenizerProtocol, step: Any, row: int, index: int | None = None) -> dict[str, float]:
    """The top alternatives of one row at one step, as {token text: log-probability}."""
    if step.top_ids is None:
        return {}
    ids, values = step.top_ids[row], step.top_logprobs[row]
    if index is not None:
        ids, values = ids[index], values[index]
    return {tokenizer.decode([i]): v for i, v in zip(ids.tolist(), values.tolist(), strict=True)}
