"""gpt2lite: GPT-2 text generation in plain PyTorch.

The public API is the names in ``__all__``. They are imported on first use, so
``import gpt2lite`` (and the command line's start-up) does not pay for torch
until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpt2lite.char_tokenizer import CharTokenizer
    from gpt2lite.classify import Classification, TextClassifier
    from gpt2lite.errors import CheckpointError, ModelNotFoundError, NonFiniteError
    from gpt2lite.generation.engine import (
        GenerateOutput,
        Step,
        generate,
        iter_steps,
        iter_tokens,
        left_pad,
    )
    from gpt2lite.generation.options import GenerationOptions
    from gpt2lite.generation.session import DecodeSession
    from gpt2lite.metrics import TextMetrics, evaluate_texts
    from gpt2lite.models.cache import KVCache
    from gpt2lite.models.classifier import GPT2ForSequenceClassification
    from gpt2lite.models.config import PRESETS, GPT2Config
    from gpt2lite.models.gpt2 import GPT2
    from gpt2lite.models.lora import LoraConfig, add_lora, load_adapter, merge_lora, save_adapter
    from gpt2lite.models.packed import prepack
    from gpt2lite.models.protocol import DecoderModel, DecodeState
    from gpt2lite.models.quantize import quantize
    from gpt2lite.models.recurrent import RecurrentConfig, RecurrentLM
    from gpt2lite.pipeline import Completion, TextGenerator
    from gpt2lite.scoring import perplexity, token_logprobs
    from gpt2lite.tokenizer import StreamDecoder, Tokenizer
    from gpt2lite.training.data import TokenData, prepare_data
    from gpt2lite.training.labeled import LabeledData, load_labeled
    from gpt2lite.training.trainer import TrainConfig, TrainResult, train

# name -> the module that defines it
_EXPORTS = {
    "Classification": "gpt2lite.classify",
    "TextClassifier": "gpt2lite.classify",
    "GPT2ForSequenceClassification": "gpt2lite.models.classifier",
    "LoraConfig": "gpt2lite.models.lora",
    "add_lora": "gpt2lite.models.lora",
    "merge_lora": "gpt2lite.models.lora",
    "load_adapter": "gpt2lite.models.lora",
    "save_adapter": "gpt2lite.models.lora",
    "quantize": "gpt2lite.models.quantize",
    "prepack": "gpt2lite.models.packed",
    "LabeledData": "gpt2lite.training.labeled",
    "load_labeled": "gpt2lite.training.labeled",
    "CharTokenizer": "gpt2lite.char_tokenizer",
    "CheckpointError": "gpt2lite.errors",
    "Completion": "gpt2lite.pipeline",
    "GenerateOutput": "gpt2lite.generation.engine",
    "Step": "gpt2lite.generation.engine",
    "iter_steps": "gpt2lite.generation.engine",
    "DecodeSession": "gpt2lite.generation.session",
    "DecodeState": "gpt2lite.models.protocol",
    "DecoderModel": "gpt2lite.models.protocol",
    "GPT2": "gpt2lite.models.gpt2",
    "GPT2Config": "gpt2lite.models.config",
    "GenerationOptions": "gpt2lite.generation.options",
    "KVCache": "gpt2lite.models.cache",
    "ModelNotFoundError": "gpt2lite.errors",
    "NonFiniteError": "gpt2lite.errors",
    "PRESETS": "gpt2lite.models.config",
    "RecurrentConfig": "gpt2lite.models.recurrent",
    "RecurrentLM": "gpt2lite.models.recurrent",
    "StreamDecoder": "gpt2lite.tokenizer",
    "TextGenerator": "gpt2lite.pipeline",
    "TextMetrics": "gpt2lite.metrics",
    "evaluate_texts": "gpt2lite.metrics",
    "TokenData": "gpt2lite.training.data",
    "Tokenizer": "gpt2lite.tokenizer",
    "TrainConfig": "gpt2lite.training.trainer",
    "TrainResult": "gpt2lite.training.trainer",
    "generate": "gpt2lite.generation.engine",
    "iter_tokens": "gpt2lite.generation.engine",
    "left_pad": "gpt2lite.generation.engine",
    "perplexity": "gpt2lite.scoring",
    "prepare_data": "gpt2lite.training.data",
    "token_logprobs": "gpt2lite.scoring",
    "train": "gpt2lite.training.trainer",
}

__all__ = [
    "GPT2",
    "PRESETS",
    "CharTokenizer",
    "CheckpointError",
    "Classification",
    "Completion",
    "DecodeSession",
    "DecodeState",
    "DecoderModel",
    "GPT2Config",
    "GPT2ForSequenceClassification",
    "GenerateOutput",
    "GenerationOptions",
    "KVCache",
    "LabeledData",
    "LoraConfig",
    "ModelNotFoundError",
    "NonFiniteError",
    "RecurrentConfig",
    "RecurrentLM",
    "Step",
    "StreamDecoder",
    "TextClassifier",
    "TextGenerator",
    "TextMetrics",
    "TokenData",
    "Tokenizer",
    "TrainConfig",
    "TrainResult",
    "add_lora",
    "evaluate_texts",
    "generate",
    "iter_steps",
    "iter_tokens",
    "left_pad",
    "load_adapter",
    "load_labeled",
    "merge_lora",
    "perplexity",
    "prepack",
    "prepare_data",
    "quantize",
    "save_adapter",
    "token_logprobs",
    "train",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpt2lite' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
