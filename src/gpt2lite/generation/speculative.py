"""Speculative decoding: proposed tokens, checked all at once by the target model in one forward.

The proposals come from a small draft model, or from the text itself (prompt
lookup, as transformers' ``prompt_lookup_num_tokens``: the tokens that followed
the last 2 tokens the first time they occurred, else the last one; its proposal
distribution is one-hot, so the rule below is exact for it too).

Each round, every row has one token ``x`` that the target has not seen yet. The
draft feeds ``x`` and proposes ``d_1 .. d_k`` one at a time; the target feeds
``[x, d_1 .. d_k]`` at once and so gets its own distribution ``p_0 .. p_k`` at
every proposal. Proposal ``d_i`` is accepted with probability
``min(1, p_{i-1}(d_i) / q_{i-1}(d_i))`` (greedy: when it is the target's argmax);
at the first rejection a token is drawn from ``max(0, p - q)`` renormalised, and
if all ``k`` pass a bonus token is drawn from ``p_k``. This is the rule of Leviathan
et al. and Chen et al. (2023): every token is distributed exactly as the target
alone would draw it, and greedy output equals plain greedy output.

Both caches are then cut back to the accepted tokens (``truncate``), per row, so
rows that accepted different numbers of tokens go on in one batch.
"""

from __future__ import annotations

import torch

from gpt2lite.generation.options import GenerationOptions
from gpt2lite.generation.rules import TokenRules, check_finite
from gpt2lite.generation.sampling import filtered_logits
from gpt2lite.generation.session import DecodeSession
from gpt2lite.models.protocol import DecoderModel

__all__ = ["speculative_generate"]


def _distribution(logits: torch.Tensor, opts: GenerationOptions) -> torch.Tensor:
    """The probabilities tokens are drawn from: filtered softmax, or one-hot at the argmax when greedy."""
    if opts.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return filtered_logits(logits, opts).softmax(-1)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs`` ``(R, V)``."""
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.inference_mode()
def speculative_generate(
    target: DecoderModel,
    draft: DecoderModel | None,
    prompt: torch.Tensor,
    mask: torch.Tensor | None,
    opts: GenerationOptions,
    generator: torch.Generator | None,
    stats: dict[str, int] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Sequences ``(B, T + new)`` and finish reasons, with ``draft`` (None: prompt lookup) proposing for ``target``.

    ``stats``, if given, receives the counts of rounds, proposed and accepted tokens.
    """
    if draft is not None and opts.prompt_lookup_num_tokens:
        raise ValueError("give a draft model or prompt_lookup_num_tokens, not both")
    if draft is not None and draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({target.config.vocab_size}): speculative decoding needs the same tokenizer")
    rules = TokenRules(opts, target.config, prompt, mask, generator=generator)
    if rules.processors.active:
        raise ValueError("speculative decoding supports temperature, top_k, top_p, min_p, typical_p, epsilon and "
                         "eta; not penalties, biases, bans, min_new_tokens or logits_processor hooks")
    if opts.compile:
        raise ValueError("speculative decoding does not support compile")
    B, T = prompt.shape
    contexts = [c for c in (target.config.n_positions, draft and draft.config.n_positions) if c is not None]
    k = opts.num_draft_tokens if draft is not None else opts.prompt_lookup_num_tokens
    capacity = min([T + opts.max_new_tokens + k + 1, *contexts])
    proposer: _DraftModel | _PromptLookup = (
        _DraftModel(draft, prompt, mask, capacity, opts, rules.generator) if draft is not None
        else _PromptLookup(prompt, mask, rules, target.config.vocab_size))
    run = _Speculation(target, prompt, mask, rules, capacity, k)
    while not all(run.done):
        active = [r for r in range(B) if not run.done[r]]
        d, q, valid = proposer.propose(active, run.pending, run.budget(active))
        p = run.verify(active, d)
        accepted, new_token = _accept(p, q, d, valid, opts, rules.generator)
        proposer.advance(active, accepted.tolist(), d, run.pending)
        run.advance(active, d, accepted, new_token)
        if stats is not None:
            stats["rounds"] = stats.get("rounds", 0) + 1
            stats["proposed"] = stats.get("proposed", 0) + int(valid.sum())
            stats["accepted"] = stats.get("accepted", 0) + int(accepted.sum())
    return run.result()


