"""``gpt2lite finetune``: a training run from flags, recorded in OUT/run.json so that ``--resume`` can go on."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from gpt2lite.cli.common import check_device

__all__ = ["add_finetune"]


# The flags that set a run up, with their defaults: OUT/run.json records them, and --resume takes them
# from there (a flag given again must agree). None in the parser marks a flag not given.
_RUN_FLAGS: dict[str, Any] = {
    "task": "lm", "data": None, "model": None, "preset": None, "arch": "gpt2", "n_embd": 256, "n_layer": 2,
    "dropout": 0.2, "char": False, "tokenizer": None, "text_column": "text", "label_column": "label",
    "labels": None, "val_data": None, "val_fraction": None, "encoding_errors": "strict", "lora_rank": None,
    "lora_alpha": None, "lora_dropout": 0.0, "lora_targets": "c_attn", "batch_size": 8, "grad_accum": 1,
    "block_size": None, "lr": None, "min_lr": None, "warmup_steps": None, "weight_decay": 0.1, "grad_clip": 1.0,
    "seed": 0, "autocast": None, "freeze_blocks": 0, "gradient_checkpointing": False,
}
# Recorded too, but a resumed run may change them: a longer schedule, other evaluation and save intervals,
# other records (a resumed run keeps its samples, TensorBoard and early stopping unless told otherwise).
_RUN_CHANGEABLE: dict[str, Any] = {"steps": 1000, "eval_interval": 100, "save_interval": 100, "early_stopping": 0,
                                   "sample_every": 0, "sample_prompt": "", "sample_tokens": 40, "tensorboard": False}
WARMUP_FRACTION = 0.05  # --warmup-steps by default: this share of --steps (at least 1), as nanoGPT sizes it
_PATH_FLAGS = ("data", "val_data", "tokenizer")  # recorded as absolute paths: a resume may run elsewhere


def add_finetune(commands: Any) -> None:
    """The ``finetune`` command's flags: data, model, schedule, records, classification, LoRA."""
    ft = commands.add_parser("finetune", help="train a model (or fine-tune a checkpoint) on your text")
    flag = ft.add_argument
    flag("--task", choices=["lm", "classify", "sft"], default=None,
         help="lm: language modeling on text (default); classify: a classifier on labeled CSV/JSONL; "
              "sft: instruction tuning on JSONL prompt/completion (or messages) rows, the loss on completions")
    flag("--data", default=None,
         help="lm: a text file, a folder of text files, or a .csv/.jsonl corpus of one document per row; "
              "classify: a .csv/.tsv/.jsonl file; sft: a .jsonl file")
    flag("--out", required=True, help="output directory: data cache, checkpoint.pt, metrics.jsonl, best/, final/")
    start = ft.add_mutually_exclusive_group()
    start.add_argument("--model", default=None, help="checkpoint to fine-tune: hub id or local path (default: gpt2)")
    start.add_argument("--preset", default=None, help="train from scratch from a config preset (gpt2, ..., tiny)")
    flag("--arch", choices=["gpt2", "rnn", "lstm", "gru"], default=None,
         help="gpt2 (default), or a recurrent model trained from scratch")
    flag("--n-embd", type=int, default=None, help="recurrent models: hidden width (default: 256)")
    flag("--n-layer", type=int, default=None, help="recurrent models: layers (default: 2)")
    flag("--dropout", type=float, default=None, help="recurrent models: dropout (default: 0.2)")
    flag("--char", action="store_true", default=None,
         help="a character-level vocabulary read off the data (from scratch: --preset or --arch)")
    flag("--tokenizer", default=None,
         help="from scratch: a tokenizer folder (gpt2lite train-tokenizer's --out) instead of GPT-2's")
    flag("--text-column", default=None, help="column (CSV) or key (JSONL) of the text (default: text)")
    flag("--val-fraction", type=float, default=None,
         help="share of --data held out for validation (default: 0.05 for lm, 0.1 otherwise)")
    flag("--encoding-errors", choices=["strict", "replace"], default=None,
         help="what to do with text that is not UTF-8 (default: strict, an error)")
    flag("--workers", type=int, default=1,
         help="lm on raw text: processes tokenizing it, as gpt2lite prepare's --workers, the same tokens "
              "(default: 1; a pool costs seconds to start, so it pays on large corpora)")
    sched = ft.add_argument_group("schedule")
    sched.add_argument("--steps", type=int, default=None,
                       help="optimizer steps (default: 1000; a resumed run: its own, or longer)")
    sched.add_argument("--batch-size", type=int, default=None, help="windows per micro-batch per process (default: 8)")
    sched.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default: 1)")
    sched.add_argument("--block-size", type=int, default=None, help="tokens per window (default: min(context, 256))")
    sched.add_argument("--lr", type=float, default=None,
                       help="peak learning rate (default: 6e-4 from scratch, 1e-4 fine-tuning, 1e-3 LoRA)")
    sched.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: lr / 10)")
    sched.add_argument("--warmup-steps", type=int, default=None,
                       help=f"steps of linear learning-rate warm-up (default: {WARMUP_FRACTION * 100:.0f}%% of "
                            "--steps)")
    sched.add_argument("--weight-decay", type=float, default=None, help="(default: 0.1)")
    sched.add_argument("--grad-clip", type=float, default=None, help="(default: 1.0)")
    sched.add_argument("--seed", type=int, default=None, help="(default: 0)")
    sched.add_argument("--autocast", choices=["bf16", "fp16"], default=None, help="mixed precision on CUDA")
    sched.add_argument("--compile", action="store_true", help="torch.compile the model")
    sched.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP")
    sched.add_argument("--peak-flops", type=float, default=None,
                       help="the device's peak FLOP/s, for MFU (default: known for A100/H100/H200 in bf16)")
    runs = ft.add_argument_group("the run's folder and records")
    runs.add_argument("--resume", action="store_true",
                      help="continue the run in OUT with its own model, tokenizer, data and settings")
    runs.add_argument("--overwrite", action="store_true", help="replace the run OUT holds (default: refuse)")
    runs.add_argument("--eval-interval", type=int, default=None, help="steps between evaluations (default: 100)")
    runs.add_argument("--save-interval", type=int, default=None, help="steps between checkpoints (default: 100)")
    runs.add_argument("--early-stopping", type=int, default=None, metavar="PATIENCE",
                      help="stop after PATIENCE evaluations without a lower validation loss (default: 0, never)")
    runs.add_argument("--sample-every", type=int, default=None, metavar="N",
                      help="generate a sample every N steps, shown and written to metrics.jsonl (default: 0, never)")
    runs.add_argument("--sample-prompt", default=None, help="what the samples continue (default: from the start)")
    runs.add_argument("--sample-tokens", type=int, default=None, help="tokens per sample (default: 40)")
    runs.add_argument("--tensorboard", action="store_true", default=None,
                      help="also log to OUT/tensorboard (pip install tensorboard)")
    cls = ft.add_argument_group("classification (--task classify)")
    cls.add_argument("--labels", default=None,
                     help="class names in id order, comma-separated (default: the sorted names in the data)")
    cls.add_argument("--label-column", default=None, help="column (CSV) or key (JSONL) of the label (default: label)")
    cls.add_argument("--val-data", default=None, help="a separate validation file (default: hold out --val-fraction)")
    lora = ft.add_argument_group("LoRA and memory")
    lora.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank, not the model")
    lora.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: 2 x rank)")
    lora.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapters' input (default: 0)")
    lora.add_argument("--lora-targets", default=None,
                      help="comma-separated layers among c_attn, c_proj, c_fc (default: c_attn)")
    lora.add_argument("--freeze-blocks", type=int, default=None,
                      help="keep the first N blocks and the embeddings fixed")
    lora.add_argument("--gradient-checkpointing", action="store_true", default=None,
                      help="recompute activations in backward: less memory, ~30%% more time")
    flag("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    flag("--offline", action="store_true", help="use only files already in the hub cache")
    ft.set_defaults(run=_finetune)


def _finetune(args: argparse.Namespace) -> int:
    import importlib.util
    import os

    import torch

    from gpt2lite.training.setup import RunSpec, training_setup
    from gpt2lite.training.trainer import TrainConfig, check_output_dir, check_run_folder, train

    check_run_folder(args.out, resume=args.resume, overwrite=args.overwrite)  # before anything is read or written
    _run_settings(args)
    recurrent = args.arch != "gpt2"
    if recurrent and (args.model or args.preset):
        raise ValueError(f"--arch {args.arch} trains from scratch: --model and --preset are for GPT-2")
    if recurrent and (args.task != "lm" or args.lora_rank is not None):
        raise ValueError(f"--arch {args.arch} trains language models from scratch: --task classify|sft and LoRA "
                         "are for GPT-2")
    scratch = args.preset is not None or recurrent
    if args.char and (not scratch or args.task != "lm"):
        raise ValueError("--char builds a new vocabulary: train a language model from scratch with --preset or "
                         "--arch rnn|lstm|gru")
    if args.tokenizer is not None and (not scratch or args.char):
        raise ValueError("--tokenizer gives a model trained from scratch (--preset or --arch) its vocabulary; a "
                         "fine-tuned --model keeps its own")
    if args.lora_rank is not None and scratch:
        raise ValueError("--lora-rank adapts a trained model: give --model, not --preset")
    if args.sample_every and args.task == "classify":
        raise ValueError("--sample-every shows generated text: it is for language models, not --task classify")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if not scratch:
        args.model = args.model or "gpt2"
    if args.lr is None:
        args.lr = 6e-4 if scratch else (1e-3 if args.lora_rank else 1e-4)
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    if args.val_fraction is None:
        args.val_fraction = 0.05 if args.task == "lm" else 0.1
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, block_size=args.block_size,
        lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, eval_interval=args.eval_interval, save_interval=args.save_interval, seed=args.seed,
        autocast=args.autocast, compile=args.compile, freeze_blocks=args.freeze_blocks,
        gradient_checkpointing=args.gradient_checkpointing, early_stopping=args.early_stopping,
        sample_every=args.sample_every, sample_prompt=args.sample_prompt, sample_tokens=args.sample_tokens,
        tensorboard=args.tensorboard, peak_flops=args.peak_flops, fsdp=args.fsdp,
    )  # bad values fail here, before any data is read
    lora = _lora_config(args)
    if not os.path.exists(args.data):
        raise FileNotFoundError(f"no such file or folder: {args.data!r}")
    check_output_dir(args.out, resume=args.resume, overwrite=args.overwrite)
    device = check_device(args.device)
    # Under torchrun each process learns its rank from the environment: join the group.
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    try:
        rank = torch.distributed.get_rank() if distributed else 0
        spec = RunSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RunSpec)})
        model, data, tokenizer = training_setup(spec, device, lora, save_tokenizer=rank == 0,
                                                chat_prompt=_chat_prompt(args))
        settings = {name: getattr(args, name) for name in (*_RUN_FLAGS, *_RUN_CHANGEABLE)}
        result = train(model, data, args.out, config, resume=args.resume, overwrite=args.overwrite,
                       tokenizer=tokenizer, settings=settings)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if rank == 0:
        _report(result, lora is not None, args)
        from gpt2lite.training.flops import peak_flops

        if args.arch == "gpt2" and config.peak_flops is None and peak_flops(device) is None:
            print(f"note: MFU unknown (null in metrics.jsonl): the peak FLOP/s of {device} is not known; give "
                  "--peak-flops", file=sys.stderr)
    return 0


