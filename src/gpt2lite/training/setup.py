"""What a training run starts from: its model, tokenizer and data, made from a ``RunSpec``.

``gpt2lite finetune`` fills a ``RunSpec`` from its flags; a script can fill one
itself. A resumed run rebuilds its model from the checkpoint's config and reads
its tokenizer back from the run's folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from gpt2lite.generation.context import check_window

if TYPE_CHECKING:
    from gpt2lite.transforms.lora import LoraConfig

# (tokenizer, chat messages) -> the prompt text: how instruction rows given as chats are rendered.
ChatPrompt = Callable[[Any, list[dict[str, Any]]], str]

__all__ = ["ChatPrompt", "RunSpec", "check_block_size", "model_from_config", "training_data", "training_setup"]


@dataclass
class RunSpec:
    """The settings that choose a run's model, vocabulary and data (the schedule is ``TrainConfig``'s)."""

    data: str  # a text file or folder, or a .csv/.jsonl corpus; labeled rows (classify); instruction rows (sft)
    out: str  # the run's folder: the data cache, checkpoint.pt, tokenizer/
    task: Literal["lm", "classify", "sft"] = "lm"
    arch: Literal["gpt2", "rnn", "lstm", "gru"] = "gpt2"
    model: str | None = None  # a checkpoint to fine-tune (hub id or path)
    preset: str | None = None  # or a GPT-2 shape to train from scratch
    n_embd: int = 256  # recurrent models
    n_layer: int = 2
    dropout: float = 0.2
    char: bool = False  # a character vocabulary read off the data
    tokenizer: str | None = None  # a tokenizer folder for a model trained from scratch
    text_column: str | None = None
    label_column: str | None = None
    labels: str | None = None  # class names in id order, comma-separated
    val_data: str | None = None
    val_fraction: float = 0.05
    encoding_errors: Literal["strict", "replace"] = "strict"
    workers: int = 1  # processes tokenizing raw text (lm); the tokens are the same as one's
    block_size: int | None = None
    seed: int = 0
    resume: bool = False
    offline: bool = False  # hub files from the cache only


def training_setup(spec: RunSpec, device: str, lora: LoraConfig | None, *, save_tokenizer: bool,
                   chat_prompt: ChatPrompt | None = None) -> tuple[Any, Any, Any]:
    """The model to train, its data, and the tokenizer both were made with (saved in OUT/tokenizer).

    A resumed run rebuilds its model from the checkpoint's config (the weights
    come with the checkpoint) and reads its tokenizer back: no hub, no --model.
    """
    import os

    import torch

    from gpt2lite.loading import load_model, load_tokenizer
    from gpt2lite.models.config import GPT2Config
    from gpt2lite.models.gpt2 import GPT2
    from gpt2lite.tokenizers.bpe import Tokenizer
    from gpt2lite.training.checkpoint import load_training_checkpoint
    from gpt2lite.training.trainer import CHECKPOINT, RUN_RECORD

    torch.manual_seed(spec.seed)  # a new model's (or head's) initialisation
    hub = dict(local_files_only=spec.offline)
    tokenizer_dir = os.path.join(spec.out, "tokenizer")
    model: Any = None
    if spec.resume and os.path.isfile(os.path.join(spec.out, RUN_RECORD)):
        model_config = load_training_checkpoint(os.path.join(spec.out, CHECKPOINT))["model_config"]
        model = model_from_config(spec, model_config).to(device)
        tokenizer: Any = load_tokenizer(tokenizer_dir, model.config.vocab_size)
    elif spec.char:
        from gpt2lite.tokenizers.char import CharTokenizer
        from gpt2lite.training.data import iter_text

        tokenizer = CharTokenizer.from_texts(iter_text(spec.data, spec.encoding_errors, spec.text_column))
    elif spec.tokenizer is not None:
        tokenizer = load_tokenizer(spec.tokenizer, 0)
    elif spec.model is None or spec.task == "classify":
        # A classifier's tokenizer: the model's own files, else GPT-2's (the size only picks that fallback).
        tokenizer = Tokenizer.gpt2() if spec.model is None else load_tokenizer(spec.model, 50257, **hub)
    if model is None and spec.task != "classify":
        # A vocabulary of its own (characters, --tokenizer) sets the new model's size and end token.
        vocab = dict(vocab_size=tokenizer.n_vocab, eos_token_id=tokenizer.eot_token) \
            if spec.char or spec.tokenizer else {}
        if spec.arch != "gpt2":
            from gpt2lite.models.recurrent import RecurrentConfig, RecurrentLM

            model = RecurrentLM(RecurrentConfig(cell=spec.arch, n_embd=spec.n_embd, n_layer=spec.n_layer,
                                                dropout=spec.dropout, **vocab)).to(device)
        elif spec.preset is not None:
            extra = dict(vocab, bos_token_id=vocab["eos_token_id"]) if vocab else {}
            model = GPT2(GPT2Config.from_preset(spec.preset, **extra)).to(device)
        else:
            model = load_model(spec.model, device=device, prepack=False, **hub)  # training: no decode kernels
            tokenizer = load_tokenizer(spec.model, model.config.vocab_size, **hub)
    if model is not None:
        check_block_size(spec, model)  # before the data is tokenized
    data = training_data(spec, tokenizer, chat_prompt)
    if model is None:  # a new classifier: its head has a row per label of the data
        from gpt2lite.models.classifier import GPT2ForSequenceClassification

        if spec.preset:
            # transformers' classifier finds each row's last token by the pad id: the tokenizer's end token.
            config = GPT2Config.from_preset(spec.preset, labels=data.labels, pad_token_id=tokenizer.eot_token)
            model = GPT2ForSequenceClassification(config).to(device)
        else:
            model = load_model(spec.model, kind="classifier", labels=data.labels, device=device, **hub)
        check_block_size(spec, model)
    if tokenizer.n_vocab > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.n_vocab} tokens, the model's vocabulary "
                         f"{model.config.vocab_size}")
    if lora is not None:
        from gpt2lite.transforms.lora import add_lora

        add_lora(model, lora)
    if save_tokenizer and not spec.resume:
        tokenizer.save(tokenizer_dir)
    return model, data, tokenizer


def model_from_config(spec: RunSpec, config: dict[str, Any]) -> Any:
    """A model of the kind and shape a checkpoint's ``model_config`` describes (its weights come after)."""
    from gpt2lite.models.config import GPT2Config

    if spec.arch != "gpt2":
        from gpt2lite.models.recurrent import RecurrentConfig, RecurrentLM

        return RecurrentLM(RecurrentConfig.from_dict(config))
    if spec.task == "classify":
        from gpt2lite.models.classifier import GPT2ForSequenceClassification

        return GPT2ForSequenceClassification(GPT2Config.from_dict(config))
    from gpt2lite.models.gpt2 import GPT2

    return GPT2(GPT2Config.from_dict(config))