class _Speculation:
    """The target's session and each row's place in it, round after round."""

    def __init__(self, target: DecoderModel, prompt: torch.Tensor, mask: torch.Tensor | None, rules: TokenRules,
                 capacity: int, k: int) -> None:
        B, T = prompt.shape
        self.prompt, self.rules, self.opts, self.k, self.capacity = prompt, rules, rules.options, k, capacity
        self.session = DecodeSession(target, B, capacity)
        if T > 1:
            self.session.feed(prompt[:, :-1], input_mask=None if mask is None else mask[:, :-1])
        self.filled = [T - 1] * B  # tokens each row holds in the target's cache
        self.pending = prompt[:, -1].clone()  # (B,) the token the target has not seen
        self.done = [self.opts.max_new_tokens == 0] * B

    def budget(self, active: list[int]) -> int:
        """How many tokens this round may propose: within the cache, and short of ``max_new_tokens``."""
        generated = max(self.rules.generated[r] for r in active)
        return max(0, min(self.k, self.capacity - 1 - max(self.filled[r] for r in active),
                          self.opts.max_new_tokens - generated - 1))

    def verify(self, active: list[int], d: torch.Tensor) -> torch.Tensor:
        """The target's distributions after the pending token and each proposal, ``(R, k+1, V)``."""
        rows = None if len(active) == len(self.done) else active  # finished rows are fed no more
        at = torch.tensor(active, device=self.prompt.device)
        p_logits = self.session.feed(torch.cat([self.pending[at][:, None], d], 1), rows=rows, last_only=False)
        check_finite(p_logits.float().amax(-1).amax(-1), max(self.rules.generated[r] for r in active))
        return _distribution(p_logits, self.opts)

    def advance(self, active: list[int], proposals: torch.Tensor, accepted: torch.Tensor,
                new_token: torch.Tensor) -> None:
        """Cut the cache back to what was accepted, and record the accepted tokens and the new one."""
        k = proposals.shape[1]
        n_acc = accepted.tolist()
        for j, r in enumerate(active):
            self.filled[r] += 1 + n_acc[j]
        self.session.truncate(active, [self.filled[r] for r in active])
        self.pending[torch.tensor(active, device=self.prompt.device)] = new_token
        # One column at a time, until each row ends: row j's tokens are made[j, : n_acc[j] + 1].
        made = torch.cat([proposals, new_token[:, None]], 1)  # (R, k + 1)
        made[torch.arange(len(active), device=made.device), accepted] = new_token
        for column in range(k + 1):
            going = [j for j, r in enumerate(active) if column <= n_acc[j] and not self.done[r]]
            if not going:
                break
            rows = [active[j] for j in going]
            self.rules.append(made[going, column], rows=rows)
            for r, end in zip(rows, self.rules.finished[rows].tolist(), strict=True):
                self.done[r] = end or self.rules.generated[r] == self.opts.max_new_tokens

    def result(self) -> tuple[torch.Tensor, list[str]]:
        """The prompts and new tokens ``(B, T + new)``, rows that ended early padded, and the finish reasons."""
        rules, T, device = self.rules, self.prompt.shape[1], self.prompt.device
        width = max(rules.generated)
        ended_at = torch.tensor(rules.generated, device=device)[:, None]
        new = torch.where(torch.arange(width, device=device) < ended_at, rules.tokens[:, T : T + width], rules.pad)
        reasons = ["stop" if f else "length" for f in rules.finished.tolist()]
        return torch.cat([self.prompt, new], 1), reasons


