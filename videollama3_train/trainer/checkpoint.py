"""Checkpoints: when to write one, how to write it atomically, how to resume, and preemption.

:class:`Checkpointer` owns the cadence (``should_save``: every ``save_every`` steps, at the last step, and at a
stop) and turns SIGTERM into a flag the loop reads after each step: the ranks vote on it in the step's one
all-reduce, so they all stop after the same step, with a checkpoint, and exit 0 (a preempted job resumes where it
stopped instead of losing up to ``save_every`` steps).

Layout of one checkpoint ``<out_dir>/checkpoints/step-00000120/``:

* what the backend's ``save_state`` writes (``accelerator.save_state``): model weights (safetensors), optimizer, RNG
  states of every rank (and the DeepSpeed engine files under ZeRO);
* ``trainer_state.pt``: the loop state (step, epoch, counters), the lr scheduler and the world size, written by
  rank 0;
* ``loader_rank{r}.pt``: each rank's loader ``state_dict()``: with ``PackedLoader`` the global data cursor (epoch,
  optimizer steps consumed, packed rows per step) plus that rank's position and skip counters;
* ``model_config/`` and ``processor/``: what an export or a reader needs beside the weights (the readers:
  :func:`is_checkpoint`, :func:`model_weights`, :func:`native_state_dict`);
* ``COMPLETE``: written last, before the rename.

Resuming at another world size (:func:`load_checkpoint`): the loop state and the schedule count optimizer steps,
which do not depend on the world size; the loader's ``reshard_state`` turns every saved rank's state into this
rank's (the next step's rows dealt over the new world); model and optimizer are loaded by a backend that can
reshard them (``backend.reshards``: DDP's state is whole; ZeRO-1/2 through
:func:`videollama3_train.trainer.deepspeed.load_zero12_resharded`; FSDP2 through DCP). Any other backend (ZeRO-3)
is refused at start with a message that says so (``backend.why_no_reshard``).

Everything is written into ``step-XXXXXXXX.tmp`` first; after a barrier rank 0 renames it with ``os.replace`` (atomic
on one filesystem). A crash mid-save leaves a ``.tmp`` that :func:`find_latest_checkpoint` ignores and the next save
of that step replaces. A complete checkpoint is never deleted in place: it is first renamed to ``.trash`` (so a
crash mid-delete cannot leave a ``step-*`` directory that has its ``COMPLETE`` marker but lacks files), then removed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from videollama3_train.contract import Loader
from videollama3_train.trainer.config import TrainConfig

if TYPE_CHECKING:
    from videollama3_train.trainer.backend import Backend

_STEP_DIR = re.compile(r"^step-(\d{8})$")
TRAINER_STATE = "trainer_state.pt"
COMPLETE = "COMPLETE"
# What a reader of a checkpoint finds beside the loop's state (the export command reads them):
MODEL_WEIGHTS = "model.safetensors"  # whole weights, written by a backend whose state is whole (DDP)
MODEL_CONFIG = "model_config"  # the model's config.json (Checkpointer extras)
PROCESSOR = "processor"  # the processor (Checkpointer extras)
# The weights are the loss module's (``step.LossModule.model``): ``model.<native name>``.
MODEL_PREFIX = "model."


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

    def advance(self, *, applied: bool, label_tokens: float, tokens: float) -> None:
        """Count one finished optimizer step; ``applied`` is False for a step skipped as non-finite."""
        self.step += 1
        self.step_in_epoch += 1
        self.label_tokens += int(label_tokens)
        self.tokens += int(tokens)
        if applied:
            self.consecutive_nonfinite = 0
        else:
            self.skipped_nonfinite += 1
            self.consecutive_nonfinite += 1

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
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and is_checkpoint(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete checkpoint (its ``COMPLETE`` marker is written last)."""
    return (Path(path) / COMPLETE).is_file()


def model_weights(path: str | os.PathLike) -> Path | None:
    """The whole model weights file of checkpoint ``path``, or None when its backend kept sharded states (ZeRO,
    FSDP2)."""
    f = Path(path) / MODEL_WEIGHTS
    return f if f.is_file() else None


