"""A tour of gpt2lite's Python API, in the order a notebook would take it.

    python examples/generate_text.py                 # GPT-2 124M from the hub
    python examples/generate_text.py --model ./dir   # any local checkpoint
"""

from __future__ import annotations

import argparse

import torch

from gpt2lite import GPT2, TextGenerator, Tokenizer, generate


def main(model_name: str = "gpt2", device: str = "cpu") -> None:
    # 1. The tokenizer works offline: GPT-2's vocabulary ships with the package.
    tok = Tokenizer.gpt2()
    ids = tok.encode("GPT-2 writes text.")
    print("token ids:", ids, "->", repr(tok.decode(ids)))

    # 2. Model and tokenizer together: strings in, strings out.
    gen = TextGenerator.from_pretrained(model_name, device=device)
    print("greedy:  ", repr(gen("The capital of France is", max_new_tokens=12, temperature=0)))
    print("sampled: ", repr(gen("The capital of France is", max_new_tokens=12, top_p=0.9, seed=0)))

    # 3. Streaming, with a stop string.
    print("streamed:", end=" ")
    for piece in gen.stream("Here is a short poem:\n", max_new_tokens=40, temperature=0.8, seed=1, stop=["\n\n"]):
        print(piece, end="", flush=True)
    print()

    # 4. Token level: the same model object, any batch, your own tensors.
    model: GPT2 = gen.model
    batch = torch.tensor([tok.encode("One, two, three,"), tok.encode("Red, green, blue,")])
    out = generate(model, batch, max_new_tokens=8, temperature=0)
    for row in out:
        print("continued:", repr(tok.decode(row.tolist())))

    # 5. Scores: the model returns logits for every position.
    with torch.no_grad():
        logits = model(batch.to(model.device))
    print("logits shape:", tuple(logits.shape))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    main(args.model, args.device)
