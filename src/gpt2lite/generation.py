"""Token-level generation: a KV-cached decode loop with sampling, stopping and batching."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from gpt2lite.model import GPT2, KVCache, positions_from_mask
from gpt2lite.sampling import SamplingConfig, choose_next

__all__ = ["GenerationOptions", "generate", "iter_tokens"]


@dataclass(frozen=True)
class GenerationOptions:
    """The options of ``generate`` and ``iter_tokens``; every value is checked when built.

    ``temperature=0`` is greedy decoding; ``top_k=0``, ``top_p=1`` and ``min_p=0``
    disable those filters. ``eos_token_id=None`` never stops at an end token;
    ``stop`` holds token sequences that end a row (the sequence is kept in the
    output, like the end token). Finished rows are padded with ``pad_token_id``
    (default: the end token, else 50256). ``seed`` makes sampling reproducible.
    ``compile=True`` decodes with a fixed-shape step under ``torch.compile``
    (CUDA graphs on a GPU): the first call compiles, later calls with the same
    batch size reuse it and a full-context cache that the model keeps.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    stop: tuple[tuple[int, ...], ...] = ()
    seed: int | None = None
    num_return_sequences: int = 1
    compile: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        n = self.num_return_sequences
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_return_sequences must be an int >= 1, got {n!r}")
        for name in ("eos_token_id", "pad_token_id", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be None or an int >= 0, got {value!r}")
        stop = self.stop
        if isinstance(stop, (str, bytes)) or not isinstance(stop, Sequence):
            raise ValueError(f"stop must be a list of token-id sequences, got {stop!r}")
        if stop and all(isinstance(t, int) for t in stop):
            stop = (tuple(stop),)  # a single sequence given flat
        try:
            stop = tuple(tuple(int(t) for t in seq) for seq in stop)
        except TypeError:
            raise ValueError(f"stop must be a list of token-id sequences, got {self.stop!r}") from None
        if any(len(seq) == 0 for seq in stop):
            raise ValueError("stop sequences must not be empty")
        object.__setattr__(self, "stop", stop)
        self.sampling  # noqa: B018  (validates the sampling options)

    @property
    def sampling(self) -> SamplingConfig:
        """The options that pick tokens."""
        return SamplingConfig(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
        )

    @classmethod
    def from_kwargs(cls, where: str, **options: object) -> GenerationOptions:
        """Build from keyword options, naming any unknown one."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"{where}() got unknown option(s) {unknown}; known options: {sorted(known)}")
        return cls(**options)  # type: ignore[arg-type]


def generate(
    model: GPT2,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    *,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **options: object,
) -> torch.Tensor:
    """Continue each prompt; returns ``(batch * num_return_sequences, time + new)`` token ids.

    ``input_ids`` is ``(batch, time)`` (a list of ids is one prompt);
    ``attention_mask`` marks left padding with 0. Options are those of
    ``GenerationOptions``. The result holds the prompt followed by the new
    tokens; it ends at the step where every row had finished, and rows that
    finished earlier are padded with the end token.
    """
    opts = GenerationOptions.from_kwargs("generate", **options)
    prompt, mask = _prepare_prompt(model, input_ids, attention_mask, opts)
    steps = list(_decode(model, prompt, mask, opts, generator))
    if not steps:
        return prompt
    return torch.cat([prompt, torch.stack(steps, dim=1)], dim=1)


def iter_tokens(
    model: GPT2,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    *,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **options: object,
) -> Iterator[torch.Tensor]:
    """Like ``generate``, but yield the new tokens of every row, ``(batch,)``, one step at a time."""
    opts = GenerationOptions.from_kwargs("iter_tokens", **options)
    prompt, mask = _prepare_prompt(model, input_ids, attention_mask, opts)
    return _decode(model, prompt, mask, opts, generator)


def _prepare_prompt(
    model: GPT2,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None,
    opts: GenerationOptions,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check the prompt against the model and options; return it (and its mask, if padded) on the model's device."""
    config = model.config
    if not isinstance(input_ids, torch.Tensor):
        try:
            input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                "input_ids must be a list of ids or equal-length lists of ids (use attention_mask for "
                f"left padding, or the text API for strings): {exc}"
            ) from None
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(f"input_ids must be integer token ids of shape (batch, time), got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if B == 0:
        raise ValueError("input_ids holds an empty batch")
    if T == 0:
        raise ValueError("input_ids holds no tokens; start from [[50256]] (<|endoftext|>) for unconditional text")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} in input_ids is outside the vocabulary "
                         f"(0..{config.vocab_size - 1})")
    for name in ("eos_token_id", "pad_token_id"):
        value = getattr(opts, name)
        if value is not None and value >= config.vocab_size:
            raise ValueError(f"{name} {value} is outside the vocabulary (0..{config.vocab_size - 1})")
    if any(t >= config.vocab_size for seq in opts.stop for t in seq):
        raise ValueError(f"a stop sequence holds an id outside the vocabulary (0..{config.vocab_size - 1})")
    if T + opts.max_new_tokens > config.n_positions:
        raise ValueError(
            f"prompt of {T} tokens + max_new_tokens={opts.max_new_tokens} exceeds the model's context of "
            f"{config.n_positions} positions; shorten the prompt or lower max_new_tokens"
        )

    device = model.device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must have the shape of input_ids {(B, T)}, "
                             f"got {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        if ((attention_mask != 0) & (attention_mask != 1)).any():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
            raise ValueError("attention_mask has padding after a token: pad prompts on the left for generation")
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("attention_mask has a row with no tokens")
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: take the faster unmasked path
    n = opts.num_return_sequences
    if n > 1:
        input_ids = input_ids.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0) if attention_mask is not None else None
    return input_ids, attention_mask


