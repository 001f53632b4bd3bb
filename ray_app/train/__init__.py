"""Ray Train: the per-worker loop, checkpoints, and the driver that launches it."""
