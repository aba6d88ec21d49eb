"""Tokenizers behind one small protocol: GPT-2's byte-level BPE, a character vocabulary, and their files."""
