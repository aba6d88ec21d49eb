"""gpt2lite: GPT-2 text generation in plain PyTorch.

The public API is the imports of the ``TYPE_CHECKING`` block below, written once:
IDEs and type checkers read them there, and ``__all__`` and the lazy look-up are
made from them. Names are imported on first use, so ``import gpt2lite`` (and the
command line's start-up) does not pay for torch until something needs it.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpt2lite.errors import CheckpointError as CheckpointError
    from gpt2lite.errors import ModelNotFoundError as ModelNotFoundError
    from gpt2lite.errors import NonFiniteError as NonFiniteError
    from gpt2lite.generation.batching import left_pad as left_pad
    from gpt2lite.generation.batching import right_pad as right_pad
    from gpt2lite.generation.loop import GenerateOutput as GenerateOutput
    from gpt2lite.generation.loop import generate as generate
    from gpt2lite.generation.loop import iter_steps as iter_steps
    from gpt2lite.generation.loop import iter_tokens as iter_tokens
    from gpt2lite.generation.options import GenerationOptions as GenerationOptions
    from gpt2lite.generation.rules import Step as Step
    from gpt2lite.generation.rules import TokenRules as TokenRules
    from gpt2lite.generation.session import DecodeSession as DecodeSession
    from gpt2lite.io.hub import push_to_hub as push_to_hub
    from gpt2lite.loading import load_model as load_model
    from gpt2lite.loading import load_tokenizer as load_tokenizer
    from gpt2lite.loading import save_model as save_model
    from gpt2lite.models.cache import KVCache as KVCache
    from gpt2lite.models.classifier import GPT2ForSequenceClassification as GPT2ForSequenceClassification
    from gpt2lite.models.config import PRESETS as PRESETS
    from gpt2lite.models.config import GPT2Config as GPT2Config
    from gpt2lite.models.gpt2 import GPT2 as GPT2
    from gpt2lite.models.protocol import DecoderModel as DecoderModel
    from gpt2lite.models.protocol import DecodeState as DecodeState
    from gpt2lite.models.recurrent import RecurrentConfig as RecurrentConfig
    from gpt2lite.models.recurrent import RecurrentLM as RecurrentLM
    from gpt2lite.text.assembler import Completion as Completion
    from gpt2lite.text.classifier import Classification as Classification
    from gpt2lite.text.classifier import TextClassifier as TextClassifier
    from gpt2lite.text.generator import TextGenerator as TextGenerator
    from gpt2lite.text.metrics import TextMetrics as TextMetrics
    from gpt2lite.text.metrics import evaluate_texts as evaluate_texts
    from gpt2lite.text.scoring import perplexity as perplexity
    from gpt2lite.text.scoring import token_logprobs as token_logprobs
    from gpt2lite.tokenizers.bpe import Tokenizer as Tokenizer
    from gpt2lite.tokenizers.char import CharTokenizer as CharTokenizer
    from gpt2lite.tokenizers.hf import HFTokenizer as HFTokenizer
    from gpt2lite.tokenizers.learn import train_bpe as train_bpe
    from gpt2lite.tokenizers.protocol import StreamDecoder as StreamDecoder
    from gpt2lite.tokenizers.protocol import TokenizerProtocol as TokenizerProtocol
    from gpt2lite.training.data import TokenData as TokenData
    from gpt2lite.training.data import prepare_data as prepare_data
    from gpt2lite.training.instructions import InstructionData as InstructionData
    from gpt2lite.training.instructions import load_instructions as load_instructions
    from gpt2lite.training.labeled import LabeledData as LabeledData
    from gpt2lite.training.labeled import load_labeled as load_labeled
    from gpt2lite.training.trainer import TrainConfig as TrainConfig
    from gpt2lite.training.trainer import TrainResult as TrainResult
    from gpt2lite.training.trainer import train as train
    from gpt2lite.transforms.adapters import LoraSlots as LoraSlots
    from gpt2lite.transforms.lora import LoraConfig as LoraConfig
    from gpt2lite.transforms.lora import add_lora as add_lora
    from gpt2lite.transforms.lora import merge_lora as merge_lora
    from gpt2lite.transforms.packed import prepack as prepack
    from gpt2lite.transforms.peft import load_adapter as load_adapter
    from gpt2lite.transforms.peft import save_adapter as save_adapter
    from gpt2lite.transforms.quantize import quantize as quantize

__version__ = "0.1.0"


def _declared_exports() -> dict[str, str]:
    """name -> defining module, read off the ``TYPE_CHECKING`` imports of this file."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    return {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom)
            for alias in node.names}


_EXPORTS = _declared_exports()
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpt2lite' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