def _run_settings(args: argparse.Namespace) -> None:
    """Fill the run's settings: from OUT/run.json with --resume (flags given again must agree), else the flags."""
    import os

    from gpt2lite.io.files import read_json
    from gpt2lite.training.trainer import CHECKPOINT, RUN_RECORD

    given = {name: getattr(args, name) for name in (*_RUN_FLAGS, *_RUN_CHANGEABLE) if getattr(args, name) is not None}
    for name in (*_PATH_FLAGS, "model"):
        if name in given and (name != "model" or os.path.exists(given[name])):
            given[name] = os.path.abspath(given[name])
    values = {**_RUN_FLAGS, **_RUN_CHANGEABLE}
    record = os.path.join(args.out, RUN_RECORD)
    if args.resume and os.path.isfile(record):
        recorded = read_json(record)
        if not isinstance(recorded, dict):
            raise ValueError(f"{record!r} holds no settings object: it was not written by gpt2lite finetune")
        values.update({name: value for name, value in recorded.items() if name in values})
        differ = [f"--{name.replace('_', '-')} {value!r} (the run has {values[name]!r})"
                  for name, value in given.items() if name in _RUN_FLAGS and values[name] != value]
        if differ:
            raise ValueError(f"--resume continues the run with the settings in {record!r}; these flags disagree: "
                             f"{'; '.join(differ)}. Drop them, or start a new run (--overwrite, or another --out)")
    elif args.resume and not os.path.isfile(os.path.join(args.out, CHECKPOINT)):
        raise FileNotFoundError(f"nothing to resume: {args.out!r} holds no run (no {RUN_RECORD}, no {CHECKPOINT})")
    if args.resume and os.path.isfile(record) and not os.path.isfile(os.path.join(args.out, CHECKPOINT)):
        raise FileNotFoundError(
            f"nothing to resume: the run in {args.out!r} stopped before its first checkpoint (written every "
            f"--save-interval steps, {values['save_interval']} here), so {CHECKPOINT} does not exist. Start it again "
            f"with its flags (recorded in {record!r}) and --overwrite")
    # Otherwise a new run, or one started before runs recorded their settings: the flags say it all.
    values.update(given)
    if values["warmup_steps"] is None:  # recorded as the number, so that a longer resumed run keeps its schedule
        values["warmup_steps"] = max(1, round(WARMUP_FRACTION * values["steps"]))
    if values["data"] is None:
        raise ValueError("--data is required: the text (or labeled or instruction file) to train on")
    for name, value in values.items():
        setattr(args, name, value)


