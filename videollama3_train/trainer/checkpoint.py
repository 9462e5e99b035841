"""Atomic checkpoints: save, find the newest complete one, resume, keep the last K.

Layout of one checkpoint ``<output_dir>/checkpoints/step-00000120/``:

* what ``accelerator.save_state`` writes: model weights (safetensors), optimizer, RNG states of every rank (and the
  DeepSpeed engine files under ZeRO);
* ``trainer_state.pt``: the loop state (step, epoch, counters) and the lr scheduler, written by rank 0;
* ``loader_rank{r}.pt``: each rank's loader ``state_dict()`` (its own shard of the data order);
* ``COMPLETE``: written last, before the rename.

Everything is written into ``step-XXXXXXXX.tmp`` first; after a barrier rank 0 renames it with ``os.replace`` (atomic
on one filesystem). A crash mid-save leaves a ``.tmp`` that :func:`find_latest_checkpoint` ignores and the next save
of that step replaces. A complete checkpoint is never deleted in place: it is first renamed to ``.trash`` (so a
crash mid-delete cannot leave a ``step-*`` directory that has its ``COMPLETE`` marker but lacks files), then removed.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

_STEP_DIR = re.compile(r"^step-(\d{8})$")
TRAINER_STATE = "trainer_state.pt"
COMPLETE = "COMPLETE"


@dataclass
class LoopState:
    """Counters of the loop that a resumed run must continue from (plain values: safe with weights_only)."""

    step: int = 0  # optimizer steps completed (skipped non-finite steps count: their data was consumed)
    epoch: int = 0  # epoch the next micro-batch comes from
    step_in_epoch: int = 0  # optimizer steps completed within ``epoch``
    tokens: int = 0  # input tokens seen, all ranks
    label_tokens: int = 0  # label tokens seen, all ranks
    skipped_nonfinite: int = 0  # optimizer steps skipped because the loss or the gradient norm was not finite
    consecutive_nonfinite: int = 0  # current run of non-finite steps (abort at cfg.nan_tolerance)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopState:
        return cls(**d)


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first. ``.tmp`` directories (an interrupted save) are ignored."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``<output_dir>/checkpoints``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    state: LoopState,
    *,
    scheduler,
    loader,
    keep_last: int,
    write_extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint of ``state.step`` on every rank (collective: all ranks must call it)."""
    root = checkpoint_root(output_dir)
    final = root / step_dir_name(state.step)
    tmp = root / (final.name + ".tmp")
    if accelerator.is_main_process:
        # A leftover from an earlier crash at this very step, or a re-save of the final step.
        shutil.rmtree(tmp, ignore_errors=True)
        for trash in root.glob("*.trash"):  # deletions a crash interrupted
            shutil.rmtree(trash, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(tmp), safe_serialization=True)
    if hasattr(loader, "state_dict"):
        torch.save(loader.state_dict(), tmp / f"loader_rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save({"loop": state.to_dict(), "scheduler": scheduler.state_dict()}, tmp / TRAINER_STATE)
        if (
            write_extras is not None
        ):  # model config, processor: what an export or a reader needs beside weights
            write_extras(tmp)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        (tmp / COMPLETE).write_text(f"{state.step}\n")
        if final.exists():  # re-saving a step (e.g. the final save right after a periodic one)
            _discard(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            _discard(old)
    accelerator.wait_for_everyone()
    return final


def _discard(path: Path) -> None:
    """Delete a checkpoint directory: atomically out of sight first, then from disk."""
    trash = path.with_name(path.name + ".trash")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def load_checkpoint(accelerator, path: str | os.PathLike, *, scheduler, loader) -> LoopState:
    """Restore model, optimizer, RNG (accelerate), scheduler and loader from ``path``; return the loop state."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    accelerator.load_state(str(path))
    trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    scheduler.load_state_dict(trainer_state["scheduler"])
    loader_file = path / f"loader_rank{accelerator.process_index}.pt"
    if hasattr(loader, "load_state_dict"):
        if not loader_file.is_file():
            raise FileNotFoundError(
                f"{loader_file} missing: was the checkpoint written with a different number of processes "
                f"({accelerator.num_processes} now)?"
            )
        loader.load_state_dict(torch.load(loader_file, map_location="cpu", weights_only=True))
    return LoopState.from_dict(trainer_state["loop"])
