"""Decode speed of gpt2lite beside transformers on the same weights, in one process, alternating.

A random-weight GPT-2 124M (published layout) is loaded by both libraries; each
round runs greedy generation of --new tokens after a --prompt-token prompt with
no early stop, first gpt2lite then transformers, for each batch size. Prints
the median tokens/s (new tokens x batch / wall time) and the ratio.

    python benchmarks/bench_generate.py [--device cpu|cuda] [--dtype float32|float16] [--rounds 5]
        [--quantize int8|int4] [--prepack]

"gpt2lite" is what ``load_model`` gives: on the CPU in float32, each product shape's
one-row kernel measured on this CPU, batches through MKL (``prepack(copy=False,
batch="mkl")``); the script prints which kernel each shape uses and why (the times
measured, or found in the cache). ``--prepack`` also times ``prepack(model)``
(reordered copies for batches), ``prepack(model, copy=False)`` (one copy, the batch
kernel measured too) and the plain model (``F.linear`` for every product); ``--compile`` the compiled step (of the
quantized model too, with ``--quantize``).

``--quantize int8`` (or int4) also times gpt2lite with quantized weights (same checkpoint, quantized
at load) in the same alternating rounds.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial

import torch
from timing import alternate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--compile", action="store_true",
                        help="also time gpt2lite's compiled step (CUDA graphs on a GPU)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None, help="also time gpt2lite quantized")
    parser.add_argument("--prepack", action="store_true",
                        help="also time gpt2lite with prepack() (copies for batches) and with F.linear only (CPU)")
    args = parser.parse_args()

    import transformers

    from gpt2lite import GPT2, GPT2Config, generate, load_model, prepack
    from gpt2lite.models.weights import resolve_dtype
    from gpt2lite.transforms.kernels import cpu_key
    from gpt2lite.transforms.packed import kernel_report

    transformers.logging.set_verbosity_error()
    dtype = resolve_dtype(args.dtype)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        GPT2(GPT2Config.from_preset("gpt2")).save_pretrained(tmp)
        ours = load_model(tmp, device=device, dtype=dtype)  # what users get: on the CPU, the measured one-row kernels
        quantized = load_model(tmp, device=device, dtype=dtype, quantize=args.quantize) \
            if args.quantize else None
        packed = prepack(GPT2.from_pretrained(tmp, device=device, dtype=dtype)) if args.prepack else None
        one_copy = prepack(GPT2.from_pretrained(tmp, device=device, dtype=dtype), copy=False) if args.prepack else None
        plain = GPT2.from_pretrained(tmp, device=device, dtype=dtype) if args.prepack else None
        theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp, dtype=dtype).to(device).eval()

    def run_ours(ids, model=ours, **kw):
        return generate(model, ids, max_new_tokens=args.new, temperature=0, ignore_eos=True, **kw)

    def run_theirs(ids):
        with torch.inference_mode():
            return theirs.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
                do_sample=False, pad_token_id=50256,
            )

    runners = {"gpt2lite": run_ours, "transformers": run_theirs}
    if args.compile:
        runners["gpt2lite compiled"] = lambda ids: run_ours(ids, compile=True)
    if quantized is not None:
        runners[f"gpt2lite {args.quantize}"] = partial(run_ours, model=quantized)
        if args.compile:
            runners[f"gpt2lite {args.quantize} compiled"] = partial(run_ours, model=quantized, compile=True)
    if packed is not None:
        runners["gpt2lite prepacked"] = partial(run_ours, model=packed)
        runners["gpt2lite one copy"] = partial(run_ours, model=one_copy)
        runners["gpt2lite F.linear"] = partial(run_ours, model=plain)

    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} prompt={args.prompt} "
          f"new={args.new} greedy, {args.rounds} rounds, medians")
    print(f"cpu: {cpu_key()}")
    for name, model in (("gpt2lite", ours), ("gpt2lite prepacked", packed), ("gpt2lite one copy", one_copy)):
        lines = kernel_report(model) if model is not None else []
        if lines:
            print(f"kernels: {name} (per product shape):")
            for line in lines:
                print(f"  {line}")
    if args.compile and device.type == "cpu":
        print("kernels: gpt2lite compiled: one-row products as inductor-generated sums of products"
              + (f"; {args.quantize} compiled: the eager {args.quantize} kernels as ops in the graph"
                 if args.quantize else ""))
    for batch in args.batch:
        ids = torch.randint(0, 50257, (batch, args.prompt), generator=torch.Generator().manual_seed(batch)).to(device)
        outputs = {name: run(ids) for name, run in runners.items()}  # warm-up (and compile)
        reference = outputs["transformers"]
        for name, out in outputs.items():
            same = torch.equal(out.cpu(), reference.cpu())
            if not same:
                print(f"  note: {name} output differs from transformers at batch {batch}")
        medians = alternate({name: partial(run, ids) for name, run in runners.items()}, args.rounds, sync)
        base = medians["transformers"]
        for name, t in medians.items():
            print(f"  batch {batch:2d} {name:>18}: {batch * args.new / t:8.1f} tok/s  ({base / t:4.2f}x transformers)")


if __name__ == "__main__":
    main()