def native_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """Checkpoint weights (``model.<native name>``) under the native model's names."""
    return {
        k[len(MODEL_PREFIX) :]
        if k.startswith(MODEL_PREFIX + "model.") or k == MODEL_PREFIX + "lm_head.weight"
        else k: v
        for k, v in state.items()
    }


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
    loader: Loader,
    keep_last: int,
    write_extras: Callable[[Path], None] | None = None,
    save_state: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint of ``state.step`` on every rank (collective: all ranks must call it).

    ``save_state(dir)`` writes model, optimizer and RNG states (default: ``accelerator.save_state``; a backend
    with its own sharded format passes its own)."""
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

    if save_state is None:
        accelerator.save_state(str(tmp), safe_serialization=True)
    else:
        save_state(tmp)
    torch.save(loader.state_dict(), tmp / f"loader_rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        trainer_state = {
            "loop": state.to_dict(),
            "scheduler": scheduler.state_dict(),
            "world_size": accelerator.num_processes,
        }
        torch.save(trainer_state, tmp / TRAINER_STATE)
        # model config, processor: what an export or a reader needs beside weights
        if write_extras is not None:
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


def saved_world_size(path: str | os.PathLike) -> int:
    """The number of processes that wrote the checkpoint ``path`` (recorded; older checkpoints: their loader
    files)."""
    path = Path(path)
    trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    if "world_size" in trainer_state:
        return int(trainer_state["world_size"])
    return len(list(path.glob("loader_rank*.pt")))


def global_batch_mismatch(output_dir: str | os.PathLike, rows_per_step: int, world_size: int) -> str | None:
    """Why the newest checkpoint under ``output_dir`` cannot be resumed with ``rows_per_step`` packed rows per
    optimizer step on ``world_size`` processes (a changed global batch: no exact resume), or None. Read from its
    rank-0 loader state only, so a run can refuse before it builds a model."""
    latest = find_latest_checkpoint(output_dir)
    if latest is None or not (latest / "loader_rank0.pt").is_file():
        return None
    saved = torch.load(latest / "loader_rank0.pt", map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("rows_per_step", rows_per_step) == rows_per_step:
        return None
    return (
        f"{latest} holds {saved['rows_per_step']} packed rows per optimizer step ({saved_world_size(latest)} "
        f"processes), this run {rows_per_step} ({world_size} processes): the global batch changed and exact resume "
        "is impossible; set trainer.global_batch_samples (the same in both runs) to resume at another world size, "
        "or resume with the same processes and trainer.grad_accum"
    )


def load_checkpoint(
    accelerator,
    path: str | os.PathLike,
    *,
    scheduler,
    loader: Loader,
    load_state: Callable[[Path], None] | None = None,
    reshards: bool = False,
    backend: str = "this",
    why_not: str = "",
) -> LoopState:
    """Restore model, optimizer, RNG (``load_state``, default ``accelerator.load_state``), scheduler and loader
    from ``path``; return the loop state.

    A checkpoint of another world size is loaded only when ``reshards`` (``load_state`` can reshard model and
    optimizer) and the loader has ``reshard_state`` (a global data cursor); otherwise it is refused before
    anything is loaded, naming ``backend`` and ``why_not``."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    saved, world = saved_world_size(path), accelerator.num_processes
    if saved != world and not hasattr(loader, "reshard_state"):
        raise RuntimeError(
            f"{path} was written by {saved} processes, this run has {world}: its loader "
            f"({type(loader).__name__}) keeps a per-rank position and cannot move to another world size; "
            f"resume with {saved} processes"
        )
    if saved != world and not reshards:
        raise RuntimeError(
            f"{path} was written by {saved} processes, this run has {world}: the {backend} backend cannot load "
            f"model and optimizer states at another world size{f' ({why_not})' if why_not else ''}; resume with "
            f"{saved} processes"
        )
    loader_states = _loader_states(path, saved)
    if load_state is None:
        accelerator.load_state(str(path))
    else:
        load_state(path)
    trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    scheduler.load_state_dict(trainer_state["scheduler"])
    if saved == world:
        loader.load_state_dict(loader_states[accelerator.process_index])
    else:
        loader.load_state_dict(loader.reshard_state(loader_states))
        if accelerator.is_main_process:
            print(
                f"resuming a checkpoint of {saved} processes on {world}: data cursor and optimizer resharded"
            )
    return LoopState.from_dict(trainer_state["loop"])


