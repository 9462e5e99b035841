"""The packer that turns an epoch of samples into balanced micro-batches.

The pipeline for one epoch (``build_epoch_plan`` runs all of it):

1. the cost table (:mod:`.costs`): every record's ``(num_tokens, num_patches)``, measured once and cached; a
   failed record has cost ``-1`` and is reported, never silently lost and never decoded later.
2. ``plan_mixture`` (:mod:`.mixture`) draws the epoch's sample list ``(dataset, record)`` from the datasets'
   weights / repeats / caps.
3. ``pack`` fills micro-batches under a token budget *and* a vision-patch budget (best-fit-decreasing inside a
   shuffle buffer), then deals them to data-parallel ranks so that every rank has the same number of
   micro-batches and about the same tokens and patches per step.

Unlike the official VideoLLaMA3 code, which concatenates whatever lands in one batch (docs/reference.md §4), this is
bin packing: rows are ~98% full, and the straggler rank of a step carries at most a few percent more work.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .config import DatasetConfig
from .costs import PATCHES, TOKENS
from .mixture import plan_mixture

logger = logging.getLogger(__name__)


# ============================================================================================================
# Packing
# ============================================================================================================


@dataclass
class PackPlan:
    """One epoch's micro-batches for every data-parallel rank.

    ``micro_batches[rank][i]``: sample ids of rank ``rank``'s ``i``-th micro-batch; every rank has the same
    count, and step ``i`` of every rank carries similar work. A sample id indexes ``entries`` (``(dataset,
    record)``) when the plan came from a mixture, else it is the record index itself. ``oversized``: ids over
    a budget on their own (never packed, reported). ``failed``: ids whose cost pre-pass failed. ``leftover``:
    ids of the micro-batches that did not fill a whole step of ``num_ranks * grad_accum`` (the least-filled
    ones); they are not trained this epoch. With ``pack(drop_last=False)`` there is no leftover: those rows
    form the epoch's last step instead, padded with empty rows (``[]``, no sample).

    The trainer reads a plan built with ``num_ranks = G`` (packed rows per optimizer step, over all ranks) and
    ``grad_accum = 1`` as the GLOBAL plan of the epoch: column ``i`` is optimizer step ``i``, its ``G`` rows
    are split over however many ranks run it (``data.loader.PackedLoader``), so the plan, and what each step
    trains on, do not depend on the world size.
    """

    micro_batches: list[list[list[int]]]
    costs: np.ndarray
    max_tokens: int
    max_patches: int
    entries: list[tuple[int, int]] | None = None
    oversized: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    leftover: list[int] = field(default_factory=list)
    seed: int = 0
    epoch: int = 0

    @property
    def num_ranks(self) -> int:
        return len(self.micro_batches)

    @property
    def steps(self) -> int:
        """Micro-batches per rank."""
        return len(self.micro_batches[0]) if self.micro_batches else 0

    def fill_ratio(self) -> float:
        rows = [mb for rank in self.micro_batches for mb in rank if mb]  # padding rows are not packed rows
        return fill_ratio(self.costs, rows, self.max_tokens)

    def balance(self) -> dict[str, float]:
        return rank_balance(self.costs, self.micro_batches)

    def stats(self) -> dict[str, float]:
        """Numbers worth logging once per epoch."""
        packed = sum(len(mb) for rank in self.micro_batches for mb in rank)
        return {
            "micro_batches_per_rank": self.steps,
            "samples_packed": packed,
            "samples_oversized": len(self.oversized),
            "samples_failed": len(self.failed),
            "samples_leftover": len(self.leftover),
            "fill_ratio": self.fill_ratio(),
            **{f"balance_{k}": v for k, v in self.balance().items()},
        }


def fill_ratio(costs: np.ndarray, micro_batches: Sequence[Sequence[int]], max_tokens: int) -> float:
    """Real tokens / (micro-batches * token budget): 1.0 means no padding-equivalent waste."""
    if not micro_batches:
        return 0.0
    used = sum(int(costs[list(mb), TOKENS].sum()) for mb in micro_batches)
    return used / (len(micro_batches) * max_tokens)


def rank_balance(costs: np.ndarray, micro_batches: Sequence[Sequence[Sequence[int]]]) -> dict[str, float]:
    """max/mean over ranks (1.0 = perfect) of tokens and patches.

    ``*_epoch``: totals over the epoch per rank. ``*_step``: per step ``i`` (the micro-batch every rank runs
    at the same time, what a synchronous step waits on), averaged over steps; ``*_step_worst`` the worst step.
    """
    ranks = len(micro_batches)
    steps = min((len(r) for r in micro_batches), default=0)
    if ranks == 0 or steps == 0:
        return {}
    load = np.zeros((ranks, steps, 2), dtype=np.float64)
    for r, rank in enumerate(micro_batches):
        for s in range(steps):
            load[r, s] = costs[list(rank[s])].sum(axis=0)
    out = {}
    for col, name in ((TOKENS, "tokens"), (PATCHES, "patches")):
        total = load[:, :, col].sum(axis=1)
        out[f"{name}_epoch"] = _max_over_mean(total)
        per_step = np.array([_max_over_mean(load[:, s, col]) for s in range(steps)])
        out[f"{name}_step"] = float(per_step.mean())
        out[f"{name}_step_worst"] = float(per_step.max())
    return out


def _max_over_mean(x: np.ndarray) -> float:
    mean = float(x.mean())
    return float(x.max()) / mean if mean > 0 else 1.0


def _best_fit_decreasing(
    ids: np.ndarray, costs: np.ndarray, max_tokens: int, max_patches: int
) -> list[tuple[list[int], int, int]]:
    """Bins ``(ids, tokens, patches)`` for ``ids`` (all fit alone): largest first, each into the open bin it
    leaves with the least normalised slack, else a new bin."""
    t = costs[ids, TOKENS].astype(np.float64) / max_tokens
    p = costs[ids, PATCHES].astype(np.float64) / max_patches
    order = np.lexsort((-p, -(t + p)))  # by combined size, then patches, decreasing
    room_t = np.empty(len(ids))
    room_p = np.empty(len(ids))
    members: list[list[int]] = []
    for k in order:
        nb = len(members)
        if nb:
            fits = (room_t[:nb] >= t[k] - 1e-12) & (room_p[:nb] >= p[k] - 1e-12)
            if fits.any():
                slack = np.where(fits, (room_t[:nb] - t[k]) + (room_p[:nb] - p[k]), np.inf)
                b = int(np.argmin(slack))
                room_t[b] -= t[k]
                room_p[b] -= p[k]
                members[b].append(int(ids[k]))
                continue
        room_t[nb] = 1.0 - t[k]
        room_p[nb] = 1.0 - p[k]
        members.append([int(ids[k])])
    return [(m, int(costs[m, TOKENS].sum()), int(costs[m, PATCHES].sum())) for m in members]


def pack(
    costs: np.ndarray,
    order: Sequence[int] | np.ndarray,
    *,
    max_tokens: int,
    max_patches: int,
    buffer_size: int = 2048,
    num_ranks: int = 1,
    grad_accum: int = 1,
    seed: int = 0,
    epoch: int = 0,
    close_fill: float = 0.97,
    entries: list[tuple[int, int]] | None = None,
    drop_last: bool = True,
) -> PackPlan:
    """Pack the samples ``order`` (ids into ``costs`` (N, 2) = tokens, patches) into balanced micro-batches.

    Packing: ``order`` is consumed ``buffer_size`` ids at a time (the shuffle buffer: a larger buffer packs
    tighter but mixes less); inside the buffer, best-fit-decreasing under both budgets. Bins below
    ``close_fill`` of both budgets are reopened into the next buffer, so that only the last buffer leaves
    half-empty rows. Items over a budget on their own go to ``oversized``; items with a negative cost to
    ``failed``. The order of ``order`` is kept at buffer granularity: pass it shuffled (``plan_mixture``
    does).

    Distribution: bins are sorted by patches, then tokens, and cut into groups of ``num_ranks`` consecutive
    bins, so each step puts similar bins side by side; inside a group the bin with the most work
    (tokens/max_tokens + patches/max_patches) goes to the rank with the least work so far (LPT), so epoch
    totals stay level too. The step order is then shuffled (seeded by ``seed, epoch``). When the bin count is
    not a multiple of ``num_ranks * grad_accum``, the bins with the fewest tokens are left out and their ids
    listed in ``leftover`` (counted, never silent); with ``drop_last=False`` they make a last, partial step
    instead (after the shuffled ones), padded with empty rows, so every packed sample is trained.
    """
    if max_tokens <= 0 or max_patches <= 0:
        raise ValueError(f"budgets must be positive, got max_tokens={max_tokens}, max_patches={max_patches}")
    if num_ranks < 1 or grad_accum < 1 or buffer_size < 1:
        raise ValueError("num_ranks, grad_accum and buffer_size must be >= 1")
    costs = np.asarray(costs, dtype=np.int64)
    order = np.asarray(order, dtype=np.int64)
    if costs.ndim != 2 or costs.shape[1] != 2:
        raise ValueError(f"costs must have shape (N, 2), got {costs.shape}")

    c = costs[order]
    failed_mask = (c < 0).any(axis=1)
    over_mask = ~failed_mask & ((c[:, TOKENS] > max_tokens) | (c[:, PATCHES] > max_patches))
    failed = order[failed_mask].tolist()
    oversized = order[over_mask].tolist()
    if oversized:
        logger.warning(
            "%d samples exceed the budget of %d tokens / %d patches on their own and are not packed",
            len(oversized),
            max_tokens,
            max_patches,
        )
    good = order[~failed_mask & ~over_mask]

    # --- best-fit-decreasing inside a shuffle buffer
    # --------------------------------------------------------------------------------------------------------
    bins: list[tuple[list[int], int, int]] = []
    carry = np.empty(0, dtype=np.int64)
    for start in range(0, len(good), buffer_size):
        chunk = np.concatenate([carry, good[start : start + buffer_size]])
        last = start + buffer_size >= len(good)
        packed = _best_fit_decreasing(chunk, costs, max_tokens, max_patches)
        if last:
            bins.extend(packed)
            carry = np.empty(0, dtype=np.int64)
            continue
        reopen = []
        for b in packed:
            full = b[1] >= close_fill * max_tokens or b[2] >= close_fill * max_patches
            if full:
                bins.append(b)
            else:
                reopen.extend(b[0])
        carry = np.asarray(reopen, dtype=np.int64)
    if len(carry):
        bins.extend(_best_fit_decreasing(carry, costs, max_tokens, max_patches))

    # --- deal bins to ranks
    # --------------------------------------------------------------------------------------------------------
    bin_tokens = np.array([t for _, t, _ in bins], dtype=np.int64)
    bin_patches = np.array([p for _, _, p in bins], dtype=np.int64)
    work = bin_tokens / max_tokens + bin_patches / max_patches
    # The rows that do not make a whole step are the least filled ones (the tail of the last buffer).
    by_fill = np.argsort(-bin_tokens, kind="stable")
    group = num_ranks * grad_accum
    keep = (len(bins) // group) * group
    tail = by_fill[keep:]  # too few rows for a whole step
    leftover = [i for b in tail for i in bins[b][0]] if drop_last else []
    # Token fill is nearly uniform after packing while patches vary a lot between bins (text vs video), so
    # bins side by side in a step are matched on patches first, then tokens.
    kept = by_fill[:keep]
    kept = kept[np.lexsort((-bin_tokens[kept], -bin_patches[kept]))]

    rank_load = np.zeros(num_ranks)

    def deal(order: np.ndarray) -> list[list[list[int]]]:
        """``steps[s][rank] -> ids`` for bins ``order`` (-1: an empty padding row), ``num_ranks`` per step."""
        out = []
        for s in range(len(order) // num_ranks):
            step_bins = order[s * num_ranks : (s + 1) * num_ranks]
            step_work = np.array([work[b] if b >= 0 else 0.0 for b in step_bins])
            step_bins = step_bins[np.argsort(-step_work, kind="stable")]
            assignment: list[list[int]] = [[] for _ in range(num_ranks)]
            for r, b in zip(np.argsort(rank_load, kind="stable"), step_bins, strict=True):
                if b >= 0:
                    assignment[r] = bins[b][0]
                    rank_load[r] += work[b]
            out.append(assignment)
        return out

    steps = deal(kept)
    rng = np.random.default_rng([seed, epoch, 0xBA1])
    steps = [steps[i] for i in rng.permutation(len(steps))]
    if not drop_last and len(tail):
        padded = np.full(group, -1, dtype=np.int64)
        padded[: len(tail)] = np.sort(tail)  # packing order: the partial step is the same on every rank count
        steps += deal(padded)
    micro_batches = [[steps[s][r] for s in range(len(steps))] for r in range(num_ranks)]
    return PackPlan(
        micro_batches=micro_batches,
        costs=costs,
        max_tokens=max_tokens,
        max_patches=max_patches,
        entries=entries,
        oversized=oversized,
        failed=failed,
        leftover=leftover,
        seed=seed,
        epoch=epoch,
    )


def build_epoch_plan(
    specs: Sequence[DatasetConfig],
    costs: Sequence[np.ndarray],
    *,
    seed: int,
    epoch: int,
    max_tokens: int,
    max_patches: int,
    buffer_size: int = 2048,
    num_ranks: int = 1,
    grad_accum: int = 1,
    drop_last: bool = True,
) -> PackPlan:
    """Mixture + packing for one epoch. ``costs[d]``: the cost table (N_d, 2) of dataset ``d``. Sample ids of
    the plan index ``plan.entries`` -> ``(dataset, record)``. ``drop_last``: see :func:`pack`."""
    sizes = [len(c) for c in costs]
    entries = plan_mixture(specs, sizes, seed, epoch)
    ent = np.asarray(entries, dtype=np.int64).reshape(-1, 2)
    table = np.empty((len(entries), 2), dtype=np.int64)
    for d, c in enumerate(costs):
        rows = ent[:, 0] == d
        table[rows] = np.asarray(c, dtype=np.int64)[ent[rows, 1]]
    return pack(
        table,
        np.arange(len(entries)),
        max_tokens=max_tokens,
        max_patches=max_patches,
        buffer_size=buffer_size,
        num_ranks=num_ranks,
        grad_accum=grad_accum,
        seed=seed,
        epoch=epoch,
        entries=entries,
        drop_last=drop_last,
    )
