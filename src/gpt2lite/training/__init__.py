"""Training: token data on disk, the trainer, and its checkpoints."""
