"""Training and fine-tuning: AdamW, warm-up then cosine decay, accumulation, clipping, exact resume.

One loop serves two objectives, chosen by the data:

- ``TokenData`` (``prepare_data``): next-token prediction. Any model with
  ``forward(input_ids) -> logits``, a ``config`` (``to_dict``, ``n_positions``)
  and ``save_pretrained`` trains here: GPT-2 and the recurrent models alike.
- ``LabeledData`` (``load_labeled``): classification with a
  ``GPT2ForSequenceClassification``; each evaluation reports accuracy and macro-F1.

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
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gpt2lite.errors import CheckpointError, NonFiniteError
from gpt2lite.models.gpt2 import GPT2
from gpt2lite.models.quantize import is_quantized
from gpt2lite.training.checkpoint import load_training_checkpoint, save_training_checkpoint
from gpt2lite.training.data import Part, TokenData
from gpt2lite.training.labeled import LabeledData

__all__ = [
    "TrainConfig", "TrainResult", "check_output_dir", "classification_metrics", "evaluate_classifier",
    "evaluate_loss", "train",
]

CHECKPOINT = "checkpoint.pt"
FINAL = "final"

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

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("warmup_steps", "eval_interval", "save_interval", "seed", "freeze_blocks"):
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


def check_output_dir(out_dir: str | os.PathLike[str]) -> None:
    """Create ``out_dir`` if needed and make sure files can be written there."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"output directory {str(out_dir)!r} is not writable: {exc}") from None


@torch.no_grad()
def evaluate_loss(model: GPT2, data: TokenData, *, part: Part = "val", block_size: int, batches: int,
                  batch_size: int) -> float:
    """Mean next-token loss over evenly spaced windows of a part (the same windows every time)."""
    stream = data.part(part)
    last = len(stream) - block_size - 1
    count = batches * batch_size
    starts = torch.linspace(0, last, count).round().long()
    was_training = model.training
    model.eval()
    total = 0.0
    for chunk in starts.split(batch_size):
        x, y = data.windows(part, chunk, block_size)
        logits = model(x.to(model.device))
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.to(model.device).flatten()).item() * len(chunk)
    model.train(was_training)
    return total / count


def classification_metrics(predicted: Sequence[int], actual: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of each class's F1; a class never predicted nor present counts 0)."""
    if len(predicted) != len(actual) or not actual:
        raise ValueError("need as many predictions as labels, and at least one")
    accuracy = sum(p == a for p, a in zip(predicted, actual, strict=True)) / len(actual)
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and a == c for p, a in zip(predicted, actual, strict=True))
        fp = sum(p == c and a != c for p, a in zip(predicted, actual, strict=True))
        fn = sum(p != c and a == c for p, a in zip(predicted, actual, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / num_labels}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data: LabeledData, *, part: Part = "val", max_length: int,
                        batch_size: int) -> dict[str, float]:
    """Mean cross-entropy, accuracy and macro-F1 of a classifier over every example of a part."""
    ids, labels = data.part(part)
    was_training = model.training
    model.eval()
    total, predicted = 0.0, []
    for start in range(0, len(ids), batch_size):
        x, mask, y = data.batch(part, range(start, min(start + batch_size, len(ids))), max_length)
        logits = model(x.to(model.device), attention_mask=mask.to(model.device)).float()
        total += F.cross_entropy(logits, y.to(model.device), reduction="sum").item()
        predicted += logits.argmax(-1).tolist()
    model.train(was_training)
    return {"loss": total / len(ids), **classification_metrics(predicted, labels, len(data.labels))}


