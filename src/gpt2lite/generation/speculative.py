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
    B, T = prompt.shape
    device = prompt.device
    generator = rules.generator
    k = opts.num_draft_tokens
    contexts = [c for c in (target.config.n_positions, draft.config.n_positions) if c is not None]
    capacity = min([T + opts.max_new_tokens + k + 1, *contexts])
    sessions = [DecodeSession(m, B, capacity) for m in (target, draft)]
    if T > 1:
        for s in sessions:
            s.feed(prompt[:, :-1], input_mask=None if mask is None else mask[:, :-1])
    filled = [T - 1] * B  # tokens each row holds in the target's cache
    pending = prompt[:, -1].clone()  # (B,) the token neither model has seen
    behind = [False] * B  # the draft also lacks the last proposal, which was accepted
    lagging = torch.zeros(B, dtype=torch.long, device=device)  # which token that is
    done = [opts.max_new_tokens == 0] * B

    while not all(done):
        active = [r for r in range(B) if not done[r]]
        rows = None if len(active) == B else active  # finished rows are fed no more
        at = torch.tensor(active, device=device)
        generated = max(rules.generated[r] for r in active)
        k_round = max(0, min(k, capacity - 1 - max(filled[r] for r in active), opts.max_new_tokens - generated - 1))
        # The draft catches up (the last proposal it never fed, where all were accepted), then proposes.
        late = [r for r in active if behind[r]]
        if len(late) == len(active):  # all behind (always so at batch 1 when all were accepted): one feed
            q_logits = sessions[1].feed(torch.stack([lagging[at], pending[at]], 1), rows=rows)
        else:
            if late:
                sessions[1].feed(lagging[late][:, None], rows=late)
            q_logits = sessions[1].feed(pending[at][:, None], rows=rows)
        proposals, q = [], []
        for i in range(k_round):
            qi = _distribution(q_logits[:, -1], opts)
            proposals.append(qi.argmax(-1) if opts.greedy else _draw(qi, generator))
            q.append(qi)
            if i + 1 < k_round:
                q_logits = sessions[1].feed(proposals[-1][:, None], rows=rows)
        R = len(active)
        d = torch.stack(proposals, 1) if proposals else torch.zeros(R, 0, dtype=torch.long, device=device)
        p_logits = sessions[0].feed(torch.cat([pending[at][:, None], d], 1), rows=rows, last_only=False)
        check_finite(p_logits.float().amax(-1).amax(-1), generated)
        p = _distribution(p_logits, opts)  # (R, k+1, V)

        if k_round:
            q_all = torch.stack(q, 1)  # (R, k, V)
            p_d = p[:, :-1].gather(2, d[..., None])[..., 0]
            q_d = q_all.gather(2, d[..., None])[..., 0]
            if opts.greedy:
                accept = p_d > 0
            else:
                u = torch.rand(d.shape, generator=generator, device=device)
                accept = u < p_d / q_d
            n_acc = accept.long().cumprod(1).sum(1)  # (R,) proposals accepted before the first rejection
        else:
            n_acc = torch.zeros(R, dtype=torch.long, device=device)
        index = torch.arange(R, device=device)
        p_next = p[index, n_acc]  # (R, V): where the next token comes from
        if k_round and not opts.greedy:
            rejected = n_acc < k_round
            residual = (p_next - q_all[index, n_acc.clamp(max=k_round - 1)]).clamp(min=0)
            mass = residual.sum(-1, keepdim=True)
            use = rejected[:, None] & (mass > 0)
            p_next = torch.where(use, residual / mass.clamp(min=1e-30), p_next)
        new_token = p_next.argmax(-1) if opts.greedy else _draw(p_next, generator)

        # Cut both caches back to what was accepted. The draft fed `pending` and all proposals but
        # the last: it holds the same tokens, less d_k where every proposal was accepted.
        accepted = n_acc.tolist()
        if stats is not None:
            stats["rounds"] = stats.get("rounds", 0) + 1
            stats["proposed"] = stats.get("proposed", 0) + k_round * R
            stats["accepted"] = stats.get("accepted", 0) + sum(accepted)
        for j, r in enumerate(active):
            filled[r] += 1 + accepted[j]
            behind[r] = k_round > 0 and accepted[j] == k_round
        sessions[0].truncate(active, [filled[r] for r in active])
        sessions[1].truncate(active, [filled[r] - behind[r] for r in active])
        if k_round:
            lagging[at] = d[:, -1]
        pending[at] = new_token

        # Record the accepted tokens and the correction, one column at a time, until each row ends.
        made = torch.cat([d, new_token[:, None]], 1)  # (R, k_round + 1): row j's are made[j, : accepted[j] + 1]
        made[index, n_acc] = new_token
        for column in range(k_round + 1):
            going = [j for j, r in enumerate(active) if column <= accepted[j] and not done[r]]
            if not going:
                break
            rows = [active[j] for j in going]
            rules.append(made[going, column], rows=rows)
            ended = rules.finished[rows].tolist()
            for r, end in zip(rows, ended, strict=True):
                done[r] = end or rules.generated[r] == opts.max_new_tokens

    width = max(rules.generated)
    new = rules.tokens[:, T : T + width]
    # Rows that ended early hold whatever the buffer had past their end: pad them.
    ended_at = torch.tensor(rules.generated, device=device)[:, None]
    new = torch.where(torch.arange(width, device=device) < ended_at, new, rules.pad)
    reasons = ["stop" if f else "length" for f in rules.finished.tolist()]
    return torch.cat([prompt, new], 1), reasons
