"""Decoding: options, token choice, and the engine that drives any model through the decoding protocol."""
