"""gpt2lite: GPT-2 text generation in plain PyTorch."""

from gpt2lite.config import PRESETS, GPT2Config
from gpt2lite.data import TokenData, prepare_data
from gpt2lite.evaluate import perplexity, token_logprobs
from gpt2lite.generation import GenerationOptions, generate, iter_tokens
from gpt2lite.hub import ModelNotFoundError
from gpt2lite.model import GPT2, KVCache
from gpt2lite.pipeline import TextGenerator
from gpt2lite.tokenizer import StreamDecoder, Tokenizer
from gpt2lite.train import TrainConfig, TrainResult, train
from gpt2lite.weights import CheckpointError

__all__ = [
    "GPT2",
    "PRESETS",
    "CheckpointError",
    "GPT2Config",
    "GenerationOptions",
    "KVCache",
    "ModelNotFoundError",
    "StreamDecoder",
    "TextGenerator",
    "TokenData",
    "Tokenizer",
    "TrainConfig",
    "TrainResult",
    "generate",
    "iter_tokens",
    "perplexity",
    "prepare_data",
    "token_logprobs",
    "train",
]
__version__ = "0.1.0"
