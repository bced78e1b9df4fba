"""Training: the config tree, distributed setup, checkpoints, metric logging and plots."""