def _report(result: Any, lora: bool, args: argparse.Namespace) -> None:
    """What a finished run prints: the last evaluation, where the weights went, what was skipped."""
    if result.val_losses:
        step, val = result.val_losses[-1]
        line = f"step {step}: train loss {result.losses[-1]:.4f}, validation loss {val:.4f}"
        if result.val_metrics:
            metrics = result.val_metrics[-1][1]
            line += f", accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}"
        print(line)
    if result.stopped_early:
        print(f"stopped early: no lower validation loss in {args.early_stopping} evaluations")
    if result.best_dir is not None:
        best = dict(result.val_losses).get(result.best_step)
        print(f"lowest validation loss{f' {best:.4f}' if best is not None else ''} at step {result.best_step}: "
              f"saved to {result.best_dir}")
    if result.final_dir is not None:
        print(f"saved {'LoRA adapter (PEFT format)' if lora else 'model'} to {result.final_dir}")
    if result.plot is None:
        print("note: loss.png not drawn: pip install matplotlib (metrics.jsonl has the numbers)", file=sys.stderr)


def _lora_config(args: argparse.Namespace) -> Any:
    """The ``LoraConfig`` the LoRA flags ask for, or None without ``--lora-rank``."""
    if args.lora_rank is None:
        return None
    from gpt2lite.transforms.lora import LoraConfig

    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    return LoraConfig(r=args.lora_rank, lora_alpha=alpha, lora_dropout=args.lora_dropout, target_modules=targets)


def _chat_prompt(args: argparse.Namespace) -> Any:
    """How sft rows given as chats become prompts: the model's chat template, read only for data with chats."""
    from gpt2lite.loading import load_chat_template
    from gpt2lite.text.chat import ChatTemplate

    templates: list[Any] = []

    def render(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
        if not templates:
            source = load_chat_template(args.model, local_files_only=args.offline) if args.model else None
            templates.append(ChatTemplate.for_tokenizer(source, tokenizer))
        return templates[0].render(messages)

    return render