class _DraftModel:
    """Proposals from a draft model, one token at a time through a session of its own."""

    def __init__(self, draft: DecoderModel, prompt: torch.Tensor, mask: torch.Tensor | None, capacity: int,
                 opts: GenerationOptions, generator: torch.Generator | None) -> None:
        B, T = prompt.shape
        self.opts, self.generator = opts, generator
        self.session = DecodeSession(draft, B, capacity)
        if T > 1:
            self.session.feed(prompt[:, :-1], input_mask=None if mask is None else mask[:, :-1])
        self.filled = [T - 1] * B
        self.behind = [False] * B  # the draft also lacks the last proposal, which was accepted
        self.lagging = torch.zeros(B, dtype=torch.long, device=prompt.device)  # which token that is

    def propose(self, active: list[int], pending: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Proposals ``(R, k)``, the draft's distributions ``(R, k, V)`` and which proposals exist (all)."""
        rows = None if len(active) == len(self.behind) else active
        at = torch.tensor(active, device=pending.device)
        # The draft catches up (the last proposal it never fed, where all were accepted), then proposes.
        late = [r for r in active if self.behind[r]]
        if len(late) == len(active):  # all behind (always so at batch 1 when all were accepted): one feed
            q_logits = self.session.feed(torch.stack([self.lagging[at], pending[at]], 1), rows=rows)
        else:
            if late:
                self.session.feed(self.lagging[late][:, None], rows=late)
            q_logits = self.session.feed(pending[at][:, None], rows=rows)
        proposals, q = [], []
        for i in range(k):
            qi = _distribution(q_logits[:, -1], self.opts)
            proposals.append(qi.argmax(-1) if self.opts.greedy else _draw(qi, self.generator))
            q.append(qi)
            if i + 1 < k:
                q_logits = self.session.feed(proposals[-1][:, None], rows=rows)
        R, V = len(active), q_logits.shape[-1]
        d = torch.stack(proposals, 1) if proposals else torch.zeros(R, 0, dtype=torch.long, device=at.device)
        q_all = torch.stack(q, 1) if q else torch.zeros(R, 0, V, device=at.device)
        return d, q_all, torch.ones_like(d, dtype=torch.bool)

    def advance(self, active: list[int], accepted: list[int], d: torch.Tensor, pending: torch.Tensor) -> None:
        """Cut the draft's cache back: it fed ``pending`` and all proposals but the last."""
        k = d.shape[1]
        for j, r in enumerate(active):
            self.filled[r] += 1 + accepted[j]
            self.behind[r] = k > 0 and accepted[j] == k
        self.session.truncate(active, [self.filled[r] - self.behind[r] for r in active])
        if k:
            self.lagging[torch.tensor(active, device=d.device)] = d[:, -1]


class _PromptLookup:
    """Proposals copied from the text so far: what followed the last n-gram where it first occurred."""

    NGRAM = 2  # transformers' default max_matching_ngram_size

    def __init__(self, prompt: torch.Tensor, mask: torch.Tensor | None, rules: TokenRules, vocab: int) -> None:
        self.rules, self.vocab = rules, vocab
        rows = prompt.tolist() if mask is None else [[t for t, m in zip(r, k, strict=True) if m]
                                                     for r, k in zip(prompt.tolist(), mask.tolist(), strict=True)]
        self.prompts = rows

    def _lookup(self, tokens: list[int], k: int) -> list[int]:
        for n in range(min(self.NGRAM, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n):
                if tokens[start : start + n] == tail:
                    return tokens[start + n : start + n + k]
        return []

    def propose(self, active: list[int], pending: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Proposals ``(R, k')``, one-hot distributions and which of them exist (rows may have fewer)."""
        T = self.rules.prompt_length
        found = []
        for r in active:
            generated = self.rules.tokens[r, T : T + self.rules.generated[r]].tolist()
            found.append(self._lookup(self.prompts[r] + generated, k) if k else [])
        width = max(map(len, found), default=0)
        device = pending.device
        d = torch.tensor([f + [0] * (width - len(f)) for f in found], dtype=torch.long, device=device)
        d = d.view(len(active), width)
        valid = torch.arange(width, device=device)[None, :] < torch.tensor([len(f) for f in found], device=device)[:,
                                                                                                                 None]
        q = torch.nn.functional.one_hot(d, self.vocab).float() * valid[..., None]  # nothing where none was proposed
        return d, q, valid

    def advance(self, active: list[int], accepted: list[int], d: torch.Tensor, pending: torch.Tensor) -> None:
        """Nothing to keep: the next round looks at the text again."""


def _accept(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor, valid: torch.Tensor, opts: GenerationOptions,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """How many proposals ``d`` ``(R, k)`` each row accepts, and the token drawn after them ``(R,)``.

    ``q`` ``(R, k, V)`` are the proposals' distributions (zero where ``valid`` says
    there is no proposal: the next token then comes from ``p`` alone), ``p``
    ``(R, k+1, V)`` the target's.
    """
    R, k = d.shape
    index = torch.arange(R, device=d.device)
    if k:
        p_d = p[:, :-1].gather(2, d[..., None])[..., 0]
        q_d = q.gather(2, d[..., None])[..., 0]
        if opts.greedy:  # p is one-hot at the target's argmax
            accept = p_d > 0
        else:
            u = torch.rand(d.shape, generator=generator, device=d.device)
            accept = u < p_d / q_d
        n_acc = (accept & valid).long().cumprod(1).sum(1)  # (R,) proposals accepted before the first rejection
    else:
        n_acc = torch.zeros(R, dtype=torch.long, device=d.device)
    p_next = p[index, n_acc]  # (R, V): where the next token comes from
    if k and not opts.greedy:  # after a rejection: the residual max(0, p - q), renormalised
        rejected = n_acc < k
        residual = (p_next - q[index, n_acc.clamp(max=k - 1)]).clamp(min=0)
        mass = residual.sum(-1, keepdim=True)
        use = rejected[:, None] & (mass > 0)
        p_next = torch.where(use, residual / mass.clamp(min=1e-30), p_next)
    return n_acc, p_next.argmax(-1) if opts.greedy else _draw(p_next, generator)
