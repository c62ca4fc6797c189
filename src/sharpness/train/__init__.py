"""The training loop shared by the CLI and the reproductions, with its callbacks and checkpoints."""

from sharpness.train.callbacks import Callback, Checkpointer, MetricsLogger
from sharpness.train.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    load_weights,
    read_json,
    save_checkpoint,
    to_json,
    write_json,
)
from sharpness.train.loop import NonFiniteLossError, StepOutput, Trainer, TrainState

__all__ = [
    "CHECKPOINT_NAME",
    "Callback",
    "Checkpointer",
    "MetricsLogger",
    "NonFiniteLossError",
    "StepOutput",
    "TrainState",
    "Trainer",
    "load_checkpoint",
    "load_weights",
    "read_json",
    "save_checkpoint",
    "to_json",
    "write_json",
]
