"""gpt2lite's own CPU kernels against PyTorch's routes over the 49 products of one GPT-2 124M decode step.

Each route runs the step's products (12 layers x c_attn, c_proj, c_fc, mlp c_proj,
and the 768 x 50257 head), over random weights of the real shapes, far larger than
the caches, as a decode step reads them; the routes alternate round after round and
the medians are printed in ms per step, with the weight bytes read per second:

- float32: gpt2lite's kernel, MKL (``F.linear``) and oneDNN over the plain weight;
- float16 weights (``quantize="f16"``): gpt2lite's kernel (PyTorch has no fast CPU route for them);
- int8: gpt2lite's kernel, fbgemm's ``linear_dynamic`` (today's route) over ``Int8Linear``'s weights;
- int4 (groups of 64 inputs, the head in int4 too): gpt2lite's kernel, PyTorch's
  ``_weight_int4pack_mm_for_cpu`` (``kernels="torch"``) over the same codes.

    python benchmarks/bench_kernels.py [--rounds 30] [--rows 1] [--isa avx2|avx512]
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from timing import alternate

from gpt2lite.transforms.native import cpu_features, load_kernels, use_kernels
from gpt2lite.transforms.quantize import Int4Linear, Int8Linear

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]  # (out, in) rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--rows", type=int, default=1, help="activation rows per product (the batch)")
    parser.add_argument("--isa", default=None, help="the kernels' variant: avx2 or avx512 (default: the best here)")
    args = parser.parse_args()
    torch.manual_seed(0)
    kernels = load_kernels(isa=args.isa)
    if kernels is None:
        raise SystemExit("gpt2lite's kernels could not be built here (see the INFO log line)")
    avx = sorted(f for f in cpu_features() if f.startswith("avx"))
    print(f"CPU: {platform.processor() or platform.machine()} {_cpu_name()}; {', '.join(avx)}; "
          f"{torch.get_num_threads()} threads; kernels: {kernels.isa}; {args.rows} row(s)")
    x = torch.randn(args.rows, 3072)
    weights = [torch.randn(out, inp) for out, inp in SHAPES]
    biases = [torch.randn(out) for out, _ in SHAPES]
    layers = [Int8Linear.from_float(w, b) for w, b in zip(weights, biases, strict=True)]
    halves = [w.half() for w in weights]
    for layer in layers:
        layer.kernels = "torch"
    int4 = [Int4Linear.from_float(w, b) for w, b in zip(weights, biases, strict=True)]  # gpt2lite's layout
    int4_torch = [use_kernels(Int4Linear.from_float(w, b), "torch") for w, b in zip(weights, biases, strict=True)]
    if any(layer.block for layer in int4):
        raise SystemExit("the int4 layers took PyTorch's layout: gpt2lite's kernel does not serve them here")

    def step(product):
        def run():
            for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
                product(i, x[:, :w.shape[1]], w, b)
        return run

    with torch.inference_mode():
        runners = {
            "f32 gpt2lite": step(lambda i, v, w, b: kernels.linear_f32(v, w, b)),
            "f32 MKL (F.linear)": step(lambda i, v, w, b: F.linear(v, w, b)),
            "f32 oneDNN": step(lambda i, v, w, b: torch.ops.mkldnn._linear_pointwise(v, w, b, "none", [], "")),
            "f16 weights gpt2lite": step(lambda i, v, w, b: kernels.linear_f16(v, halves[i], b)),
            "int8 gpt2lite": step(lambda i, v, w, b: kernels.linear_int8(v, layers[i].weight, layers[i].scale,
                                                                         layers[i].bias)),
            "int8 fbgemm": step(lambda i, v, w, b: layers[i](v)),
            "int4 gpt2lite": step(lambda i, v, w, b: int4[i](v)),
            "int4 PyTorch": step(lambda i, v, w, b: int4_torch[i](v)),
        }
        for run in runners.values():
            run()  # warm: fbgemm's packing, the thread pools
        medians = alternate(runners, args.rounds)
    f32_bytes = sum(w.numel() * 4 for w in weights)
    for name, seconds in medians.items():
        read = {"int8": f32_bytes / 4, "int4": f32_bytes * 4.5 / 32, "f16 ": f32_bytes / 2}.get(name[:4], f32_bytes)
        print(f"{name:>20}: {seconds * 1e3:7.2f} ms a step, {read / seconds / 1e9:5.1f} GB/s of weights")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


if __name__ == "__main__":
    main()
