"""Speculative decoding: a small draft model proposes tokens, the target model checks them all in one forward.

Each round, every row has one token ``x`` that neither model has seen yet. The
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
    draft: DecoderModel,
    prompt: torch.Tensor,
    mask: torch.Tensor | None,
    opts: GenerationOptions,
    generator: torch.Generator | None,
    stats: dict[str, int] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Sequences ``(B, T + new)`` and finish reasons, decoded with ``draft`` proposing for ``target``.

    ``stats``, if given, receives the counts of rounds, proposed and accepted tokens.
    """
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                         f"({target.config.vocab_size}): speculative decoding needs the same tokenizer")
    rules = TokenRules(opts, target.config, prompt, mask, generator=generator)
    if rules.processors.active:
        raise ValueError("speculative decoding supports temperature, top_k, top_p and min_p; not penalties, "
                         "biases, bans, min_new_tokens or logits_processor hooks")
    if opts.compile:
        raise ValueError("speculative decoding does not support compile")
    run = _Speculation(target, draft, prompt, mask, rules)
    while not all(run.done):
        active = [r for r in range(prompt.shape[0]) if not run.done[r]]
        proposals, q, p = run.propose(active)
        accepted, new_token = _accept(p, q, proposals, opts, rules.generator)
        run.advance(active, proposals, accepted, new_token)
        if stats is not None:
            stats["rounds"] = stats.get("rounds", 0) + 1
            stats["proposed"] = stats.get("proposed", 0) + proposals.numel()
            stats["accepted"] = stats.get("accepted", 0) + int(accepted.sum())
    return run.result()


class _Speculation:
    """Both models' sessions and each row's place in them, round after round."""

    def __init__(self, target: DecoderModel, draft: DecoderModel, prompt: torch.Tensor, mask: torch.Tensor | None,
                 rules: TokenRules) -> None:
        B, T = prompt.shape
        opts = rules.options
        self.prompt, self.rules, self.opts = prompt, rules, opts
        contexts = [c for c in (target.config.n_positions, draft.config.n_positions) if c is not None]
        self.capacity = min([T + opts.max_new_tokens + opts.num_draft_tokens + 1, *contexts])
        self.target, self.draft = (DecodeSession(m, B, self.capacity) for m in (target, draft))
        if T > 1:
            for s in (self.target, self.draft):
                s.feed(prompt[:, :-1], input_mask=None if mask is None else mask[:, :-1])
        self.filled = [T - 1] * B  # tokens each row holds in the target's cache
        self.pending = prompt[:, -1].clone()  # (B,) the token neither model has seen
        self.behind = [False] * B  # the draft also lacks the last proposal, which was accepted
        self.lagging = torch.zeros(B, dtype=torch.long, device=prompt.device)  # which token that is
        self.done = [opts.max_new_tokens == 0] * B

    def propose(self, active: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The draft's proposals ``(R, k)`` and distributions ``(R, k, V)``, and the target's ``(R, k+1, V)``."""
        opts, rules = self.opts, self.rules
        rows = None if len(active) == len(self.done) else active  # finished rows are fed no more
        at = torch.tensor(active, device=self.prompt.device)
        generated = max(rules.generated[r] for r in active)
        k = max(0, min(opts.num_draft_tokens, self.capacity - 1 - max(self.filled[r] for r in active),
                       opts.max_new_tokens - generated - 1))
        # The draft catches up (the last proposal it never fed, where all were accepted), then proposes.
        late = [r for r in active if self.behind[r]]
        if len(late) == len(active):  # all behind (always so at batch 1 when all were accepted): one feed
            q_logits = self.draft.feed(torch.stack([self.lagging[at], self.pending[at]], 1), rows=rows)
        else:
            if late:
                self.draft.feed(self.lagging[late][:, None], rows=late)
            q_logits = self.draft.feed(self.pending[at][:, None], rows=rows)
        proposals, q = [], []
        for i in range(k):
            qi = _distribution(q_logits[:, -1], opts)
            proposals.append(qi.argmax(-1) if opts.greedy else _draw(qi, rules.generator))
            q.append(qi)
            if i + 1 < k:
                q_logits = self.draft.feed(proposals[-1][:, None], rows=rows)
        R, V = len(active), q_logits.shape[-1]
        d = torch.stack(proposals, 1) if proposals else torch.zeros(R, 0, dtype=torch.long, device=at.device)
        q_all = torch.stack(q, 1) if q else torch.zeros(R, 0, V, device=at.device)
        p_logits = self.target.feed(torch.cat([self.pending[at][:, None], d], 1), rows=rows, last_only=False)
        check_finite(p_logits.float().amax(-1).amax(-1), generated)
        return d, q_all, _distribution(p_logits, opts)

    def advance(self, active: list[int], proposals: torch.Tensor, accepted: torch.Tensor,
                new_token: torch.Tensor) -> None:
        """Cut both caches back to what was accepted, and record the accepted tokens and the new one."""
        k = proposals.shape[1]
        at = torch.tensor(active, device=self.prompt.device)
        n_acc = accepted.tolist()
        # The draft fed `pending` and all proposals but the last: it holds the same tokens, less d_k
        # where every proposal was accepted.
        for j, r in enumerate(active):
            self.filled[r] += 1 + n_acc[j]
            self.behind[r] = k > 0 and n_acc[j] == k
        self.target.truncate(active, [self.filled[r] for r in active])
        self.draft.truncate(active, [self.filled[r] - self.behind[r] for r in active])
        if k:
            self.lagging[at] = proposals[:, -1]
        self.pending[at] = new_token
        # One column at a time, until each row ends: row j's tokens are made[j, : n_acc[j] + 1].
        made = torch.cat([proposals, new_token[:, None]], 1)  # (R, k + 1)
        made[torch.arange(len(active), device=at.device), accepted] = new_token
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


def _accept(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor, opts: GenerationOptions,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """How many proposals ``d`` ``(R, k)`` each row accepts, and the token drawn after them ``(R,)``.

    ``q`` ``(R, k, V)`` are the draft's distributions, ``p`` ``(R, k+1, V)`` the target's.
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
        n_acc = accept.long().cumprod(1).sum(1)  # (R,) proposals accepted before the first rejection
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
