"""Train GPT-2 with gpt2lite inside Ray Train's TorchTrainer (Ray is not a dependency of gpt2lite).

Ray starts the workers and initialises ``torch.distributed`` in each (gloo on
CPUs, NCCL on GPUs); ``gpt2lite.train`` finds the process group and runs as
under ``torchrun``: each worker takes its share of every global batch and DDP
averages the gradients (``--fsdp`` shards the model instead). Process 0 writes
the run folder (``metrics.jsonl``, ``checkpoint.pt``, ``final/``), and the final
model is also handed to Ray as the run's checkpoint. The record of every
evaluation is reported to Ray (``ray.train.report``).

The data is tokenized once, here, before the workers start; on a cluster of
several machines ``--out`` must be a shared folder (every worker reads the data
and, on ``--resume``, the checkpoint from it).

    pip install -r examples/requirements.txt   # ray[train]
    python examples/ray_train.py --data corpus.txt --out runs/ray --preset tiny --workers 2 --steps 100
    python examples/ray_train.py --data shards/ --out runs/ray --model gpt2 --workers 4 --gpu --batch-size 8
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any


def train_worker(settings: dict[str, Any]) -> None:
    """One Ray Train worker: build the model, open the tokens, run ``gpt2lite.train`` in Ray's process group."""
    import ray.train
    import ray.train.torch
    import torch

    from gpt2lite import GPT2, GPT2Config, TokenData, TrainConfig, load_model, train

    device = ray.train.torch.get_device()
    torch.manual_seed(settings["seed"])  # every worker starts from the same weights
    if settings["model"]:
        model = load_model(settings["model"], device=device, prepack=False)  # training: no decode kernels
    else:
        model = GPT2(GPT2Config.from_preset(settings["preset"])).to(device)
    rank = ray.train.get_context().get_world_rank()
    last: dict[str, Any] = {}

    def numbers(done: int, record: dict[str, Any]) -> dict[str, Any]:
        return {"step": done, **{k: v for k, v in record.items() if isinstance(v, (int, float))}}

    def report(done: int, record: dict[str, Any]) -> None:
        # At evaluations only: ray.train.report waits for Ray's controller to collect it (about 2 s on Ray 2.60),
        # far longer than a step. Every worker reports (Ray waits for all of them); Ray keeps worker 0's numbers.
        last.update(numbers(done, record))
        if "val_loss" in record and done < settings["train"]["steps"]:  # the last one goes with the checkpoint
            ray.train.report(numbers(done, record))

    result = train(model, TokenData.open(settings["data"]), settings["out"], TrainConfig(**settings["train"]),
                   resume=settings["resume"], overwrite=settings["overwrite"], callbacks=[report])
    final = ray.train.Checkpoint.from_directory(str(result.final_dir)) if rank == 0 else None
    ray.train.report(last, checkpoint=final)


def main(argv: list[str] | None = None) -> Any:
    """Prepare the data, run the workers under ``TorchTrainer``; return Ray's ``Result``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="text file or folder, or a folder made by gpt2lite prepare")
    parser.add_argument("--out", required=True, help="the run folder (shared by all machines on a cluster)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a checkpoint to fine-tune (hub id or folder)")
    source.add_argument("--preset", help="or a GPT-2 shape to train from scratch (tiny, gpt2, ...)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); default: CPU workers (gloo)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8, help="windows per worker per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--min-lr", type=float, default=None, help="the end of the cosine decay (default: lr / 10)")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--eval-interval", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--save-interval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state")
    parser.add_argument("--no-progress", action="store_true")
    run_folder = parser.add_mutually_exclusive_group()
    run_folder.add_argument("--resume", action="store_true")
    run_folder.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from gpt2lite import prepare_data
    from gpt2lite.training.data import is_prepared
    from gpt2lite.training.trainer import check_run_folder

    out = Path(args.out).resolve()
    check_run_folder(out, resume=args.resume, overwrite=args.overwrite)  # before Ray starts
    if args.overwrite:
        shutil.rmtree(out / "ray", ignore_errors=True)  # Ray would list the replaced run's checkpoints as this one's
    data = Path(args.data).resolve() if is_prepared(args.data) else prepare_data(args.data, out / "data").directory
    settings = {
        "model": args.model, "preset": args.preset, "data": str(data), "out": str(out), "seed": args.seed,
        "resume": args.resume, "overwrite": args.overwrite,
        "train": dict(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      block_size=args.block_size, lr=args.lr,
                      min_lr=args.lr / 10 if args.min_lr is None else args.min_lr, warmup_steps=args.warmup_steps,
                      eval_interval=args.eval_interval,
                      eval_batches=args.eval_batches, save_interval=args.save_interval, seed=args.seed,
                      fsdp=args.fsdp, progress=not args.no_progress),
    }
    if not ray.is_initialized():
        # A local Ray with a CPU for each worker; RAY_ADDRESS (set by `ray job submit`, or by hand) joins a cluster.
        ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": max(args.workers, os.cpu_count() or 1)}),
                 include_dashboard=False)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=settings,
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu),
        run_config=RunConfig(name="gpt2lite", storage_path=str(out / "ray")),
    )
    result = trainer.fit()
    print(f"{args.steps} steps on {args.workers} Ray workers: train loss {result.metrics['train_loss']:.3f}; "
          f"model in {out / 'final'} (and Ray's copy in {result.checkpoint.path})")
    return result


if __name__ == "__main__":
    main()