def _decode(
    model: GPT2,
    prompt: torch.Tensor,
    mask: torch.Tensor | None,
    opts: GenerationOptions,
    generator: torch.Generator | None,
) -> Iterator[torch.Tensor]:
    """The decode loop: one forward over the prompt, then one token per step into a preallocated cache.

    Each step runs under its own ``inference_mode`` so that the caller's code
    between yields runs in the grad mode it chose.
    """
    if opts.max_new_tokens == 0:
        return  # nothing to generate, so no forward pass either
    B, T = prompt.shape
    total = T + opts.max_new_tokens
    device = prompt.device
    sampling = opts.sampling
    if generator is None and opts.seed is not None:
        generator = torch.Generator(device=device).manual_seed(opts.seed)
    pad = opts.pad_token_id if opts.pad_token_id is not None else (
        opts.eos_token_id if opts.eos_token_id is not None else 50256)
    stops = [torch.tensor(seq, device=device) for seq in opts.stop]

    # Made outside inference mode: its buffers outlive this call, in later calls' graphs.
    decoder = _StaticDecoder.for_model(model, B) if opts.compile else None
    with torch.inference_mode():
        if decoder is not None:
            cache = decoder.cache
            cache.length = 0
        else:
            cache = KVCache(model.config, B, total, device=device, dtype=model.dtype)
        # Every token so far, for the repetition penalty and stop sequences; padding is
        # replaced by the row's last prompt token so that it is never penalised.
        tokens = torch.empty(B, total, dtype=torch.long, device=device)
        tokens[:, :T] = prompt if mask is None else torch.where(mask.bool(), prompt, prompt[:, -1:])
        full_mask = None
        if mask is not None:
            full_mask = torch.ones(B, total, dtype=torch.long, device=device)
            full_mask[:, :T] = mask
            position = mask.sum(dim=1, keepdim=True)  # (B, 1): next position of each row
            logits = model._forward(prompt, full_mask[:, :T], positions_from_mask(mask), cache, True)
        else:
            position = None
            logits = model._forward(prompt, None, None, cache, True)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        if decoder is not None:
            decoder.start(mask, T)

    for step in range(opts.max_new_tokens):
        with torch.inference_mode():
            cur = T + step
            history = tokens[:, :cur] if sampling.repetition_penalty != 1.0 else None
            next_tokens = choose_next(logits[:, -1], sampling, history=history, generator=generator)
            next_tokens = torch.where(finished, pad, next_tokens)
            tokens[:, cur] = next_tokens
            if opts.eos_token_id is not None:
                finished |= next_tokens == opts.eos_token_id
            for seq in stops:
                n = seq.numel()
                if step + 1 >= n:
                    finished |= (tokens[:, cur + 1 - n : cur + 1] == seq).all(dim=1)
            done = step + 1 == opts.max_new_tokens or bool(finished.all())
            out = next_tokens.clone()
        yield out  # before the next forward, so a stream shows each token as soon as it is chosen
        if done:
            return
        with torch.inference_mode():
            if decoder is not None:
                logits = decoder.step(next_tokens, position + step if position is not None else cur)
            elif full_mask is not None:
                logits = model._forward(next_tokens[:, None], full_mask[:, : cur + 1], position + step, cache, True)
            else:
                logits = model._forward(next_tokens[:, None], None, None, cache, True)


