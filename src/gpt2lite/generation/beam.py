"""Beam search over a ``DecodeSession``: ``num_beams`` rows per prompt, reordered in the cache at every step.

The scoring follows ``transformers``' beam search, so that the same model gives the
same sequences: at each step the ``2 * num_beams`` best continuations (by summed
log-probability, after the logits processors) are kept; those that end (end
token, stop sequence, or the length limit) become finished hypotheses scored
``sum_logprobs / generated_length ** length_penalty``; the best unfinished
``num_beams`` continue. ``early_stopping`` decides when the search ends: as soon
as ``num_beams`` hypotheses are finished (True), when no running beam can beat
the worst finished one at its current length (False), or when none could even
at the longest length ("never").
"""

from __future__ import annotations

import torch

from gpt2lite.generation.options import GenerationOptions
from gpt2lite.generation.rules import TokenRules
from gpt2lite.generation.session import DecodeSession
from gpt2lite.models.protocol import DecoderModel

__all__ = ["beam_search"]

_NEG = -1.0e9  # a score no live hypothesis can have


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, index[b, j], ...]``: pick beams along dim 1 of ``(B, beams, ...)``."""
    return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:]))


@torch.inference_mode()
def beam_search(
    model: DecoderModel, prompt: torch.Tensor, mask: torch.Tensor | None, opts: GenerationOptions
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Sequences ``(B * num_return_sequences, T + new)``, their scores and finish reasons, best first per prompt."""
    B, T = prompt.shape
    nb, device, V = opts.num_beams, prompt.device, model.config.vocab_size
    max_length = T + opts.max_new_tokens
    flat_mask = mask.repeat_interleave(nb, dim=0) if mask is not None else None
    # The rules keep each beam's history (reordered with the beams) for penalties and bans.
    rules = TokenRules(opts, model.config, prompt.repeat_interleave(nb, dim=0), flat_mask)
    lp, early = opts.length_penalty, opts.early_stopping
    keep = max(2, 1 + (rules.eos is not None)) * nb  # enough that num_beams can go on when the best ones end
    top_nb = torch.arange(keep, device=device) < nb

    running = torch.full((B, nb, max_length), rules.pad, dtype=torch.long, device=device)
    running[:, :, :T] = prompt[:, None]
    running_scores = torch.zeros(B, nb, device=device)
    running_scores[:, 1:] = _NEG  # the beams start identical: only the first may expand
    hypotheses = _Hypotheses(running)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)

    session = DecodeSession(model, B * nb, max_length)
    logits = session.feed(prompt.repeat_interleave(nb, dim=0), input_mask=flat_mask)[:, -1]  # (B * nb, V)
    for cur in range(T, max_length):
        new = cur - T + 1  # tokens each candidate holds after this step
        logp = rules.adjust(logits.float().log_softmax(-1))  # the processors see log-probabilities, as in transformers
        scores = (logp.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        top_scores, top_index = scores.topk(keep, dim=1)  # (B, keep)
        source, token = top_index // V, top_index % V
        candidates = _gather(running, source)  # (B, keep, max_length)
        candidates[:, :, cur] = token
        ended = rules.ends(candidates[:, :, : cur + 1].reshape(B * keep, cur + 1), new).view(B, keep)
        hits = ended | (cur + 1 >= max_length)

        # The best unfinished candidates run on.
        run_scores = top_scores + hits.float() * _NEG
        chosen = run_scores.topk(nb, dim=1).indices
        running = _gather(candidates, chosen)
        running_scores = run_scores.gather(1, chosen)

        # Finished candidates among the best num_beams join the hypotheses if they score higher.
        closed = hypotheses.finished.all(-1, keepdim=True) & (early is True)
        hypotheses.offer(candidates, top_scores / (new**lp), new, ended, hits & top_nb & improvable & ~closed)

        longest = max_length - T if early == "never" and lp > 0 else new
        improvable = improvable & (running_scores[:, :1] / (longest**lp) > hypotheses.worst()).any(-1, keepdim=True)
        go_on = bool(improvable.any()) and not (bool(hypotheses.finished.all()) and early is True)
        if not go_on or bool(hits.all()):
            break
        beam_rows = (source.gather(1, chosen) + torch.arange(B, device=device)[:, None] * nb).flatten()
        session.reorder(beam_rows)
        rules.reorder(beam_rows)
        rules.append(token.gather(1, chosen).flatten())
        logits = session.feed(running[:, :, cur : cur + 1].reshape(B * nb, 1))[:, -1]
    return hypotheses.best(opts.num_return_sequences, T)


class _Hypotheses:
    """The ``num_beams`` best finished hypotheses of each prompt, with their scores, lengths and how they ended."""

    def __init__(self, running: torch.Tensor) -> None:
        B, nb, _ = running.shape
        self.sequences = running.clone()  # (B, nb, max_length)
        self.scores = torch.full((B, nb), _NEG, device=running.device)
        self.finished = torch.zeros(B, nb, dtype=torch.bool, device=running.device)
        self.lengths = torch.zeros(B, nb, dtype=torch.long, device=running.device)  # generated tokens
        self.stopped = torch.zeros(B, nb, dtype=torch.bool, device=running.device)  # end token or stop sequence

    def offer(self, candidates: torch.Tensor, scores: torch.Tensor, length: int, stopped: torch.Tensor,
              eligible: torch.Tensor) -> None:
        """Let the ``eligible`` of ``candidates`` ``(B, keep, L)`` replace lower-scoring hypotheses."""
        scores = torch.cat([self.scores, scores + (~eligible).float() * _NEG], 1)
        best = scores.topk(self.scores.shape[1], dim=1).indices
        self.sequences = _gather(torch.cat([self.sequences, candidates], 1), best)
        self.scores = scores.gather(1, best)
        self.finished = torch.cat([self.finished, eligible], 1).gather(1, best)
        self.lengths = torch.cat([self.lengths, torch.full_like(stopped, length, dtype=torch.long)], 1).gather(1, best)
        self.stopped = torch.cat([self.stopped, stopped], 1).gather(1, best)

    def worst(self) -> torch.Tensor:
        """Each prompt's lowest finished score, ``(B, nb)`` (a score nothing loses to where one is still open)."""
        return torch.where(self.finished, self.scores.min(dim=1, keepdim=True).values, _NEG)

    def best(self, n: int, T: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The ``n`` best of each prompt ``(B * n, T + longest)``, their scores and finish reasons."""
        B = self.sequences.shape[0]
        out_length = T + int(self.lengths[:, :n].max())
        out = self.sequences[:, :n, :out_length].reshape(B * n, out_length)
        reasons = ["stop" if s else "length" for s in self.stopped[:, :n].flatten().tolist()]
        return out, self.scores[:, :n].flatten(), reasons
