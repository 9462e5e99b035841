"""The one training loop: every stage, every backend (DDP, ZeRO-1/2/3 through accelerate, FSDP2), with or without
sequence parallelism, CPU or CUDA.

One optimizer step, as :func:`fit` tells it:

1. take ``grad_accum`` packed micro-batches from the loader and count their label tokens on the host; all-reduce
   the count, so the loss is normalised exactly once by the label tokens of the whole global batch (docs/reference.md §4:
   the official code divides twice under DeepSpeed);
2. forward each micro-batch (:class:`~videollama3_train.trainer.step.LossModule`: hidden states, never full
   logits; chunked cross-entropy against the output layer), backward ``loss_sum / global_count`` times the factor
   that cancels the backend's own averaging; gradients sync only on the last micro-batch;
3. clip (the pre-clip norm is logged), skip the update if the loss or the norm is not finite, step the optimizer
   and the schedule;
4. log, checkpoint, evaluate, each on its own cadence (``should_flush``, ``should_save``, ``should_run``); SIGTERM
   ends the run after the step with a checkpoint.

Host syncs: the per-step counts (label tokens, tokens, visual tokens, FLOPs, data-wait seconds) are computed on the
CPU batches and summed over ranks in the one all-reduce that the loss normaliser needs anyway; the loss, the norm
and the stop votes reach the host in the single ``.tolist()`` that decides whether to apply the update. Only log
steps sync more (per-dataset losses, the loader's skip counters of every rank).

Who does what: ``backend.py`` how gradients are synchronised, clipped and applied (the loop has no backend
``if``); ``sequence_parallel.py`` how a group of ranks shares each row (the run's ``ParallelDims`` says which);
``step.py`` the micro-batches, their host counts and the loss; ``optim.py`` AdamW, the schedule and the
number of steps; ``checkpoint.py`` when to save, resume, SIGTERM; ``metrics.py`` FLOPs, MFU and where the metrics
go. The model is known through ``model.api``, ``model.groups`` and the forward kwargs of ``contract``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from videollama3_train.contract import Loader, ParallelDims, as_loader
from videollama3_train.model.api import apply_gradient_checkpointing
from videollama3_train.model.groups import apply_trainable, has_adapters, trainable_table
from videollama3_train.trainer.backend import Backend, build_accelerator, build_backend
from videollama3_train.trainer.checkpoint import MODEL_CONFIG, PROCESSOR, Checkpointer, LoopState
from videollama3_train.trainer.config import TrainConfig
from videollama3_train.trainer.metrics import MetricsWriter, StepLog, skip_counts, step_metrics
from videollama3_train.trainer.optim import (
    build_optimizer,
    build_scheduler,
    group_lrs,
    plan_steps,
    resolve_grad_accum,
)
from videollama3_train.trainer.sequence_parallel import build_sp_group, sequence_parallel_loss_module
from videollama3_train.trainer.step import COUNT_KEYS, StepBatches, StepCounter, forward_backward


class MidRunEvaluator(Protocol):
    """What the loop asks of an evaluation between steps; it owns its cadence, as the checkpointer does."""

    def should_run(self, step: int) -> bool:
        """Whether to evaluate after optimizer step ``step`` (the same answer on every rank)."""
        ...

    def during(self, model: nn.Module, step: int) -> Mapping[str, float]:
        """Evaluate ``model`` after ``step``; called on every rank (it decides itself who works); returns the
        values to log as ``eval/<name>`` (rank 0's are logged)."""
        ...


class EveryNSteps:
    """A :class:`MidRunEvaluator` running ``fn(model, step) -> {name: value}`` every ``every`` steps (0: never)."""

    def __init__(self, fn: Callable[[nn.Module, int], Mapping[str, float]] | None, every: int):
        if every < 0:
            raise ValueError(f"eval_every must be >= 0 (0 = no evaluation during training), got {every}")
        self.fn, self.every = fn, every

    def should_run(self, step: int) -> bool:
        return self.fn is not None and self.every > 0 and step % self.every == 0

    def during(self, model: nn.Module, step: int) -> Mapping[str, float]:
        return self.fn(model, step)


def fit(
    model: nn.Module,
    loader: Loader | Iterable[dict[str, Any]],
    cfg: TrainConfig,
    *,
    out_dir: str | os.PathLike,
    accelerator=None,
    backend: Backend | None = None,
    parallel: ParallelDims | None = None,
    processor=None,
    evaluator: MidRunEvaluator | None = None,
    eval_fn: Callable[[nn.Module, int], dict[str, float]] | None = None,
    eval_every: int = 0,
    writer: MetricsWriter | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (a ``VideoLlama3ForConditionalGeneration``, PEFT-wrapped or not) on ``loader`` as ``cfg`` says.

    ``loader``: this rank's packed micro-batches, a resumable :class:`~videollama3_train.contract.Loader` (a plain
    list is wrapped). ``out_dir``: the run directory. ``accelerator``: built from ``cfg`` when None; ``backend``: the
    strategy (:func:`~videollama3_train.trainer.backend.build_backend` of ``cfg`` and ``accelerator`` when None; a
    caller that exports after ``fit`` passes its own, for ``backend.whole_model``). ``parallel``: how the ranks
    divide the work, as the loader was built for it (default: ``cfg.sequence_parallel`` over the accelerator's
    world). ``processor``: saved into every checkpoint. ``evaluator``: a :class:`MidRunEvaluator`, asked after every
    step (``eval_fn(model, step)`` every ``eval_every`` steps is the short form). ``writer``: where rank 0's rows go
    (default: ``<out_dir>/metrics.jsonl`` and a progress bar); ``on_step(row)`` sees each of them too (the keys:
    :class:`~videollama3_train.trainer.metrics.StepLog`). Returns the last step's row; ``interrupted`` is True when
    SIGTERM ended the run (the process then exits 0).
    """
    evaluator = evaluator or EveryNSteps(eval_fn, eval_every)
    run = _Prepared(model, as_loader(loader), cfg, backend or accelerator, parallel, out_dir)
    loader, cfg, backend, dims, out_dir = run.loader, run.cfg, run.backend, run.dims, run.out_dir
    train_module, optimizer, scheduler = run.module, run.optimizer, run.scheduler
    total_steps, acc = run.total_steps, backend.accelerator

    # ---- resume; the parts that keep their own cadence -----------------------------------------------------
    extras = {MODEL_CONFIG: model.config, PROCESSOR: processor}
    checkpointer = Checkpointer(backend, out_dir, cfg, scheduler=scheduler, loader=loader, extras=extras)
    state = checkpointer.resume()
    batches = StepBatches(loader, state, run.steps_per_epoch, cfg.grad_accum)
    count = StepCounter(model.config, cfg.lrs, acc.device, share=dims.sp_size)
    default_writer = MetricsWriter(out_dir, enabled=acc.is_main_process) if writer is None else None
    stop = False
    with checkpointer, default_writer or nullcontext(writer) as writer:
        writer.start(total_steps, state.step)
        log = StepLog(writer, log_every=cfg.log_every, is_main=acc.is_main_process, on_step=on_step)
        while state.step < total_steps and not stop:
            t0 = time.perf_counter()
            # ---- 1. the step's micro-batches; counts of the global batch in one all-reduce ------------------
            micro, data_wait = batches.next_step()
            counts = acc.reduce(count(micro, data_wait), reduction="sum")  # COUNT_KEYS, summed over ranks

            # ---- 2. forward + backward each micro-batch; gradients sync on the last one ----------------------
            scale = backend.grad_scale / counts[0].clamp(min=1)  # d(token loss sum)/(global label tokens)
            step_loss, per_sample = forward_backward(train_module, backend, micro, scale, step=state.step + 1)

            # ---- 3. clip, check, update ----------------------------------------------------------------------
            grad_norm = backend.clip(train_module)
            votes = acc.reduce(_votes(step_loss, checkpointer.stop_requested), reduction="sum")
            # The one host sync of every step: whether to apply the update must be known here. Everything else
            # the step logs rides along in the same transfer.
            host = torch.cat([counts, votes, grad_norm.detach().reshape(1).to(counts)]).tolist()
            host = dict(zip((*COUNT_KEYS, "loss_sum", "stop_votes", "grad_norm"), host, strict=True))
            finite = math.isfinite(host["loss_sum"]) and math.isfinite(host["grad_norm"])
            backend.step(optimizer, apply=finite)
            if finite:
                scheduler.step()
            state.advance(applied=finite, label_tokens=host["label_tokens"], tokens=host["tokens"])
            seconds = max(time.perf_counter() - t0, 1e-9)

            # ---- 4. log, abort on repeated non-finite steps, checkpoint, evaluate ---------------------------
            # tokens the step's rows can hold (a sequence-parallel group shares its rows)
            capacity = len(micro) * dims.dp_size * (loader.token_budget or 0)
            speed = step_metrics(host, seconds=seconds, world=acc.num_processes, capacity=capacity)
            log.add({**_counters(state, finite), **speed, **group_lrs(optimizer)}, per_sample)
            if state.consecutive_nonfinite >= cfg.nan_tolerance:
                log.flush()
                raise FloatingPointError(_nonfinite_message(state, cfg.nan_tolerance))
            stop, last = host["stop_votes"] > 0, state.step >= total_steps
            if log.should_flush(state.step, last, stop):
                log.flush(skip_counts(loader, acc))  # collective: every rank is here
            if checkpointer.should_save(state.step, last, stop):
                checkpointer.save(state)
            if evaluator.should_run(state.step) and not stop:
                log.add_eval(state.step, evaluator.during(model, state.step))
        final = {**log.close(), "interrupted": stop}

    run.release()
    if stop:  # SIGTERM: every rank saved this step; a clean exit lets the scheduler requeue the job
        checkpointer.exit_after_stop(state.step)
    return final


class _Prepared:
    """What the loop runs with: the backend (``backend_or_accelerator``: a strategy, else one built from ``cfg``
    around that accelerator or a new one) for the loader's micro-batches per step, the ranks' division, the model
    made trainable as ``cfg`` says, its optimizer and schedule, and the loss module (sequence-parallel when
    ``dims`` says so) wrapped by the backend."""

    def __init__(
        self, model: nn.Module, loader: Loader, cfg: TrainConfig, backend_or_accelerator, dims, out_dir
    ):
        from accelerate.utils import set_seed

        self.loader = loader
        # a global-batch loader decides the micro-batches per rank per step
        self.cfg = cfg = resolve_grad_accum(cfg, loader)
        backend = backend_or_accelerator
        if not isinstance(backend, Backend):
            backend = build_backend(cfg, backend)
        backend.set_grad_accum(cfg.grad_accum)
        acc, self.backend, self.out_dir = backend.accelerator, backend, Path(out_dir)
        self.dims = dims or ParallelDims(acc.num_processes, acc.process_index, cfg.sequence_parallel)
        set_seed(cfg.seed)
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        apply_trainable(model, cfg.lrs, lora=has_adapters(model))
        apply_gradient_checkpointing(model, cfg.gradient_checkpointing, cfg.checkpoint_every_n_layers)
        model.config.use_cache = False
        model.train()
        self.total_steps, self.steps_per_epoch = plan_steps(cfg, loader)
        optimizer = build_optimizer(model, cfg)
        # The scheduler drives the raw optimizer's param groups (shared with accelerate's / DeepSpeed's wrapper)
        # and is stepped by us once per applied update: accelerate's scheduler wrapper would step it once per
        # process.
        self.scheduler = build_scheduler(optimizer, cfg, self.total_steps)
        if backend.accelerator.is_main_process:  # before prepare: a sharding backend shrinks each parameter
            print(trainable_table(model, cfg.lrs), flush=True)
        sp = build_sp_group(self.dims)  # groups of ranks sharing each row (1: none)
        self.loss_module = sequence_parallel_loss_module(model, cfg.loss_chunk_size, sp)
        self.module, self.optimizer = backend.prepare(self.loss_module, optimizer)

    def release(self) -> None:
        """Sequence parallelism: the model gets its own attention back."""
        if hasattr(self.loss_module, "release"):
            self.loss_module.release()


def _votes(step_loss: torch.Tensor, stop: bool) -> torch.Tensor:
    """This rank's loss sum and its stop vote, to be summed over ranks."""
    return torch.stack(
        [step_loss.double(), torch.tensor(float(stop), dtype=torch.float64, device=step_loss.device)]
    )


def _counters(state: LoopState, finite: bool) -> dict[str, Any]:
    return {
        "step": state.step,
        "epoch": state.epoch,
        "skipped_nonfinite": state.skipped_nonfinite,
        "nonfinite": not finite,
    }


def _nonfinite_message(state: LoopState, tolerance: int) -> str:
    return (
        f"{state.consecutive_nonfinite} consecutive steps with a non-finite loss or gradient norm "
        f"(nan_tolerance={tolerance}), last at step {state.step}: check the data of these steps "
        "(metrics.jsonl), the learning rates and the precision"
    )


__all__ = ["EveryNSteps", "MidRunEvaluator", "build_accelerator", "fit"]