def training_data(spec: RunSpec, tokenizer: Any, chat_prompt: ChatPrompt | None = None) -> Any:
    """The data ``spec.task`` trains on, tokenized with ``tokenizer``; ``chat_prompt`` renders chat rows (sft)."""
    import os

    if spec.task == "classify":
        from gpt2lite.training.labeled import load_labeled

        labels = [n.strip() for n in spec.labels.split(",")] if spec.labels else None
        return load_labeled(spec.data, tokenizer=tokenizer, labels=labels, text_column=spec.text_column,
                            label_column=spec.label_column, val_path=spec.val_data, val_fraction=spec.val_fraction,
                            seed=spec.seed)
    if spec.task == "sft":
        from gpt2lite.training.instructions import load_instructions

        render = None if chat_prompt is None else lambda messages: chat_prompt(tokenizer, messages)
        return load_instructions(spec.data, tokenizer, chat_prompt=render, val_fraction=spec.val_fraction,
                                 seed=spec.seed)
    from gpt2lite.training.data import TokenData, is_prepared, prepare_data

    if is_prepared(spec.data):  # tokens from gpt2lite prepare: read as they are
        data = TokenData.open(spec.data)
        data.check_tokenizer(tokenizer)
        return data
    return prepare_data(spec.data, os.path.join(spec.out, "data"), tokenizer=tokenizer, errors=spec.encoding_errors,
                        val_fraction=spec.val_fraction, text_column=spec.text_column, workers=spec.workers)


def check_block_size(spec: RunSpec, model: Any) -> None:
    if spec.block_size is not None:  # before the data is tokenized; train() asks the same of its config
        check_window(spec.block_size, model.config.n_positions, "block_size")
