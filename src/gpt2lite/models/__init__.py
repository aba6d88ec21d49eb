"""Models and their files: GPT-2, its config and key/value cache, checkpoint I/O, the decoding protocol."""