def _loader_states(path: Path, saved: int) -> list[dict[str, Any]]:
    files = [path / f"loader_rank{r}.pt" for r in range(saved)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lacks {missing} of the {saved} processes that wrote it")
    return [torch.load(f, map_location="cpu", weights_only=True) for f in files]


# ----------------------------------------------------------------------------------------------------------------
# The checkpointer of a run: cadence, resume, preemption
# ----------------------------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and resumes one run's checkpoints under ``<out_dir>/checkpoints`` and watches for SIGTERM.

    Model, optimizer and RNG states are written and read by the backend (``backend.save_state`` /
    ``load_state``: accelerate's format, or a backend's own sharded one). ``extras`` are objects with
    ``save_pretrained(dir)`` (the model config, the processor) written into every checkpoint under their key;
    None values are skipped. Use it as a context manager around the loop: inside, SIGTERM sets
    :attr:`stop_requested` instead of killing the process.
    """

    def __init__(
        self,
        backend: Backend,
        out_dir: str | os.PathLike,
        cfg: TrainConfig,
        *,
        scheduler,
        loader: Loader,
        extras: Mapping[str, Any] | None = None,
    ):
        self.backend, self.accelerator, self.out_dir = backend, backend.accelerator, Path(out_dir)
        self.save_every, self.keep_last, self.resume_enabled = cfg.save_every, cfg.keep_last, cfg.resume
        self.scheduler, self.loader = scheduler, loader
        self.extras = {k: v for k, v in (extras or {}).items() if v is not None}
        self._sigterm = StopOnSigterm()

    def should_save(self, step: int, last: bool, stop: bool) -> bool:
        """Every ``save_every`` steps (0: never in between), at the last step, and when the ranks agreed to stop."""
        return stop or last or bool(self.save_every and step % self.save_every == 0)

    def save(self, state: LoopState) -> Path:
        """Write the checkpoint of ``state.step`` (collective: every rank calls it)."""

        def write_extras(path: Path) -> None:
            for name, obj in self.extras.items():
                obj.save_pretrained(path / name)

        return save_checkpoint(
            self.accelerator,
            self.out_dir,
            state,
            scheduler=self.scheduler,
            loader=self.loader,
            keep_last=self.keep_last,
            write_extras=write_extras,
            save_state=self.backend.save_state,
        )

    def resume(self) -> LoopState:
        """The loop state to start from: restored from the newest complete checkpoint (model, optimizer, RNG,
        scheduler, loader) when ``cfg.resume`` and there is one, else a fresh one."""
        latest = find_latest_checkpoint(self.out_dir) if self.resume_enabled else None
        if latest is None:
            return LoopState()
        state = load_checkpoint(
            self.accelerator,
            latest,
            scheduler=self.scheduler,
            loader=self.loader,
            load_state=self.backend.load_state,
            reshards=self.backend.reshards,
            backend=self.backend.name,
            why_not=self.backend.why_no_reshard,
        )
        if self.accelerator.is_main_process:
            print(f"resumed from {latest} at step {state.step}", flush=True)
        return state

    def exit_after_stop(self, step: int) -> None:
        """End the process with code 0 after the ranks stopped on SIGTERM at ``step`` (its checkpoint is written)."""
        if self.accelerator.is_main_process:
            print(f"SIGTERM: checkpoint of step {step} written, exiting", flush=True)
        raise SystemExit(0)

    @property
    def stop_requested(self) -> bool:
        """True once this process got SIGTERM (inside the ``with`` block)."""
        return self._sigterm.requested

    def __enter__(self) -> Checkpointer:
        self._sigterm.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sigterm.__exit__(*exc)


class StopOnSigterm:
    """Turns SIGTERM into the flag ``requested`` (main thread only; the previous handler is restored on exit).

    The handler is a bound method of this object, so a test can find the flag from ``signal.getsignal``.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopOnSigterm:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, the run simply cannot be stopped gracefully
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
