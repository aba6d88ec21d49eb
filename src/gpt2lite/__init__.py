"""gpt2lite: GPT-2 text generation in plain PyTorch."""

from gpt2lite.hub import ModelNotFoundError
from gpt2lite.tokenizer import StreamDecoder, Tokenizer

__all__ = ["ModelNotFoundError", "StreamDecoder", "Tokenizer"]
__version__ = "0.1.0"