def train(
    model: nn.Module,
    data: TokenData | LabeledData,
    out_dir: str | os.PathLike[str],
    config: TrainConfig = TrainConfig(),
    *,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data``; checkpoints go to ``out_dir``, the final model to ``out_dir/final``.

    ``data`` from ``prepare_data`` trains a language model; ``data`` from
    ``load_labeled`` trains a ``GPT2ForSequenceClassification`` (its labels
    must be the data's). A model with LoRA adapters trains only them and saves
    them (PEFT format) as ``final``.

    ``resume=True`` continues from ``out_dir/checkpoint.pt`` exactly where it
    stopped (model, optimizer, schedule, step and random state); the settings
    that shape the run must be the ones it started with. The global RNG is
    seeded with ``config.seed``: dropout draws from it. A loss that turns NaN or
    infinite stops the run with ``NonFiniteError``, keeping the last checkpoint.
    """
    out_dir = Path(out_dir)
    block = _check_run(model, data, config)
    _set_trainable(model, config)
    checkpoint_path = out_dir / CHECKPOINT
    if resume and not checkpoint_path.is_file():
        raise FileNotFoundError(f"nothing to resume: {str(checkpoint_path)!r} does not exist")
    distributed, rank, world = _distributed()
    if rank == 0:
        check_output_dir(out_dir)

    # Parameters loaded from a file are read-only-mapped views; training writes them, so give
    # each its own contiguous memory once, up front.
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    optimizer, scheduler = _optimizer(model, config)
    batches = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    result = TrainResult()
    start = 0
    if resume:
        start = _restore(checkpoint_path, model, optimizer, scheduler, batches, config, data, result)
    run = _Run(model, data, config, block, optimizer, scheduler, batches, distributed, rank, world)

    bar = None
    if config.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="train", unit="step")
    tokens_per_step = config.batch_size * config.grad_accum * world * block
    model.train()
    saved = start if resume else None
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        step_loss = run.step()
        if not math.isfinite(step_loss):
            kept = (f"the last checkpoint ({str(checkpoint_path)!r}, step {saved}) is kept"
                    if saved is not None else "no checkpoint was written")
            raise NonFiniteError(
                f"training diverged at step {step + 1}: the loss is {step_loss}; stopped without saving, and {kept}. "
                "Lower the learning rate (lr) or clip gradients (grad_clip)"
            )
        result.losses.append(step_loss)
        done = step + 1 == config.steps
        if (config.eval_interval and (step + 1) % config.eval_interval == 0) or done:
            if isinstance(data, LabeledData):
                metrics = evaluate_classifier(model, data, max_length=block, batch_size=config.batch_size)
                result.val_metrics.append((step + 1, metrics))
                val = metrics["loss"]
            else:
                val = evaluate_loss(model, data, block_size=block, batches=config.eval_batches,
                                    batch_size=config.batch_size)
            result.val_losses.append((step + 1, val))
        if rank == 0 and ((config.save_interval and (step + 1) % config.save_interval == 0) or done):
            _check_weights(model, step + 1)
            save_training_checkpoint(checkpoint_path, run.state(step + 1, result))
            saved = step + 1
        if bar is not None:
            postfix: dict[str, Any] = {"loss": f"{step_loss:.3f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}",
                                       "tok/s": f"{tokens_per_step / (time.perf_counter() - t0):.0f}"}
            if result.val_losses:
                postfix["val"] = f"{result.val_losses[-1][1]:.3f}"
            if result.val_metrics:
                postfix["acc"] = f"{result.val_metrics[-1][1]['accuracy']:.3f}"
            bar.set_postfix(postfix)
            bar.update(1)
        if on_step is not None:  # after the checkpoint, so a callback that stops the run loses nothing
            on_step(step, step_loss)
    if bar is not None:
        bar.close()
    model.eval()
    if rank == 0:
        _check_weights(model, config.steps)
        result.final_dir = model.save_pretrained(out_dir / FINAL)
    if distributed:
        dist.barrier()
    return result


def _check_run(model: nn.Module, data: TokenData | LabeledData, config: TrainConfig) -> int:
    """Check that the model, data and settings fit together; return the window (or longest text) length."""
    if is_quantized(model):
        raise ValueError("a quantized model cannot be trained (training stays in floating point): "
                         "load it without quantize")
    context = model.config.n_positions  # None for recurrent models: no limit
    block = config.block_size or min(context or 256, 256)
    if context is not None and block > context:
        raise ValueError(f"block_size {block} exceeds the model's n_positions ({context})")
    if config.autocast and model.device.type != "cuda":
        raise ValueError("autocast (bf16/fp16 mixed precision) is for CUDA; train in float32 on the CPU")
    classifier = hasattr(model, "score")
    if isinstance(data, LabeledData) or classifier:
        if not (isinstance(data, LabeledData) and classifier):
            raise ValueError("labeled data (load_labeled) trains a GPT2ForSequenceClassification, and a classifier "
                             "trains on labeled data")
        if tuple(model.config.labels) != data.labels:
            raise ValueError(f"the model classifies into {list(model.config.labels)} but the data's classes are "
                             f"{list(data.labels)}: build the model with labels=data.labels")
        return block
    for part in ("train", "val"):
        n = len(data.part(part))
        if n < block + 1:
            raise ValueError(f"the {part} part holds {n} tokens, fewer than block_size + 1 = {block + 1}: "
                             "give more text or a smaller block_size")
    return block


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


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, batches: torch.Generator,
             config: TrainConfig, data: TokenData, result: TrainResult) -> int:
    """Load ``path`` into the run's objects after checking that it belongs to this run; return its step."""
    state = load_training_checkpoint(path, map_location=model.device)
    if state["model_config"] != model.config.to_dict():
        raise ValueError(f"{str(path)!r} was made for another model config")
    saved = state["train_config"]
    now = dataclasses.asdict(config)
    differ = [f"{k}: {_as_list(saved.get(k))!r} then, {_as_list(now[k])!r} now" for k in _RESUME_FIXED
              if _as_list(saved.get(k)) != _as_list(now[k])]
    if differ:
        raise ValueError(f"cannot resume {str(path)!r} with other settings ({'; '.join(differ)}): "
                         "resume with the settings it was started with, or start a new run in another directory")
    if state["data_fingerprint"] != data.fingerprint:
        raise ValueError(f"cannot resume {str(path)!r} on other data: it was trained on data with another "
                         "fingerprint (other files, contents or settings); resume with the same --data")
    try:
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
    return state["step"]


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_weights(model: nn.Module, step: int) -> None:
    """Refuse to save non-finite weights over a good checkpoint."""
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()])
    if not bool(finite.all()):
        raise NonFiniteError(f"training diverged by step {step}: the weights hold NaN or inf; nothing was saved. "
                             "Lower the learning rate (lr) or clip gradients (grad_clip)")


