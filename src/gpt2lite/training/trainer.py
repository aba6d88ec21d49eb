"""Training and fine-tuning: AdamW, warm-up then cosine decay, accumulation, clipping, exact resume.

One loop serves both objectives of ``objectives.py``, chosen by the data:
language modelling on a token stream (``prepare_data``; GPT-2 and the recurrent
models alike) and classification on labeled texts (``load_labeled``; a
``GPT2ForSequenceClassification``, with accuracy and macro-F1 at each evaluation).

Only parameters with ``requires_grad`` train (LoRA adapters, unfrozen blocks),
and only they get optimizer state.

Runs in one process or under ``torchrun`` with DistributedDataParallel: when
``torch.distributed`` is initialised, each process takes its share of every
global batch and DDP averages the gradients, so the update is the one a single
process would make on the whole batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gpt2lite.errors import CheckpointError, NonFiniteError
from gpt2lite.generation.context import check_window
from gpt2lite.generation.loop import generate
from gpt2lite.io.files import write_json
from gpt2lite.loading import save_model
from gpt2lite.models.gpt2 import GPT2
from gpt2lite.tokenizers.bpe import Tokenizer
from gpt2lite.tokenizers.protocol import TokenizerProtocol
from gpt2lite.training.card import write_model_card
from gpt2lite.training.checkpoint import load_training_checkpoint, save_training_checkpoint
from gpt2lite.training.data import TokenData
from gpt2lite.training.flops import flops_per_token, mfu, peak_flops
from gpt2lite.training.fsdp import full_state, load_full_state, plain_copy, shard_model
from gpt2lite.training.instructions import InstructionData
from gpt2lite.training.labeled import LabeledData
from gpt2lite.training.log import METRICS, PLOT, TENSORBOARD, RunLog, plot_losses
from gpt2lite.training.objectives import Classification, Objective, objective_for
from gpt2lite.transforms.quantize import is_quantized

__all__ = ["StepCallback", "TrainConfig", "TrainResult", "check_output_dir", "check_run_folder", "train"]

# Called after each step with the number of steps done and the step's record (metrics.jsonl's line for it).
StepCallback = Callable[[int, Mapping[str, Any]], None]

CHECKPOINT = "checkpoint.pt"
FINAL = "final"
BEST = "best"
RUN_RECORD = "run.json"  # the command line's settings (gpt2lite finetune)
# What a run writes into its folder: a folder that holds any of them holds a run.
RUN_FILES = (CHECKPOINT, FINAL, BEST, METRICS, PLOT, TENSORBOARD, RUN_RECORD)

# Settings that change what a run computes: a resumed run must use the values it started with.
# `steps` may change (the schedule then follows the new length); the rest only decides when to
# evaluate, save or show progress.
_RESUME_FIXED = (
    "batch_size", "grad_accum", "block_size", "lr", "min_lr", "warmup_steps", "weight_decay", "betas",
    "grad_clip", "seed", "autocast", "freeze_blocks", "gradient_checkpointing",
)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a run; checked when built.

    One optimizer step sees ``batch_size * grad_accum * world_size`` windows of
    ``block_size`` tokens. The learning rate rises linearly for ``warmup_steps``,
    then follows a cosine down to ``min_lr`` at ``steps``.
    """

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    block_size: int | None = None  # default: min(n_positions, 256)
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 100  # 0 evaluates only at the end
    eval_batches: int = 8
    save_interval: int = 100  # 0 saves only at the end
    seed: int = 0
    autocast: str | None = None  # "bf16" or "fp16", on CUDA
    compile: bool = False
    progress: bool = True
    freeze_blocks: int = 0  # GPT-2: keep the first N blocks (and the embeddings) fixed
    gradient_checkpointing: bool = False  # GPT-2: recompute activations in backward to save memory
    early_stopping: int = 0  # stop after this many evaluations without a better validation loss; 0: never
    sample_every: int = 0  # write a sample of generated text to the log every N steps; 0: never
    sample_prompt: str = ""  # what the samples continue ("" starts from the end token)
    sample_tokens: int = 40  # tokens per sample
    tensorboard: bool = False  # also log to out_dir/tensorboard (needs the tensorboard package)
    peak_flops: float | None = None  # FLOP/s of one device, for MFU; default: known GPUs' bf16 peak, else MFU unknown
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2), not DDP

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("warmup_steps", "eval_interval", "save_interval", "seed", "freeze_blocks", "early_stopping",
                     "sample_every", "sample_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.seed >= 2**64:
            raise ValueError(f"seed must be below 2**64, got {self.seed}")
        if self.block_size is not None and (
            isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1
        ):
            raise ValueError(f"block_size must be an int >= 1, got {self.block_size!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", *(f"betas[{i}]" for i in range(2))):
            value = self.betas[int(name[-2])] if name.startswith("betas") else getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr!r}, min_lr={self.min_lr!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must both be in [0, 1), got {self.betas!r}")
        if self.autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {self.autocast!r}")
        if self.peak_flops is not None and (isinstance(self.peak_flops, bool) or not isinstance(
                self.peak_flops, (int, float)) or not (math.isfinite(self.peak_flops) and self.peak_flops > 0)):
            raise ValueError(f"peak_flops must be a number of FLOP/s > 0, got {self.peak_flops!r}")
        if not isinstance(self.sample_prompt, str):
            raise ValueError(f"sample_prompt must be a str, got {self.sample_prompt!r}")

    def learning_rate(self, step: int) -> float:
        """The learning rate at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    """What a run did: the loss of every step, validation losses (and metrics), where the model was saved."""

    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    val_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # classification
    final_dir: Path | None = None
    best_dir: Path | None = None  # the weights of the lowest validation loss
    best_step: int | None = None
    stopped_early: bool = False  # early_stopping ended the run before `steps`
    samples: list[tuple[int, str]] = field(default_factory=list)
    plot: Path | None = None  # loss.png, or None without matplotlib


def check_run_folder(out_dir: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse to overwrite a run by accident: a folder holding one needs ``resume`` or ``overwrite``. Writes nothing."""
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise ValueError("resume continues the run in the output folder and overwrite replaces it: choose one")
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if found and not resume and not overwrite:
        raise FileExistsError(f"{str(out_dir)!r} holds a training run ({', '.join(found)}): resume it (--resume), "
                              "replace it (--overwrite), or choose another output folder")


def check_output_dir(out_dir: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False) -> None:
    """``check_run_folder``, then create ``out_dir`` if needed and make sure files can be written there."""
    check_run_folder(out_dir, resume=resume, overwrite=overwrite)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"output directory {str(out_dir)!r} is not writable: {exc}") from None


