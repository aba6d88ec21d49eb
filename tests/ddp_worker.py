"""A DistributedDataParallel training process for test_train.py (spawned, so it lives in an importable module)."""

from __future__ import annotations

import torch.distributed as dist


def train_one_rank(rank: int, world: int, store: str, checkpoint: str, data_dir: str, runs) -> None:
    """Each of ``runs`` (``(out_dir, config)``) in turn, in one process group: a spawn costs seconds, a run less."""
    from gpt2lite import GPT2, TokenData, train

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for out_dir, config in runs:
            model = GPT2.from_pretrained(checkpoint, config=config["model"])
            train(model, TokenData.open(data_dir), out_dir, config["train"], resume=config.get("resume", False))
    finally:
        dist.destroy_process_group()
