"""The training run: `train.run`, its callbacks, checkpoints and distribution."""
