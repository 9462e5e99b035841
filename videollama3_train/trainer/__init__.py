"""The training loop: config, chunked loss, atomic checkpoints, and :func:`fit`."""

from videollama3_train.trainer.checkpoint import LoopState, find_latest_checkpoint, list_checkpoints
from videollama3_train.trainer.config import TrainConfig
from videollama3_train.trainer.fit import build_accelerator, fit
from videollama3_train.trainer.loss import chunked_cross_entropy, shift_and_select

__all__ = [
    "TrainConfig",
    "fit",
    "build_accelerator",
    "chunked_cross_entropy",
    "shift_and_select",
    "LoopState",
    "find_latest_checkpoint",
    "list_checkpoints",
]
