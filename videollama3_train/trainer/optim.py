"""Optimizer, learning-rate schedule and the number of steps they run for.

AdamW with one learning rate per component group (``model.groups``: a group trains exactly when it has one; norms
and biases get no weight decay). The schedule is transformers' linear warmup then cosine / linear decay to 0, or
constant; it drives the raw optimizer's param groups, which accelerate's and DeepSpeed's wrappers share, and the
loop steps it once per applied update (a skipped non-finite step does not advance it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from videollama3_train.contract import Loader
from videollama3_train.model.groups import build_param_groups
from videollama3_train.trainer.config import TrainConfig


def resolve_grad_accum(cfg: TrainConfig, loader: Loader) -> TrainConfig:
    """``cfg`` with ``grad_accum`` set to the loader's micro-batches per rank per optimizer step when the loader
    decides them (``PackedLoader``: ``ceil(G / world size)`` for the global batch of ``G`` packed rows, see
    ``data.loader``); otherwise (a loader without ``grad_accum``) ``cfg`` unchanged."""
    ga = getattr(loader, "grad_accum", None)
    if ga is None or int(ga) == cfg.grad_accum:
        return cfg
    return dataclasses.replace(cfg, grad_accum=int(ga))


class EpochSteps(Sequence):
    """Optimizer steps of each epoch, asked of the loader when first needed (``loader.micro_batches_per_epoch(e) //
    grad_accum``) and then kept: a run capped by ``trainer.max_steps`` never counts the epochs it does not reach."""

    def __init__(self, loader: Loader, epochs: int, grad_accum: int):
        self.loader, self.epochs, self.grad_accum = loader, epochs, grad_accum
        self._counts: dict[int, int] = {}

    def __len__(self) -> int:
        return self.epochs

    def __getitem__(self, epoch):
        if isinstance(epoch, slice):
            return [self[e] for e in range(*epoch.indices(self.epochs))]
        if not -self.epochs <= epoch < self.epochs:
            raise IndexError(epoch)
        epoch %= self.epochs
        if epoch not in self._counts:
            steps = self.loader.micro_batches_per_epoch(epoch) // self.grad_accum
            if steps < 1:
                raise ValueError(
                    f"epoch {epoch} of the loader yields fewer micro-batches than grad_accum={self.grad_accum}: not "
                    "one optimizer step fits"
                )
            self._counts[epoch] = steps
        return self._counts[epoch]


def plan_steps(cfg: TrainConfig, loader: Loader) -> tuple[int, EpochSteps]:
    """``(total_steps, optimizer steps per epoch)``. The loader says how many micro-batches each epoch has (packing
    plans differ a little per epoch). A ``PackedLoader``'s count is a whole number of steps (the rows short of a
    whole step make a last, smaller step, padded with empty rows); with another loader, micro-batches left at an
    epoch end (fewer than grad_accum) are dropped. ``cfg.max_steps`` beyond the planned epochs repeats the last
    epoch's length. Both are counted in optimizer steps, which do not depend on the world size when the global
    batch does not (``trainer.global_batch_samples``): the schedule of a run resumed at another world size goes
    on at the same step.

    The per-epoch counts are lazy (:class:`EpochSteps`): with ``cfg.max_steps`` set only epoch 0 is counted here;
    without it the total is their exact sum, every epoch counted once (a ``PackedLoader`` over an
    ``EpochPlanner`` counts an epoch by bin packing alone and keeps no plan for it).
    """
    per_epoch = EpochSteps(loader, cfg.epochs, cfg.grad_accum)
    per_epoch[0]  # noqa: B018 - fail here, before the model, when not one step fits
    total = cfg.max_steps if cfg.max_steps > 0 else sum(per_epoch)
    return total, per_epoch


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable groups at their effective learning rates (``cfg.lrs``); fused kernels on CUDA."""
    groups = build_param_groups(model, cfg.lrs, cfg.weight_decay)
    on_cuda = next(model.parameters()).is_cuda or torch.cuda.is_available()
    return torch.optim.AdamW(groups, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=on_cuda or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warmup over ``ceil(warmup_ratio * total_steps)`` steps, then cosine / linear decay to 0, or constant."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_schedule]
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``{"lr/<group>": current lr}`` of every trainable component group (its decay / no-decay halves share it)."""
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        name = str(g.get("name", "all")).removesuffix("_no_decay")
        out.setdefault(f"lr/{name}", float(g["lr"]))
    return out


__all__ = [
    "EpochSteps",
    "build_optimizer",
    "build_scheduler",
    "group_lrs",
    "plan_steps",
    "resolve_grad_accum",
]
