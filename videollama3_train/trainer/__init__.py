"""The training loop and its parts: :func:`fit` tells one optimizer step; each part owns one concern.

``config`` the loop's dataclass; ``backend`` one strategy per backend (DDP, ZeRO-1/2/3, FSDP2), with their building
blocks in ``deepspeed`` and ``fsdp2``; ``sequence_parallel`` the Ulysses groups' split of a row and its loss;
``step`` the micro-batches and the loss; ``loss`` the chunked cross-entropy; ``optim`` AdamW, schedule, step plan;
``checkpoint`` cadence, atomic save, resume, SIGTERM; ``metrics`` FLOPs, MFU and the one metrics writer.
"""

from videollama3_train.trainer.backend import build_accelerator, build_backend
from videollama3_train.trainer.checkpoint import (
    Checkpointer,
    LoopState,
    find_latest_checkpoint,
    list_checkpoints,
)
from videollama3_train.trainer.config import TrainConfig
from videollama3_train.trainer.fit import fit
from videollama3_train.trainer.loss import chunked_cross_entropy, shift_and_select
from videollama3_train.trainer.metrics import MetricsWriter, RunLogger

__all__ = [
    "TrainConfig",
    "fit",
    "build_accelerator",
    "build_backend",
    "chunked_cross_entropy",
    "shift_and_select",
    "Checkpointer",
    "LoopState",
    "find_latest_checkpoint",
    "list_checkpoints",
    "MetricsWriter",
    "RunLogger",
]
