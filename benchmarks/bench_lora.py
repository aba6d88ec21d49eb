"""The per-row LoRA products of a mixed batch: ours (one masked product over all slots) against punica's usual forms.

At GPT-2 124M's layer widths, one decode step (T = 1) of a batch whose rows are
spread over --adapters adapters of rank --rank (the slot table holding --slots):

- ours: ``MultiLoraLinear``'s update (``x @ A_all``, other slots' columns masked, ``@ B_all``);
- loop: for each adapter of the batch, ``index_select`` its rows, two products, ``index_add``;
- bmm: ``A`` and ``B`` gathered per row, two ``torch.bmm``.

Each is timed beside the base layer's own product for scale (ours over a base
that costs nothing, so that only its update is timed), alternating in one run,
best of --repeats rounds; every form is checked against ours first.

    python benchmarks/bench_lora.py [--batch 8 16] [--adapters 4] [--rank 8]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from gpt2lite.transforms.adapters import LoraRouting, MultiLoraLinear

WIDTHS = {"c_attn": (768, 2304), "attn.c_proj": (768, 768), "c_fc": (768, 3072), "mlp.c_proj": (3072, 768)}


def loop_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, groups: list[tuple[int, torch.Tensor]]):
    """Peer: one pair of products per adapter of the batch over its rows (a: (S, r, in), b: (S, out, r))."""
    y = torch.zeros(*x.shape[:-1], b.shape[1])
    for s, rows in groups:
        y = y.index_add(0, rows, (x.index_select(0, rows) @ a[s].T) @ b[s].T)
    return y


def bmm_update(x: torch.Tensor, at: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor):
    """Peer: per-row gathered A and B (at: (S, in, r), bt: (S, r, out)), two batched products."""
    return torch.bmm(torch.bmm(x, at[slots]), bt[slots])


class FreeBase(torch.nn.Module):
    """A stand-in base layer whose output is ready-made: ``MultiLoraLinear`` around it times its update alone."""

    def __init__(self, in_features: int, out_features: int, rows: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("out", torch.zeros(rows, 1, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


def best(fn, repeats: int, calls: int = 200) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--slots", type=int, default=4, help="adapters the table holds (max_loras)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}; {args.adapters} adapters of rank {args.rank} in a table of "
          f"{args.slots}; one decode step; microseconds per layer, best of {args.repeats}")
    for name, (d_in, d_out) in WIDTHS.items():
        base = torch.nn.Linear(d_in, d_out)
        a = torch.randn(args.slots + 1, args.rank, d_in) * 0.02
        b = torch.randn(args.slots + 1, d_out, args.rank) * 0.02
        at, bt = a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous()
        for n in args.batch:
            routing = LoraRouting(args.slots)
            ours = MultiLoraLinear(FreeBase(d_in, d_out, n), routing, torch.float32)
            for s in range(1, args.slots + 1):
                ours.put(s, a[s], b[s], 1.0)
            slots = [1 + i % args.adapters for i in range(n)]
            routing.set(slots)
            x = torch.randn(n, 1, d_in)
            index = torch.tensor(slots)
            groups = [(s, torch.tensor([i for i, t in enumerate(slots) if t == s])) for s in sorted(set(slots))]
            with torch.inference_mode():
                update = ours(x)
                torch.testing.assert_close(loop_update(x, a, b, groups), update, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(bmm_update(x, at, bt, index), update, atol=1e-5, rtol=1e-4)
                forms = {"base": partial(base, x), "ours": partial(ours, x),
                         "loop": partial(loop_update, x, a, b, groups), "bmm": partial(bmm_update, x, at, bt, index)}
                t: dict[str, list[float]] = {name: [] for name in forms}
                for _ in range(args.repeats):  # round-robin, so that a busy moment hits every form
                    for form, fn in forms.items():
                        t[form].append(best(fn, 1))
            m = {k: min(v) for k, v in t.items()}
            print(f"  {name:>11} {d_in}x{d_out} batch {n:2d}: base product {m['base']:6.1f} us; LoRA update: ours "
                  f"{m['ours']:6.1f}, loop {m['loop']:6.1f}, bmm {m['bmm']:6.1f} us")


if __name__ == "__main__":
    main()
