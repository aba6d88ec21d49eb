"""Does a model fine-tuned and saved by gpt2lite convert with llama.cpp's GGUF converter, and run the same there?

Fine-tunes a small GPT-2 (GPT-2's own vocabulary, 2 layers) for a few steps on
Python's documentation with ``gpt2lite.train``, so ``final/`` is exactly what a
user's run leaves, then:

1. runs llama.cpp's ``convert_hf_to_gguf.py`` on ``final/`` (``--outtype f32``),
   with no file added or changed;
2. loads the GGUF with llama-cpp-python: its logits over a held-out window of
   text, and greedy tokens from a few prompts;
3. compares both with gpt2lite's from the same folder (largest logit difference,
   top-1 agreement at every position, identical greedy tokens).

The converter and llama-cpp-python live in the peers' environment that
``../shared/peers/setup.sh`` builds (it installs ``gguf`` and llama-cpp-python from
the vendored llama.cpp), so both are run there as subprocesses:

    python benchmarks/check_gguf.py [--peers /tmp/peers] [--work runs/gguf-check]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

_LLAMA = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, prompts, window, n = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=256, n_threads=2, verbose=False, logits_all=True)
llm.eval(window)
logits = np.asarray(llm.scores[: len(window)], dtype=np.float64).tolist()
out = []
for ids in prompts:
    llm.reset()
    got = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == n:
            break
    out.append(got)
print(json.dumps({"greedy": out, "logits": logits}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default=os.path.join(os.sep, "tmp", "peers"), help="setup.sh's PEERS_DIR")
    parser.add_argument("--work", default="runs/gguf-check")
    parser.add_argument("--new", type=int, default=24, help="greedy tokens compared per prompt")
    args = parser.parse_args()

    from quant_quality import python_docs

    from gpt2lite import GPT2, GPT2Config, Tokenizer, TrainConfig, generate, prepare_data, train

    peers, work = Path(args.peers), Path(args.work)
    python = peers / "venv" / "bin" / "python"
    llama_cpp = peers / "sdist" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if not python.is_file() or not (llama_cpp / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"{peers} lacks the peers' venv or the vendored llama.cpp: run ../shared/peers/setup.sh first")

    data = prepare_data(python_docs()[:40], work / "data", val_fraction=0.1)
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=2, n_head=4, n_embd=128, n_positions=256))
    result = train(model, data, work / "run", TrainConfig(steps=150, batch_size=8, block_size=64, lr=3e-3,
                                                          progress=False), overwrite=True)
    final = result.final_dir
    print(f"fine-tuned 150 steps into {final}: {sorted(p.name for p in final.iterdir())}")

    gguf = work / "model-f32.gguf"
    env = {**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")}
    done = subprocess.run([str(python), str(llama_cpp / "convert_hf_to_gguf.py"), str(final), "--outtype", "f32",
                           "--outfile", str(gguf)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit("convert_hf_to_gguf.py failed:\n" + done.stderr[-3000:])
    print(f"converted: {gguf} ({gguf.stat().st_size / 1e6:.1f} MB)")

    tokenizer = Tokenizer.gpt2()
    texts = ["The with statement", "A module is a file containing", "class Foo:\n    def"]
    prompts = [tokenizer.encode(t) for t in texts]
    window = data.val[:128].astype("int64").tolist()
    ran = subprocess.run([str(python), "-c", _LLAMA, str(gguf), json.dumps(prompts), json.dumps(window),
                          str(args.new)], capture_output=True, text=True)
    if ran.returncode != 0:
        sys.exit("llama-cpp-python failed:\n" + ran.stderr[-3000:])
    answer = json.loads(ran.stdout.strip().splitlines()[-1])
    theirs = answer["greedy"]

    ours_model = GPT2.from_pretrained(final)
    with torch.no_grad():
        ours_logits = ours_model(torch.tensor([window]))[0].double()  # (T, V)
    their_logits = torch.tensor(answer["logits"], dtype=torch.float64)  # (T, V)
    diff = (ours_logits - their_logits).abs().max().item()
    top1 = (ours_logits.argmax(-1) == their_logits.argmax(-1)).float().mean().item()
    print(f"held-out window of {len(window)} tokens: largest logit difference {diff:.2e}, "
          f"top-1 equal at {top1:.1%} of positions")
    same = 0
    for text, ids, their in zip(texts, prompts, theirs, strict=True):
        ours = generate(ours_model, torch.tensor([ids]), max_new_tokens=args.new, temperature=0,
                        ignore_eos=True)[0, len(ids):].tolist()
        lead = next((i for i, (a, b) in enumerate(zip(ours, their, strict=False)) if a != b), min(len(ours),
                                                                                                  len(their)))
        same += lead == args.new
        print(f"{text!r}: llama.cpp and gpt2lite agree on the first {lead} of {args.new} greedy tokens")
        print(f"    gpt2lite:  {tokenizer.decode(ours)!r}\n    llama.cpp: {tokenizer.decode(their)!r}")
    print(f"{same} of {len(texts)} prompts identical over {args.new} tokens")


if __name__ == "__main__":
    main()