class _StaticDecoder(torch.nn.Module):
    """The compiled decode step with its fixed-shape inputs, kept on the model per batch size.

    Everything the captured graph touches lives at a fixed address: the cache
    covers the whole context and is held as buffers of this module (which a CUDA
    graph may update in place), and each step's inputs are copied into buffers.
    """

    def __init__(self, model: GPT2, batch_size: int) -> None:
        super().__init__()
        config, device = model.config, model.device
        shape = (config.n_layer, batch_size, config.n_head, config.n_positions, config.head_dim)
        self.model = model
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=model.dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=model.dtype), persistent=False)
        self.cache = KVCache.wrap(self.k, self.v)  # the same tensors, for the eager prompt pass
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.key_mask = torch.zeros(batch_size, config.n_positions, dtype=torch.bool, device=device)
        mode = "reduce-overhead" if device.type == "cuda" else None
        # Set past nn.Module's attribute hook: the compiled wrapper holds this module, and
        # registering it as a child would make the module its own descendant.
        object.__setattr__(self, "compiled", torch.compile(self, mode=mode, fullgraph=True))

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.model.decode_step(tokens, positions, slot, key_mask, KVCache.wrap(self.k, self.v))

    @classmethod
    def for_model(cls, model: GPT2, batch_size: int) -> _StaticDecoder:
        # Kept outside the module tree (a plain dict attribute) so the model's state_dict is unchanged.
        decoders = model.__dict__.setdefault("_static_decoders", {})
        key = (batch_size, model.dtype, model.device)
        if key not in decoders:
            decoders[key] = cls(model, batch_size)
        return decoders[key]

    def start(self, prompt_mask: torch.Tensor | None, length: int) -> None:
        """Make the first ``length`` slots, filled by the prompt, visible (less its padding)."""
        self.key_mask.zero_()
        self.key_mask[:, :length] = True if prompt_mask is None else prompt_mask.bool()

    def step(self, tokens: torch.Tensor, positions: torch.Tensor | int) -> torch.Tensor:
        """Feed ``tokens`` ``(B,)`` at the next cache slot; return logits ``(B, 1, vocab)``."""
        slot = self.cache.length
        self.key_mask[:, slot] = True
        self.tokens.copy_(tokens[:, None])
        if isinstance(positions, torch.Tensor):
            self.positions.copy_(positions)
        else:
            self.positions.fill_(positions)
        self.slot.fill_(slot)
        logits = self.compiled(self.tokens, self.positions, self.slot, self.key_mask)
        self.cache.length = slot + 1
        # CUDA graphs reuse their output buffer on the next replay: hand out a copy.
        return logits[:, None].clone()
