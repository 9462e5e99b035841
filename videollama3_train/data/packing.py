"""The packer: an epoch of samples -> packed rows -> optimizer steps of ``G`` rows. One rule for training and the
doctor (:class:`EpochPlanner`).

The pipeline for one epoch:

1. the cost table (:mod:`.costs`): every record's ``(num_tokens, num_patches)``, measured once and cached; a
   failed record has cost ``-1`` and is reported, never silently lost and never decoded later.
2. ``mixture_table`` (:mod:`.mixture`) draws the epoch's samples ``(dataset, record)`` from the datasets'
   weights / repeats / caps.
3. :func:`~.binpack.bin_pack` fills rows under a token budget *and* a vision-patch budget: best-fit-decreasing inside
   shuffle buffers of ``buffer_size`` samples, every buffer at once (numpy over buffers, :mod:`.binpack`);
   rows left below ``close_fill`` are packed again with the next ones.
4. :func:`deal` cuts the rows into optimizer steps of ``G`` rows (*slots*), rows of similar work side by side, so
   that whichever ranks run a step's slots wait little on each other; the steps are shuffled.

:class:`PackPlan` is always the GLOBAL plan of an epoch (step ``s``, slot ``v``), independent of the world size;
``data.loader.PackedLoader`` deals each step's slots to the ranks. :class:`EpochPlanner` is the one place where
``G`` (rows per optimizer step) and each epoch's plan and step count are decided; ``data.build`` (training) and
``data.scan`` (the doctor) both use it, so the doctor reports the steps training runs.

Unlike the official VideoLLaMA3 code, which concatenates whatever lands in one batch (docs/reference.md §4), this is
bin packing: rows are ~99.5% full, and the straggler rank of a step carries at most a few percent more work.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .balance import COMPUTE, level_steps, patch_order
from .binpack import MemoryBound, Rows, bin_pack, row_sums
from .config import DatasetConfig
from .cost_model import ActivationModel, SampleCostModel
from .costs import PATCHES, PATCHES_SQ, TOKENS, VISUAL_TOKENS
from .mixture import mixture_table

logger = logging.getLogger(__name__)

__all__ = [
    "EpochPlanner",
    "MemoryBound",
    "PackPlan",
    "Rows",
    "bin_pack",
    "build_epoch_plan",
    "deal",
    "fill_ratio",
    "global_rows_per_step",
    "grad_accum_for",
    "max_over_mean",
    "pack",
    "per_rank",
    "rank_balance",
    "row_flops",
]

# ============================================================================================================
# Steps: dealing rows to the slots of optimizer steps
# ============================================================================================================


def deal(
    rows: Rows,
    rows_per_step: int,
    *,
    work: np.ndarray | None = None,
    seed: int = 0,
    epoch: int = 0,
) -> np.ndarray:
    """The epoch's steps, ``(S, G)``: the row of each step's slot (``-1``: an empty padding row).

    Without ``work`` (each row's predicted compute), rows are sorted by patches, then tokens (token fill is nearly
    uniform after packing while patches vary a lot between rows, text against video), and cut into steps of
    ``G = rows_per_step`` consecutive rows, so a step's rows are alike and whichever ranks run them wait little on
    each other; the ``R mod G`` rows with the fewest patches form the partial step. With ``work``, the steps are
    level on compute, tokens and patches at once (:func:`.balance.level_steps`: bands of compute sorted by patches,
    the partial step at a gap in compute, a repair of the worst steps, never worse than the patch order on tokens
    and patches). Inside a step the heaviest row takes slot 0 on even steps and the last slot on odd ones, so a
    slot's total over the epoch stays level too. The steps are shuffled (seeded by ``seed, epoch``); the partial
    step is the epoch's last, padded with empty rows, so every packed sample is trained.
    """
    if rows_per_step < 1:
        raise ValueError(f"rows_per_step must be >= 1, got {rows_per_step}")
    g = rows_per_step
    if work is None:
        steps, left = patch_order(rows.load.astype(np.float64), g)
    else:
        load = np.column_stack([rows.load[:, :2].astype(np.float64), np.asarray(work, dtype=np.float64)])
        steps, left = level_steps(load, g)
        # heaviest first inside a step (the patch order already is)
        heavy = np.argsort(-load[steps, COMPUTE], axis=1, kind="stable")
        steps = np.take_along_axis(steps, heavy, axis=1)
    steps = steps.copy()
    steps[1::2] = steps[1::2, ::-1]
    steps = steps[np.random.default_rng([seed, epoch, 0xBA1]).permutation(len(steps))]
    if len(left):
        tail = np.full((1, g), -1, dtype=np.int64)
        tail[0, : len(left)] = np.sort(left)  # in packing order: the same partial step on any world size
        steps = np.concatenate([steps, tail])
    return steps.astype(np.int64).reshape(-1, g)


@dataclass
class PackPlan:
    """One epoch's GLOBAL plan: optimizer step ``s`` trains the ``G`` rows ``steps[s]`` (slots ``0..G-1``; row
    ``-1`` is an empty padding row, only in the last step). Who runs which slot depends on the world size and is
    the loader's business (``data.loader``), so the plan, and what each step trains on, do not.

    A sample id indexes ``entries`` (``(dataset, record)``, shape ``(N, 2)``) when the plan came from a mixture,
    else it is the record index itself. ``rows.oversized`` / ``rows.failed``: the samples not packed (reported).
    """

    rows: Rows
    steps_rows: np.ndarray
    costs: np.ndarray
    max_tokens: int
    max_patches: int
    entries: np.ndarray | None = None
    seed: int = 0
    epoch: int = 0
    work: np.ndarray | None = None  # (R,) each row's predicted training FLOPs, when a cost model planned it

    @classmethod
    def from_slots(
        cls,
        slots: Sequence[Sequence[Sequence[int]]],
        costs: np.ndarray,
        max_tokens: int,
        max_patches: int,
        entries: Sequence[tuple[int, int]] | None = None,
    ) -> PackPlan:
        """A hand-made plan: ``slots[v][s]`` = the sample ids of slot ``v`` of step ``s`` (``[]``: padding)."""
        flat = [mb for slot in slots for mb in slot]
        rows = Rows.from_lists([mb for mb in flat if mb], costs)
        index = np.cumsum([bool(mb) for mb in flat]) - 1
        table = np.where([bool(mb) for mb in flat], index, -1).reshape(len(slots), -1).T
        ent = None if entries is None else np.asarray(entries, dtype=np.int64).reshape(-1, 2)
        return cls(rows, np.ascontiguousarray(table, dtype=np.int64), costs, max_tokens, max_patches, ent)

    @property
    def rows_per_step(self) -> int:
        """``G``: slots (packed rows) of every optimizer step."""
        return int(self.steps_rows.shape[1])

    @property
    def steps(self) -> int:
        """Optimizer steps of the epoch."""
        return int(self.steps_rows.shape[0])

    @property
    def oversized(self) -> np.ndarray:
        return self.rows.oversized

    @property
    def failed(self) -> np.ndarray:
        return self.rows.failed

    def row(self, step: int, slot: int) -> np.ndarray:
        """Sample ids of ``slot`` of ``step`` (empty for a padding row)."""
        r = int(self.steps_rows[step, slot])
        return self.rows.row(r) if r >= 0 else self.rows.ids[:0]

    def keys(self, ids: np.ndarray) -> list[tuple[int, int]]:
        """``(dataset, record)`` of sample ids."""
        if self.entries is None:
            return [(0, int(i)) for i in ids]
        return [(int(d), int(r)) for d, r in self.entries[ids]]

    @property
    def micro_batches(self) -> list[list[list[int]]]:
        """``[slot][step] -> sample ids`` as lists: a view for small plans (tests, reports)."""
        return [[self.row(s, v).tolist() for s in range(self.steps)] for v in range(self.rows_per_step)]

    def samples_before(self, step: int) -> int:
        """Samples in the first ``step`` optimizer steps (all slots): the global sample cursor."""
        r = self.steps_rows[: max(0, min(step, self.steps))]
        return int(self.rows.sizes[r[r >= 0]].sum())

    def fill_ratio(self) -> float:
        return fill_ratio(self.rows, self.max_tokens)

    def slot_loads(self) -> np.ndarray:
        """``(S, G, 2)``: tokens and patches of every slot of every step (0 for padding)."""
        load = np.zeros((*self.steps_rows.shape, 2), dtype=np.int64)
        real = self.steps_rows >= 0
        load[real] = self.rows.load[self.steps_rows[real]]
        return load

    def balance(self, world_size: int | None = None) -> dict[str, float]:
        """:func:`rank_balance` of the ranks of ``world_size`` (default: one rank per slot); the padded last step
        is left out (its empty slots are idle by construction, :attr:`padding` in ``data.loader``)."""
        load = self.slot_loads()
        if self.work is not None:  # predicted compute as a third column
            work = np.where(self.steps_rows >= 0, self.work[np.maximum(self.steps_rows, 0)], 0.0)
            load = np.concatenate([load.astype(np.float64), work[..., None]], axis=2)
        whole = load[: self.steps - 1] if self.steps > 1 and (self.steps_rows[-1] < 0).any() else load
        return rank_balance(per_rank(whole, world_size or self.rows_per_step))

    def stats(self) -> dict[str, float]:
        """Numbers worth logging once per epoch."""
        return {
            "micro_batches_per_rank": self.steps,
            "samples_packed": int(len(self.rows.ids)),
            "samples_oversized": int(len(self.oversized)),
            "samples_failed": int(len(self.failed)),
            "samples_over_memory": int(len(self.rows.over_memory)),
            "fill_ratio": self.fill_ratio(),
            **{f"balance_{k}": v for k, v in self.balance().items()},
        }


def per_rank(slot_load: np.ndarray, world_size: int) -> np.ndarray:
    """``(S, W, ...)``: the load of each rank per step, from ``(S, G, ...)`` per slot, rank ``r`` running slots
    ``r, r + W, ...`` (``data.loader``'s rule)."""
    s, g = slot_load.shape[:2]
    ga = grad_accum_for(g, world_size)
    padded = np.zeros((s, ga * world_size, *slot_load.shape[2:]), dtype=slot_load.dtype)
    padded[:, :g] = slot_load
    return padded.reshape(s, ga, world_size, *slot_load.shape[2:]).sum(axis=1)


def fill_ratio(rows: Rows, max_tokens: int) -> float:
    """Real tokens / (rows * token budget): 1.0 means no padding-equivalent waste."""
    return float(rows.load[:, TOKENS].sum()) / (len(rows) * max_tokens) if len(rows) else 0.0


def rank_balance(load: np.ndarray) -> dict[str, float]:
    """max/mean over ranks (1.0 = perfect) of tokens, patches and, when given, predicted compute (the last axis of
    ``load``, ``(S, W, 2 or 3)``).

    ``*_epoch``: totals over the epoch per rank. ``*_step``: per step (what a synchronous step waits on), the mean
    over steps; ``*_step_worst`` the worst step; ``*_step_median`` the median step."""
    if load.size == 0:
        return {}
    out = {}
    for col, name in ((TOKENS, "tokens"), (PATCHES, "patches"), (2, "compute"))[: load.shape[2]]:
        out[f"{name}_epoch"] = float(max_over_mean(load[:, :, col].sum(axis=0)))
        per_step = max_over_mean(load[:, :, col], axis=1)
        out[f"{name}_step"] = float(per_step.mean())
        out[f"{name}_step_median"] = float(np.median(per_step))
        out[f"{name}_step_worst"] = float(per_step.max())
    return out


def max_over_mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """max / mean along ``axis`` (1.0 where the mean is 0)."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=axis)
    return np.where(mean > 0, x.max(axis=axis) / np.where(mean > 0, mean, 1.0), 1.0)


def pack(
    costs: np.ndarray,
    order: Sequence[int] | np.ndarray,
    *,
    max_tokens: int,
    max_patches: int,
    buffer_size: int = 2048,
    rows_per_step: int = 1,
    seed: int = 0,
    epoch: int = 0,
    close_fill: float = 0.97,
    entries: np.ndarray | Sequence[tuple[int, int]] | None = None,
) -> PackPlan:
    """:func:`bin_pack` then :func:`deal`: the global plan of ``G = rows_per_step`` rows per optimizer step."""
    rows = bin_pack(
        costs,
        order,
        max_tokens=max_tokens,
        max_patches=max_patches,
        buffer_size=buffer_size,
        close_fill=close_fill,
    )
    ent = None if entries is None else np.asarray(entries, dtype=np.int64).reshape(-1, 2)
    steps = deal(rows, rows_per_step, seed=seed, epoch=epoch)
    return PackPlan(rows, steps, np.asarray(costs, dtype=np.int64), max_tokens, max_patches, ent, seed, epoch)


# ============================================================================================================
# The one packing rule: rows per step and the plan of every epoch
# ============================================================================================================


def global_rows_per_step(
    global_batch_samples: int | None, grad_accum: int, world_size: int, samples_per_row: float
) -> int:
    """``G``, the packed rows of one optimizer step over all ranks.

    With ``global_batch_samples`` (the recipe's batch in samples) it is ``round(global_batch_samples /
    samples_per_row)`` (at least 1), ``samples_per_row`` being epoch 0's mean: the same on every world size, so a
    recipe trains on the same steps on 1, 8 or 64 GPUs and a run can resume at another world size. Without it,
    ``grad_accum x world_size`` (``trainer.grad_accum`` rows per rank, as before: the global batch then scales
    with the world size)."""
    if global_batch_samples is None:
        return grad_accum * world_size
    if global_batch_samples < 1:
        raise ValueError(f"trainer.global_batch_samples must be >= 1 or None, got {global_batch_samples}")
    if not samples_per_row > 0:
        raise ValueError("no packed row in epoch 0: cannot turn trainer.global_batch_samples into rows")
    return max(1, round(global_batch_samples / samples_per_row))


def grad_accum_for(rows_per_step: int, world_size: int) -> int:
    """Micro-batches each rank runs per optimizer step: ``ceil(G / world_size)`` (slots ``r, r + W, ...``). The
    one place gradient accumulation is decided; the loader and the trainer read it from here."""
    return -(-int(rows_per_step) // int(world_size))


def epoch_samples(specs: Sequence[DatasetConfig], costs: Sequence[np.ndarray], seed: int, epoch: int):
    """``(entries, table)``: the epoch's mixture ``(N, 2)`` (dataset, record) and its cost table (every column of
    the datasets' tables: tokens, patches, and what a cost model reads)."""
    entries = mixture_table(specs, [len(c) for c in costs], seed, epoch)
    width = max((np.asarray(c).shape[1] for c in costs), default=2)
    table = np.full((len(entries), width), -1, dtype=np.int64)  # a column a dataset lacks: -1, not known
    for d, c in enumerate(costs):
        rows = entries[:, 0] == d
        c = np.asarray(c, dtype=np.int64)
        table[rows, : c.shape[1]] = c[entries[rows, 1]]
    return entries, table


def build_epoch_plan(
    specs: Sequence[DatasetConfig],
    costs: Sequence[np.ndarray],
    *,
    seed: int,
    epoch: int,
    max_tokens: int,
    max_patches: int,
    buffer_size: int = 2048,
    rows_per_step: int = 1,
) -> PackPlan:
    """Mixture + packing for one epoch. ``costs[d]``: the cost table (N_d, 2) of dataset ``d``. Sample ids of
    the plan index ``plan.entries`` -> ``(dataset, record)``."""
    entries, table = epoch_samples(specs, costs, seed, epoch)
    return pack(
        table,
        np.arange(len(entries)),
        max_tokens=max_tokens,
        max_patches=max_patches,
        buffer_size=buffer_size,
        rows_per_step=rows_per_step,
        seed=seed,
        epoch=epoch,
        entries=entries,
    )


def row_flops(model: SampleCostModel, table: np.ndarray, rows: Rows) -> np.ndarray:
    """``(R,)`` predicted training FLOPs of each row: the sum of its samples' (``table`` columns
    ``VISUAL_TOKENS`` and ``PATCHES_SQ``, when present, are each sample's visual LLM tokens and tower
    ``sum P_f^2``; -1 where not known)."""
    extra = {}
    if table.shape[1] > PATCHES_SQ:
        extra = {"visual_tokens": table[:, VISUAL_TOKENS], "patches_sq": table[:, PATCHES_SQ]}
    per_sample = model.sample_flops(table[:, :2], **extra)
    return row_sums(per_sample[rows.ids], rows.offsets)


class EpochPlanner:
    """The one packing rule, for training (``data.build``) and the doctor (``data.scan``) alike: ``G`` rows per
    optimizer step and every epoch's plan, from the datasets' cost tables and the budgets.

    ``G`` (:attr:`rows_per_step`) comes from epoch 0's rows (:func:`global_rows_per_step`), which are packed once
    and kept: epoch 0 is packed once. Epoch ``e``'s step count (:meth:`steps`) is ``ceil(rows_e / G)``, ``rows_e``
    its number of packed rows, known by bin packing alone (no dealing, nothing kept), so the schedule of every
    epoch is exact without holding their plans. ``world_size`` (data-parallel ranks, or sequence-parallel groups)
    only decides :attr:`grad_accum`; the plans do not depend on it. With a ``cost_model`` the rows of a step are
    level on predicted training FLOPs (:mod:`.cost_model`) as well as tokens and patches (:mod:`.balance`). With
    ``activation`` (:class:`~.cost_model.ActivationModel`) and ``max_activation_bytes`` > 0 no row's predicted
    activation peak exceeds that bound (a sample over it alone is reported oversized).
    """

    def __init__(
        self,
        specs: Sequence[DatasetConfig],
        costs: Sequence[np.ndarray],
        *,
        seed: int,
        max_tokens: int,
        max_patches: int,
        buffer_size: int = 2048,
        global_batch_samples: int | None = None,
        grad_accum: int = 1,
        world_size: int = 1,
        cost_model: SampleCostModel | None = None,
        activation: ActivationModel | None = None,
        max_activation_bytes: int = 0,
    ):
        self.specs, self.costs = list(specs), [np.asarray(c, dtype=np.int64) for c in costs]
        self.cost_model = cost_model
        self.activation = activation if max_activation_bytes > 0 else None
        self.max_activation_bytes = int(max_activation_bytes)
        self.seed, self.max_tokens, self.max_patches, self.buffer_size = (
            seed,
            max_tokens,
            max_patches,
            buffer_size,
        )
        self.world_size = world_size
        self._rows0 = self._pack(0)
        rows = self._rows0[2]
        self.samples_per_row = len(rows.ids) / len(rows) if len(rows) else 0.0
        self.rows_per_step = global_rows_per_step(
            global_batch_samples, grad_accum, world_size, self.samples_per_row
        )
        self._steps: dict[int, int] = {0: -(-len(rows) // self.rows_per_step)}

    @property
    def grad_accum(self) -> int:
        return grad_accum_for(self.rows_per_step, self.world_size)

    def _pack(self, epoch: int) -> tuple[np.ndarray, np.ndarray, Rows]:
        entries, table = epoch_samples(self.specs, self.costs, self.seed, epoch)
        memory = None
        if self.activation is not None:
            budgets = (self.max_tokens, self.max_patches)
            memory = self.activation.bound(table, self.max_activation_bytes, budgets)
        rows = bin_pack(
            table,
            np.arange(len(entries)),
            max_tokens=self.max_tokens,
            max_patches=self.max_patches,
            buffer_size=self.buffer_size,
            memory=memory,
        )
        return entries, table, rows

    def steps(self, epoch: int) -> int:
        """Optimizer steps of ``epoch`` (bin packing only; cached as an int)."""
        epoch = int(epoch)
        if epoch not in self._steps:
            self._steps[epoch] = -(-len(self._pack(epoch)[2]) // self.rows_per_step)
        return self._steps[epoch]

    def plan(self, epoch: int) -> PackPlan:
        """The global plan of ``epoch`` (epoch 0's rows are the ones packed at construction)."""
        epoch = int(epoch)
        # epoch 0's rows are handed over once (the loader keeps the plan); asked again, it is packed again
        packed, self._rows0 = (
            (self._rows0, None) if epoch == 0 and self._rows0 is not None else (None, self._rows0)
        )
        entries, table, rows = packed or self._pack(epoch)
        work = None if self.cost_model is None else row_flops(self.cost_model, table, rows)
        steps = deal(rows, self.rows_per_step, work=work, seed=self.seed, epoch=epoch)
        self._steps[epoch] = len(steps)
        return PackPlan(
            rows, steps, table, self.max_tokens, self.max_patches, entries, self.seed, epoch, work
        )

    __call__ = plan