def _clear_run(out_dir: Path) -> None:
    """Remove what an earlier run left in ``out_dir`` (its data cache stays: it is checked before reuse)."""
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def train(
    model: nn.Module,
    data: TokenData | LabeledData | InstructionData,
    out_dir: str | os.PathLike[str],
    config: TrainConfig = TrainConfig(),
    *,
    resume: bool = False,
    overwrite: bool = False,
    objective: Objective | None = None,
    callbacks: Sequence[StepCallback] = (),
    tokenizer: TokenizerProtocol | None = None,
    settings: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data``; checkpoints go to ``out_dir``, the final model to ``out_dir/final``.

    ``objective`` says what is learned from ``data``: ``LanguageModeling(data)``
    (``data`` from ``prepare_data``), ``Classification(data)`` (from
    ``load_labeled``; a ``GPT2ForSequenceClassification`` with the data's labels)
    or ``InstructionTuning(data)`` (from ``load_instructions``: the loss on the
    completions); left out, it is the one ``data`` is made for. Each of
    ``callbacks`` is called after every step with the number of steps done and
    the step's record (``metrics.jsonl``'s line), after the checkpoint, so that
    one that stops the run (by raising) loses nothing. A model with LoRA adapters trains only them and saves them (PEFT
    format) as ``final``. ``tokenizer`` (the one the data was made with; default:
    GPT-2's, for a model with its vocabulary) is saved beside the model, so
    transformers' ``AutoTokenizer`` and vLLM read ``final`` too.

    The run records itself in ``out_dir``: ``metrics.jsonl`` (a line per step),
    ``loss.png`` (with matplotlib), TensorBoard (``tensorboard=True``), samples
    (``sample_every``); ``best/`` keeps the weights of the lowest validation loss,
    and ``early_stopping`` ends the run when validation stops improving.

    ``settings`` (JSON values: how the run was set up, such as the command
    line's flags) go to ``out_dir/run.json`` at the start of a new run, and again
    when one resumes, so what a resume changed is kept for the next. A folder
    that holds a run is refused unless ``resume`` or ``overwrite`` (which clears
    the earlier run first).

    ``resume=True`` continues from ``out_dir/checkpoint.pt`` exactly where it
    stopped (model, optimizer, schedule, step and random state); the settings
    that shape the run must be the ones it started with. The global RNG is
    seeded with ``config.seed``: dropout draws from it. A loss that turns NaN or
    infinite stops the run with ``NonFiniteError``, keeping the last checkpoint.
    """
    out_dir = Path(out_dir)
    if objective is None:
        objective = objective_for(data)
    elif objective.data is not data:
        raise ValueError(f"the objective ({type(objective).__name__}) holds other data than the data passed to train()")
    block = _check_run(model, objective, config)
    _set_trainable(model, config)
    checkpoint_path = out_dir / CHECKPOINT
    if resume and not checkpoint_path.is_file():
        raise FileNotFoundError(f"nothing to resume: {str(checkpoint_path)!r} does not exist (a run that stopped "
                                "before its first checkpoint, every save_interval steps, starts again with "
                                "overwrite=True)")
    if tokenizer is None and 50257 <= model.config.vocab_size < 50257 + 128:
        tokenizer = Tokenizer.gpt2()
    if config.sample_every and (tokenizer is None or isinstance(objective, Classification)):
        raise ValueError("samples (sample_every) need a language model and its tokenizer (tokenizer=)")
    distributed, rank, world = _distributed()
    if config.fsdp and not distributed:
        raise ValueError("fsdp shards the model across processes: run under torchrun (torch.distributed initialised)")
    if config.fsdp and config.sample_every:
        raise ValueError("samples (sample_every) are generated by one process; with fsdp every process holds only "
                         "a shard: sample from the saved model instead")
    if rank == 0:
        check_output_dir(out_dir, resume=resume, overwrite=overwrite)
        if overwrite:
            _clear_run(out_dir)
        if settings is not None and not resume:
            write_json(out_dir / RUN_RECORD, dict(settings))
    _own_parameters(model)
    run = _Run(model, objective, config, block, distributed, rank, world)
    result = TrainResult()
    best = _Best(out_dir / BEST, tokenizer)
    start = run.restore(checkpoint_path, result, best) if resume else 0
    if resume and settings is not None and rank == 0:  # once the checkpoint is known to fit
        write_json(out_dir / RUN_RECORD, dict(settings))  # what this resume changed (steps, intervals) is kept
    saved = start if resume else None  # the step of the checkpoint on disk
    log = RunLog(out_dir, start, tensorboard=config.tensorboard) if rank == 0 else None

    bar = None
    if config.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="train", unit="step")

    def doing(what: str) -> None:
        """Say on the bar what the run is doing between steps (a long evaluation is not a stuck step)."""
        if bar is not None and bar.desc != what:
            bar.set_description_str(what, refresh=True)

    try:  # the bar is closed before any error leaves, so the error is the last thing shown
        model.train()
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            if config.compile and step == start:
                doing("compiling the first step")  # torch.compile: minutes on a loaded CPU
            step_loss = run.step()
            doing("train")
            if not math.isfinite(step_loss):
                kept = (f"the last checkpoint ({str(checkpoint_path)!r}, step {saved}) is kept"
                        if saved is not None else "no checkpoint was written")
                raise NonFiniteError(
                    f"training diverged at step {step + 1}: the loss is {step_loss}; stopped without saving, and "
                    f"{kept}. Lower the learning rate (lr) or clip gradients (grad_clip)"
                )
            result.losses.append(step_loss)
            seconds = time.perf_counter() - t0
            tokens_per_s = run.tokens_per_step / seconds
            entry: dict[str, Any] = {"train_loss": step_loss, "lr": run.scheduler.get_last_lr()[0],
                                     "tokens_per_s": tokens_per_s,
                                     "mfu": mfu(run.flops_per_token, tokens_per_s, run.peak_flops, world)}
            done = step + 1 == config.steps
            if _due(config.eval_interval, step) or done:
                doing("evaluate")
                metrics = objective.evaluate(model, block, config.eval_batches, config.batch_size)
                result.val_losses.append((step + 1, metrics["loss"]))
                if len(metrics) > 1:
                    result.val_metrics.append((step + 1, metrics))
                entry.update({f"val_{k}": v for k, v in metrics.items()})
                if best.offer(step + 1, metrics["loss"]):  # on every process: they all see the same loss
                    keep = run.plain_model()  # gathered from the shards under fsdp (every process takes part)
                    if rank == 0:
                        best.save(keep, data, result)  # type: ignore[arg-type]
                        result.best_dir, result.best_step = best.directory, step + 1
                result.stopped_early = bool(config.early_stopping) and best.bad_evals >= config.early_stopping
            if config.sample_every and rank == 0 and _due(config.sample_every, step):
                doing("sample")
                text = _sample(model, tokenizer, config, step + 1)  # type: ignore[arg-type]
                result.samples.append((step + 1, text))
                entry["sample"] = text
                if bar is not None:
                    bar.write(f"step {step + 1}: {text!r}")
            if log is not None:
                log.write(step + 1, **entry)
            if _due(config.save_interval, step) or done or result.stopped_early:
                doing("save")
                state = run.state(step + 1, result, best) if rank == 0 or config.fsdp else None
                if rank == 0:
                    _check_weights(state["model"].values(), step + 1)  # type: ignore[index]
                    save_training_checkpoint(checkpoint_path, state)  # type: ignore[arg-type]
                    result.plot = plot_losses(out_dir)
                saved = step + 1
            if bar is not None:
                doing("train")
                bar.set_postfix(_postfix(step_loss, run, result, seconds, entry["mfu"]))
                bar.update(1)
            for callback in callbacks:  # after the checkpoint, so a callback that stops the run loses nothing
                callback(step + 1, entry)
            if result.stopped_early:
                break
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    model.eval()
    final = run.plain_model()  # gathered from the shards under fsdp (every process takes part)
    if rank == 0:
        last = len(result.losses)
        assert final is not None  # process 0 holds the gathered model
        _check_weights(final.parameters(), last)
        result.final_dir = save_model(final, out_dir / FINAL, tokenizer=tokenizer)
        write_model_card(result.final_dir, final, data, last, result.losses, result.val_losses, result.val_metrics,
                         tokenizer)
        if result.best_dir is None and best.step is not None:  # found by an earlier, resumed part of the run
            result.best_dir, result.best_step = best.directory, best.step
    if distributed:
        dist.barrier()
    return result


class _Best:
    """``best/``: the weights of the lowest validation loss so far, and how many evaluations since it."""

    def __init__(self, directory: Path, tokenizer: TokenizerProtocol | None) -> None:
        self.directory, self.tokenizer = directory, tokenizer
        self.step: int | None = None
        self.loss = math.inf
        self.bad_evals = 0

    def offer(self, step: int, loss: float) -> bool:
        """Whether ``loss`` is the lowest yet (then ``save`` the model), else count one more evaluation without it."""
        if loss >= self.loss:
            self.bad_evals += 1
            return False
        self.step, self.loss, self.bad_evals = step, loss, 0
        return True

    def save(self, model: nn.Module, data: Any, result: TrainResult) -> None:
        """Write the weights of the best step into ``best/``."""
        step = int(self.step or 0)
        _check_weights(model.parameters(), step)
        was_training = model.training
        model.eval()
        save_model(model, self.directory, tokenizer=self.tokenizer)
        model.train(was_training)
        write_model_card(self.directory, model, data, step, result.losses, result.val_losses, result.val_metrics,
                         self.tokenizer)

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "loss": self.loss, "bad_evals": self.bad_evals}

    def restore(self, state: dict[str, Any] | None) -> None:
        if state:
            self.step, self.loss, self.bad_evals = state["step"], state["loss"], state["bad_evals"]


def _sample(model: nn.Module, tokenizer: TokenizerProtocol, config: TrainConfig, step: int) -> str:
    """A sample of ``config.sample_tokens`` tokens after ``config.sample_prompt``, seeded by the step."""
    prompt = tokenizer.encode(config.sample_prompt) or [tokenizer.eot_token]
    was_training = model.training
    model.eval()
    try:
        out = generate(model, [prompt], max_new_tokens=config.sample_tokens, temperature=0.8, top_k=40,
                       seed=config.seed + step, eos_token_id=tokenizer.eot_token, truncate_prompt="left")
    finally:
        model.train(was_training)
    # As the text API gives text: special tokens ([CLS], [UNK], ...) left out, a WordPiece vocabulary's CJK joined.
    decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    return "".join(decoder.add(t) for t in out[0, len(prompt) :].tolist()) + decoder.flush()


def _due(interval: int, step: int) -> bool:
    """Whether an every-``interval``-steps event falls after ``step`` (0: never, only at the end)."""
    return bool(interval) and (step + 1) % interval == 0


def _postfix(loss: float, run: _Run, result: TrainResult, seconds: float, utilization: float | None) -> dict[str, Any]:
    """What the progress bar shows after a step."""
    postfix: dict[str, Any] = {"loss": f"{loss:.3f}", "lr": f"{run.scheduler.get_last_lr()[0]:.2e}",
                               "tok/s": f"{run.tokens_per_step / seconds:.0f}"}
    if utilization is not None:
        postfix["mfu"] = f"{utilization:.1%}"
    if result.val_losses:
        postfix["val"] = f"{result.val_losses[-1][1]:.3f}"
    if result.val_metrics:
        postfix["acc"] = f"{result.val_metrics[-1][1]['accuracy']:.3f}"
    return postfix


def _check_run(model: nn.Module, objective: Objective, config: TrainConfig) -> int:
    """Check that the model, data and settings fit together; return the window (or longest text) length."""
    if is_quantized(model):
        raise ValueError("a quantized model cannot be trained (training stays in floating point): "
                         "load it without quantize")
    context = model.config.n_positions  # None for recurrent models: no limit
    block = config.block_size or min(context or 256, 256)
    check_window(block, context, "block_size")
    if config.autocast and model.device.type != "cuda":
        raise ValueError("autocast (bf16/fp16 mixed precision) is for CUDA; train in float32 on the CPU")
    objective.check(model, block)
    return block


def _own_parameters(model: nn.Module) -> None:
    """Give each parameter its own contiguous memory (loaded ones are read-only-mapped views of the file)."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()


def _set_trainable(model: nn.Module, config: TrainConfig) -> None:
    """Apply ``freeze_blocks`` and ``gradient_checkpointing``; check that something is left to train."""
    body = getattr(model, "transformer", model)
    if config.freeze_blocks or config.gradient_checkpointing:
        if not isinstance(body, GPT2):
            raise ValueError("freeze_blocks and gradient_checkpointing are options of GPT-2 models")
        if config.freeze_blocks > len(body.h):
            raise ValueError(f"freeze_blocks={config.freeze_blocks} but the model has {len(body.h)} blocks")
        body.gradient_checkpointing = config.gradient_checkpointing
        if config.freeze_blocks:
            for module in (body.wte, body.wpe, *body.h[: config.freeze_blocks]):
                module.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (everything is frozen)")


def _distributed() -> tuple[bool, int, int]:
    """Whether ``torch.distributed`` is running, this process's rank and the number of processes."""
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def _optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with weight decay on matrices only, and the warm-up + cosine schedule."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=config.betas,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: config.learning_rate(s) / config.lr)
    return optimizer, scheduler


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_weights(weights: Iterable[torch.Tensor], step: int) -> None:
    """Refuse to save non-finite weights over a good checkpoint."""
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(p).all() for p in weights])
    if not bool(finite.all()):
        raise NonFiniteError(f"training diverged by step {step}: the weights hold NaN or inf; nothing was saved. "
                             "Lower the learning rate (lr) or clip gradients (grad_clip)")


class _Run:
    """One optimizer step at a time, on this process's share of every global batch."""

    def __init__(self, model: nn.Module, objective: Objective, config: TrainConfig, block: int,
                 distributed: bool, rank: int, world: int) -> None:
        self.model, self.objective, self.config, self.block = model, objective, config, block
        self.fsdp = config.fsdp
        if self.fsdp:
            shard_model(model)  # before the optimizer: it holds the shards
        self.optimizer, self.scheduler = _optimizer(model, config)
        self.batches = torch.Generator().manual_seed(config.seed)  # which rows each step trains on
        torch.manual_seed(config.seed)  # dropout
        self.distributed, self.rank, self.world = distributed, rank, world
        self.net: nn.Module = torch.nn.parallel.DistributedDataParallel(model) if distributed and not self.fsdp \
            else model
        self.forward = torch.compile(self.net) if config.compile else self.net
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.autocast or "")
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
        self.autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else nullcontext
        self.population = objective.population(block)  # window starts, or examples
        # Tokens one optimizer step reads (windows; for examples, at most that many).
        self.tokens_per_step = config.batch_size * config.grad_accum * world * block
        self.flops_per_token = flops_per_token(model, block)  # None: not a GPT-2, MFU unknown
        self.peak_flops = config.peak_flops or peak_flops(model.device)  # None: MFU unknown

    def step(self) -> float:
        """Accumulate the gradients of ``grad_accum`` micro-batches and update; return the mean loss."""
        config, model = self.config, self.model
        step_loss = 0.0
        for micro in range(config.grad_accum):
            # Every process draws the whole global batch and keeps its own rows, so the
            # batch does not depend on the number of processes.
            rows = torch.randint(0, self.population, (config.batch_size * self.world,), generator=self.batches)
            mine = rows[self.rank * config.batch_size : (self.rank + 1) * config.batch_size]
            sync = self.distributed and micro < config.grad_accum - 1  # no gradient exchange until the last
            if self.fsdp:
                model.set_requires_gradient_sync(not sync)  # type: ignore[operator]
            with self.net.no_sync() if sync and not self.fsdp else nullcontext(), \
                    self.autocast():  # type: ignore[operator]
                loss = self.objective.loss(self.forward, mine, self.block, model.device)
            self.scaler.scale(loss / config.grad_accum).backward()
            step_loss += loss.item() / config.grad_accum
        if not math.isfinite(step_loss):
            self.optimizer.zero_grad(set_to_none=True)
            return step_loss  # no update from a non-finite loss
        if config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss

    def plain_model(self) -> nn.Module | None:
        """The model, unsharded: under fsdp a copy gathered from the shards on process 0 (every process must call)."""
        return plain_copy(self.model) if self.fsdp else self.model

    def state(self, step: int, result: TrainResult, best: _Best) -> dict[str, Any]:
        """Everything ``checkpoint.pt`` holds after ``step`` steps (under fsdp, every process must call)."""
        weights, optimizer = full_state(self.model, self.optimizer) if self.fsdp else \
            (self.model.state_dict(), self.optimizer.state_dict())
        return {
            "best": best.state(),
            "model": weights,
            "model_config": self.model.config.to_dict(),
            "train_config": dataclasses.asdict(self.config),
            "data_fingerprint": self.objective.data.fingerprint,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "batch_rng": self.batches.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "step": step,
            "world": self.world,  # processes: batch_size is per process
            "losses": list(result.losses),
            "val_losses": [list(v) for v in result.val_losses],
            "val_metrics": [[s, dict(m)] for s, m in result.val_metrics],
        }

    def restore(self, path: Path, result: TrainResult, best: _Best) -> int:
        """Load ``path`` into the run's objects after checking that it belongs to this run; return its step."""
        model, optimizer, scheduler, batches = self.model, self.optimizer, self.scheduler, self.batches
        config, data = self.config, self.objective.data
        state = load_training_checkpoint(path, map_location=model.device)
        if state["model_config"] != model.config.to_dict():
            raise ValueError(f"{str(path)!r} was made for another model config")
        saved = state["train_config"]
        now = dataclasses.asdict(config)
        # Another number of processes may go on with the same global batch: compare batch_size * processes.
        saved["batch_size"] *= state.get("world", 1)
        now["batch_size"] *= self.world
        differ = [f"{k}: {_as_list(saved.get(k))!r} then, {_as_list(now[k])!r} now" for k in _RESUME_FIXED
                  if _as_list(saved.get(k)) != _as_list(now[k])]
        if differ:
            raise ValueError(f"cannot resume {str(path)!r} with other settings ({'; '.join(differ)}): "
                             "resume with the settings it was started with, or start a new run in another directory")
        if state["data_fingerprint"] != data.fingerprint:
            raise ValueError(f"cannot resume {str(path)!r} on other data: it was trained on data with another "
                             "fingerprint (other files, contents or settings); resume with the same --data")
        try:
            if self.fsdp:
                load_full_state(model, optimizer, state["model"], state["optimizer"])
            else:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            batches.set_state(state["batch_rng"])
            torch.set_rng_state(state["torch_rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{str(path)!r} does not fit this model and optimizer: {exc}") from None
        if torch.cuda.is_available() and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        result.losses = list(state["losses"])
        result.val_losses = [tuple(v) for v in state["val_losses"]]
        result.val_metrics = [(s, dict(m)) for s, m in state.get("val_metrics", [])]
        best.restore(state.get("best"))
        return state["step"]
