"""Serving: an OpenAI-compatible HTTP API (``app``) over one continuous-batching engine loop (``engine``).

Needs the ``serve`` extra: ``pip install "gpt2lite[serve]"``.
"""
