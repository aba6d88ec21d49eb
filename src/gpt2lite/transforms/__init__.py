"""Transforms of a loaded GPT-2: LoRA adapters (and their PEFT files), int8/int4 quantization, prepacked weights.

Each works on a model from the outside, swapping layers in place; the model's
own class knows none of them.
"""
