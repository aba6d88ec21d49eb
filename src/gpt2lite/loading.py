"""The one loading layer: a checkpoint, its LoRA adapter, quantization and prepacking, combined here only.

``load_model`` finds what a path or hub id holds (a GPT-2, a classifier, a
recurrent model, or a LoRA adapter that names its base) and builds it in this
order: the checkpoint (``models/``), the adapter (``transforms/peft.py``), merging
it, quantizing, prepacking (``transforms/``). ``load_tokenizer`` finds the
tokenizer that belongs beside a model, and ``save_model`` writes any of them back.
``TextGenerator``, ``TextClassifier``, the trainer and the command line all load
and save through here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from gpt2lite.errors import CheckpointError, ModelNotFoundError
from gpt2lite.generation.options import GenerationOptions
from gpt2lite.io.files import read_json, write_json
from gpt2lite.io.hub import HUB_ALIASES, resolve_files
from gpt2lite.models.classifier import GPT2ForSequenceClassification
from gpt2lite.models.gpt2 import GPT2
from gpt2lite.models.recurrent import RecurrentLM, is_recurrent_checkpoint
from gpt2lite.models.weights import resolve_dtype
from gpt2lite.tokenizers.bpe import Tokenizer
from gpt2lite.tokenizers.char import CHAR_TOKENIZER_FILE, CharTokenizer
from gpt2lite.tokenizers.hf import HFTokenizer
from gpt2lite.tokenizers.protocol import TokenizerProtocol
from gpt2lite.transforms.lora import has_lora, merge_lora
from gpt2lite.transforms.native import KERNEL_ROUTES, KernelRoute, use_kernels
from gpt2lite.transforms.packed import can_prepack
from gpt2lite.transforms.packed import prepack as prepack_model
from gpt2lite.transforms.peft import adapter_base, adapter_labels, load_adapter, save_adapter
from gpt2lite.transforms.quantize import QUANTIZE_MODES, QuantizeMode, is_quantized
from gpt2lite.transforms.quantize import quantize as quantize_model

__all__ = ["ModelKind", "load_chat_template", "load_generation_defaults", "load_model", "load_tokenizer", "model_kind",
           "save_model"]

ModelKind = Literal["lm", "classifier"]


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    kind: ModelKind = "lm",
    labels: list[str] | tuple[str, ...] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    adapter: str | os.PathLike[str] | None = None,
    merge_adapter: bool = False,
    quantize: QuantizeMode | None = None,
    prepack: bool | None = None,
    kernels: KernelRoute = "native",
) -> nn.Module:
    """Load a model for inference or training: ``GPT2``, ``GPT2ForSequenceClassification`` or ``RecurrentLM``.

    ``name_or_path`` is a hub id (``"gpt2"``), a directory, a sharded directory, a
    bare ``.safetensors`` file, or a directory holding only a LoRA adapter (its
    base model is loaded under it). ``kind="classifier"`` loads a sequence
    classifier; ``labels`` puts a new head for those classes on a language model.
    ``adapter`` is a LoRA adapter directory in the PEFT format (ours or ``peft``'s);
    ``merge_adapter=True`` folds it into the weights (inference). ``quantize="int8"``
    (or ``"int4"``, ``"f16"``) stores the linear layers in int8 (int4: groups of 64 inputs
    share a scale; f16: float16 weights; inference only; adapters are merged first);
    ``prepack`` picks a float32 CPU model's product kernels: by default (None) each
    weight shape's one-row product (batch-1 decoding) takes the kernel measured
    fastest on this CPU, with one copy of the weights (``prepack(copy=False, batch="mkl")``);
    ``True`` also adds oneDNN-reordered weights for batches (twice the weight
    memory); ``False`` keeps ``F.linear`` everywhere. ``kernels="native"`` lets
    batch-1 float32 and int8 CPU products take gpt2lite's own compiled kernels
    (``transforms/native.py``; PyTorch's routes where none can be built),
    ``"torch"`` keeps PyTorch's routes only. Example::

        model = load_model("gpt2", quantize="int8")
    """
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES} or None, got {quantize!r}")
    if kernels not in KERNEL_ROUTES:
        raise ValueError(f"kernels must be one of {KERNEL_ROUTES}, got {kernels!r}")
    if kind not in ("lm", "classifier"):
        raise ValueError(f"kind must be 'lm' or 'classifier', got {kind!r}")
    if adapter is None and (base := adapter_base(name_or_path)) is not None:
        name_or_path, adapter = base, name_or_path
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)

    model: nn.Module
    if is_recurrent_checkpoint(name_or_path):
        if quantize is not None or adapter is not None or prepack or kind != "lm":
            raise ValueError(f"{str(name_or_path)!r} is a recurrent language model; classification heads, "
                             "quantize, prepack and LoRA adapters are for GPT-2 models")
        return RecurrentLM.from_pretrained(name_or_path, device=device, dtype=resolve_dtype(dtype))
    if kind == "classifier":
        if adapter is not None and labels is None:
            labels = adapter_labels(adapter)
        model = GPT2ForSequenceClassification.from_pretrained(name_or_path, labels=labels, device=device,
                                                              dtype=dtype, **hub)
    else:
        if labels is not None:
            raise ValueError("labels are for a classifier: load_model(..., kind='classifier', labels=[...])")
        model = GPT2.from_pretrained(name_or_path, device=device, dtype=dtype, **hub)
    if adapter is not None:
        load_adapter(model, adapter)
        if merge_adapter or quantize:
            merge_lora(model)
    if quantize:
        quantize_model(model, quantize)
    if prepack or (prepack is None and kind == "lm" and can_prepack(model)):
        # The default keeps MKL for batches, as transformers computes them: oneDNN's batched products
        # round differently, and greedy tokens then part from transformers' at near ties (a random
        # 124M: from token 102 of 128). prepack=True opts into oneDNN's reordered copies, which
        # batches then take whatever `batch` says.
        prepack_model(model, copy=bool(prepack), batch="mkl", kernels=kernels)
    return use_kernels(model, kernels)


def save_model(model: nn.Module, directory: str | os.PathLike[str], *,
               tokenizer: TokenizerProtocol | None = None) -> Path:
    """Write a model where ``load_model`` (and ``transformers``, ``peft``, vLLM, llama.cpp) reads it; the directory.

    A GPT-2 or classifier is written in the hub layout with a ``generation_config.json``;
    one with LoRA adapters writes only them (and a classifier's head), in the PEFT
    format; a quantized model is refused (save the float model, quantize when
    loading). ``tokenizer``'s files go beside it: GPT-2's ``vocab.json`` +
    ``merges.txt``, another vocabulary's ``tokenizer.json``, with
    ``tokenizer_config.json`` and ``special_tokens_map.json``.
    """
    if is_quantized(model):
        raise ValueError("saving a quantized model is not supported: save the float model and load it "
                         "with quantize='int8', 'int4' or 'f16'")
    if has_lora(model):
        directory = save_adapter(model, directory)
    else:
        directory = Path(model.save_pretrained(directory))
        config = model.config
        settings = {"bos_token_id": getattr(config, "bos_token_id", None), "eos_token_id": config.eos_token_id,
                    "pad_token_id": getattr(config, "pad_token_id", None)}
        write_json(directory / "generation_config.json", {k: v for k, v in settings.items() if v is not None})
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def load_tokenizer(
    name_or_path: str | os.PathLike[str], vocab_size: int, *, revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None, local_files_only: bool = False, cjk_spaces: bool = False,
) -> TokenizerProtocol:
    """The tokenizer that belongs beside a model, found in this order:

    1. a character vocabulary (``CharTokenizer``);
    2. GPT-2's own vocabulary (a hub alias, a bare weights file, or ``vocab.json`` +
       ``merges.txt`` equal to GPT-2's): the exact pure-Python BPE;
    3. a ``tokenizer.json``, or a BERT ``vocab.txt`` (the Chinese GPT-2s): Hugging
       Face's ``tokenizers`` (the ``tokenizers`` extra);
    4. another ``vocab.json`` + ``merges.txt`` (or OpenAI's ``encoder.json`` + ``vocab.bpe``): the pure-Python BPE;
    5. no files beside a model with GPT-2's vocabulary (or one padded to 50304): GPT-2's.

    ``cjk_spaces`` keeps the spaces a WordPiece vocabulary's text has between CJK characters (``HFTokenizer``).
    """
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    # GPT-2's 50257 tokens, or them padded to a multiple of 64 or 128 rows (nanoGPT's 50304).
    gpt2_vocab = 50257 <= vocab_size < 50257 + 128
    if os.path.isdir(name_or_path):
        chars = CharTokenizer.load(name_or_path)
        if chars is not None:
            _check_characters(chars, Path(name_or_path))
            return chars
    if gpt2_vocab and (str(name_or_path) in HUB_ALIASES or os.path.isfile(name_or_path)):
        return Tokenizer.gpt2()  # the published GPT-2 models all use these exact files
    try:
        bpe = Tokenizer.from_pretrained(name_or_path, **hub)
    except ModelNotFoundError:
        bpe = None
    if bpe is not None and bpe.n_vocab == 50257 and bpe.fingerprint == Tokenizer.gpt2().fingerprint:
        return Tokenizer.gpt2()
    for files in (("tokenizer.json",), ("vocab.txt",)):
        try:
            (found,) = resolve_files(name_or_path, [files], what=files[0], **hub)
        except ModelNotFoundError:
            continue
        for extra in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
            with contextlib.suppress(ModelNotFoundError):  # fetched from the hub beside it, when there
                resolve_files(name_or_path, [(extra,)], what=extra, **hub)
        config_file, config = _model_settings(name_or_path, **hub)
        eos = config.get("eos_token_id")
        hf = HFTokenizer.from_directory(found.parent, eos_token_id=eos, cjk_spaces=cjk_spaces)
        if hf.eot_token is None:
            beside = (f"{str(config_file)!r} has eos_token_id={eos!r}, not one of its {hf.n_vocab} token ids"
                      if config_file is not None else "no config.json beside it has an eos_token_id")
            raise CheckpointError(f"{str(found)!r} names no end token (eos_token, sep_token or pad_token in "
                                  f"tokenizer_config.json) and {beside}: nothing could end a text or a document")
        return hf
    if bpe is not None:
        return bpe
    if gpt2_vocab:
        return Tokenizer.gpt2()
    raise ModelNotFoundError(f"{str(name_or_path)!r} holds no tokenizer files (char_vocab.json, tokenizer.json, "
                             "vocab.txt, vocab.json + merges.txt) for its vocabulary of "
                             f"{vocab_size} tokens")


def model_kind(name_or_path: str | os.PathLike[str], *, local_files_only: bool = False) -> ModelKind:
    """What a folder or hub id holds: ``"classifier"`` for a sequence classifier or its LoRA adapter, else ``"lm"``."""
    _, settings = _model_settings(name_or_path, local_files_only=local_files_only)
    if any("ForSequenceClassification" in str(a) for a in settings.get("architectures") or ()):
        return "classifier"
    adapter = Path(name_or_path).expanduser() / "adapter_config.json"
    if adapter.is_file():
        adapter_settings = read_json(adapter)
        if isinstance(adapter_settings, dict) and adapter_settings.get("task_type") == "SEQ_CLS":
            return "classifier"
    return "lm"


def _model_settings(name_or_path: str | os.PathLike[str], **hub: Any) -> tuple[Path | None, dict[str, Any]]:
    """The ``config.json`` beside a tokenizer and its settings; (None, {}) where there is none."""
    if os.path.isfile(name_or_path):
        return None, {}
    try:
        (path,) = resolve_files(name_or_path, [("config.json",)], what="config.json", **hub)
    except ModelNotFoundError:
        return None, {}
    settings = read_json(path)
    return path, settings if isinstance(settings, dict) else {}


def _check_characters(chars: CharTokenizer, directory: Path) -> None:
    """Refuse a character vocabulary that is not the one the model beside it was trained with.

    Its ids are positions in a list of characters: another list of the same
    characters decodes the model's tokens into other text, and a shorter one
    turns the model's end token into a character, so that text ends at once.
    """
    config_file, config = _model_settings(directory)
    if config_file is None:
        return  # a vocabulary on its own (a training run's tokenizer folder)
    source = directory / CHAR_TOKENIZER_FILE
    if not source.is_file():
        source = directory / "tokenizer.json"  # the name earlier versions wrote
    size, eos = config.get("vocab_size"), config.get("eos_token_id")
    if isinstance(size, int) and size != chars.n_vocab:
        raise CheckpointError(f"{str(source)!r} holds {len(chars.chars)} characters and an end token, but the model "
                              f"in {str(config_file)!r} has vocab_size={size}: the vocabulary is another model's")
    if isinstance(eos, int) and eos != chars.eot_token:
        raise CheckpointError(f"{str(source)!r} ends texts with token {chars.eot_token}, but the model in "
                              f"{str(config_file)!r} has eos_token_id={eos}: the vocabulary is another model's")


def load_chat_template(
    name_or_path: str | os.PathLike[str], *, revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None, local_files_only: bool = False,
) -> str | None:
    """The Jinja chat template beside a model, as transformers finds it; None when the model has none.

    ``chat_template.jinja`` wins over the ``chat_template`` entry of
    ``tokenizer_config.json``; of a list of named templates, the one named
    ``default`` is taken. A hub repo whose files cannot be reached has none.
    """
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    if os.path.isfile(name_or_path):
        return None  # a bare weights file has no tokenizer files beside it
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        try:
            (path,) = resolve_files(name_or_path, [(name,)], what=name, **hub)
        except ModelNotFoundError:
            continue
        if name.endswith(".jinja"):
            try:
                return path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise CheckpointError(f"{str(path)!r} is not UTF-8 text: {exc}") from None
        settings = read_json(path)
        if not isinstance(settings, dict):
            raise CheckpointError(f"{str(path)!r} holds a JSON {type(settings).__name__}, not an object of settings")
        template = settings.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise CheckpointError(f"{str(path)!r}: chat_template must be a string or a list of named templates")
        return template
    return None


# generation_config.json's fields that GenerationOptions has under the same names and meaning. The token
# ids (eos, pad, bos) stay the tokenizer's, as before, and num_return_sequences is left out: it would turn
# every call's one text into a list.
_GENERATION_FIELDS = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p", "typical_p",
                      "epsilon_cutoff", "eta_cutoff", "repetition_penalty", "no_repeat_ngram_size", "num_beams",
                      "length_penalty", "early_stopping", "bad_words_ids")


def load_generation_defaults(
    name_or_path: str | os.PathLike[str], *, revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None, local_files_only: bool = False,
) -> GenerationOptions:
    """The decoding defaults of a model's ``generation_config.json``, as transformers' ``generate`` takes them.

    Only the fields the file holds change ``GenerationOptions()``: ``temperature``,
    ``top_k``, ``top_p``, ``max_new_tokens``, ``repetition_penalty``, ``num_beams`` ...;
    ``do_sample: false``, or beam search without ``do_sample``, decodes greedily
    (temperature 0). A file of token ids only (what ``save_model`` writes) changes nothing.
    """
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    if os.path.isfile(name_or_path):
        return GenerationOptions()  # a bare weights file has nothing beside it
    try:
        (path,) = resolve_files(name_or_path, [("generation_config.json",)], what="generation_config.json", **hub)
    except ModelNotFoundError:
        return GenerationOptions()
    settings = read_json(path)
    if not isinstance(settings, dict):
        raise CheckpointError(f"{str(path)!r} holds a JSON {type(settings).__name__}, not an object of settings")
    changes = {k: settings[k] for k in _GENERATION_FIELDS if settings.get(k) is not None}
    sample, beams = settings.get("do_sample"), changes.get("num_beams", 1)
    if sample is not None and not isinstance(sample, bool):
        raise CheckpointError(f"{str(path)!r}: do_sample must be true or false, got {sample!r}")
    beam_search = isinstance(beams, int) and beams > 1
    if sample is True and beam_search:
        raise CheckpointError(f"{str(path)!r}: do_sample with num_beams={beams} is beam sampling, which gpt2lite "
                              "does not do; set do_sample to false or num_beams to 1")
    if sample is False or (sample is None and beam_search):
        changes["temperature"] = 0.0  # transformers samples only with do_sample: true (its default is false)
    try:
        return GenerationOptions(**changes)
    except ValueError as exc:
        raise CheckpointError(f"{str(path)!r}: {exc}") from None