class _Run:
    """One optimizer step at a time, on this process's share of every global batch."""

    def __init__(self, model: nn.Module, data: TokenData | LabeledData, config: TrainConfig, block: int,
                 optimizer: Any, scheduler: Any, batches: torch.Generator, distributed: bool, rank: int,
                 world: int) -> None:
        self.model, self.data, self.config, self.block = model, data, config, block
        self.optimizer, self.scheduler, self.batches = optimizer, scheduler, batches
        self.distributed, self.rank, self.world = distributed, rank, world
        self.net: nn.Module = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
        self.forward = torch.compile(self.net) if config.compile else self.net
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.autocast or "")
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
        self.autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else nullcontext
        # Language modeling draws window starts; classification draws example indices.
        self.population = len(data.train_ids) if isinstance(data, LabeledData) else len(data.train) - block

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        """The mean loss of some training rows (windows or examples)."""
        device = self.model.device
        if isinstance(self.data, LabeledData):
            x, mask, y = self.data.batch("train", rows.tolist(), self.block)
            logits = self.forward(x.to(device), attention_mask=mask.to(device))
            return F.cross_entropy(logits.float(), y.to(device))
        x, y = self.data.windows("train", rows, self.block)
        logits = self.forward(x.to(device))
        return F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten())

    def step(self) -> float:
        """Accumulate the gradients of ``grad_accum`` micro-batches and update; return the mean loss."""
        config, model = self.config, self.model
        step_loss = 0.0
        for micro in range(config.grad_accum):
            # Every process draws the whole global batch and keeps its own rows, so the
            # batch does not depend on the number of processes.
            rows = torch.randint(0, self.population, (config.batch_size * self.world,), generator=self.batches)
            mine = rows[self.rank * config.batch_size : (self.rank + 1) * config.batch_size]
            sync = self.distributed and micro < config.grad_accum - 1
            with self.net.no_sync() if sync else nullcontext(), self.autocast():  # type: ignore[operator]
                loss = self.loss(mine)
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

    def state(self, step: int, result: TrainResult) -> dict[str, Any]:
        """Everything ``checkpoint.pt`` holds after ``step`` steps."""
        return {
            "model": self.model.state_dict(),
            "model_config": self.model.config.to_dict(),
            "train_config": dataclasses.asdict(self.config),
            "data_fingerprint": self.data.fingerprint,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "batch_rng": self.batches.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "step": step,
            "losses": list(result.losses),
            "val_losses": [list(v) for v in result.val_losses],
            "val_metrics": [[s, dict(m)] for s, m in result.val_metrics],
        }
