"""PackedLoader: one rank's micro-batches of an epoch's GLOBAL packing plan, encoded in worker processes, resumable
at any world size.

Design:

* The epoch's plan is global and independent of the world size: a :class:`~.packing.PackPlan` of ``G`` rows
  per optimizer step (the global batch; :class:`~.packing.EpochPlanner` derives ``G`` from
  ``trainer.global_batch_samples``, or from ``trainer.grad_accum x world size`` when that is unset) lists, for
  each optimizer step ``s``, its ``G`` rows ``plan.row(s, v)`` (``v``: the row's *slot*).
  What a step trains on is fixed by the plan; only who computes which row depends on the world size ``W``:
  rank ``r`` runs slots ``r, r + W, r + 2W, ...``, i.e. ``grad_accum = ceil(G / W)`` micro-batches per step
  (``packing.grad_accum_for``).
  When ``W`` does not divide ``G`` the missing slots are empty rows, yielded as empty markers (the trainer runs
  a label-free placeholder for them, so every rank does the same number of forward/backward passes).
* The cursor is global: ``state_dict()`` saves the epoch and the optimizer steps of it consumed (``step``: the
  rows consumed are ``step x G``; ``samples``, the samples in those rows, checks that the data did not change),
  plus this rank's exact micro-batch ``position`` and skip counters. Loaded at the same world size the position
  is exact; at another one (:meth:`PackedLoader.reshard_state` merges the states every saved rank wrote) the new
  ranks start at the next step's rows and the rest of the epoch is dealt over the new world: no sample of the
  epoch is seen twice or skipped, and every later step trains on the same rows as it would have. A cursor moves
  to another world size only at a step boundary (where checkpoints are written). Nothing is replayed or
  re-decoded; prefetched but unconsumed batches are simply produced again after a restart.
* A ``torch`` ``DataLoader`` with ``batch_size=None`` runs over *tasks* ``(epoch, index, keys)``: the sampler
  (main process) hands each worker the ``(dataset, record)`` keys of one micro-batch; the worker encodes them
  with ``encode_fn`` and collates the row. Because the task carries everything that changes per epoch, the
  dataset held by the (persistent) workers never changes and workers live as long as the loader.
* Randomness inside ``encode_fn`` (if any) is seeded per row from ``(seed, epoch, step, slot)``, so a row's
  samples do not depend on which worker, which rank or how many ranks encoded it.
* Leftover rows: the rows that do not fill a whole step of ``G`` become the epoch's last step (a smaller one,
  padded with empty rows, ``packing.deal``): every packed sample of the epoch is trained once and nothing is
  carried into the next epoch.
* Bad data (``on_error="skip"``): a sample whose ``encode_fn`` raises ``DataError`` is dropped from its
  micro-batch, counted by reason, and the first error of each reason is logged with its message. A micro-batch
  whose samples all failed is yielded as an *empty marker* ``{"empty": True, "meta": [], "sample_lengths": [],
  "num_skipped": n}`` (see :func:`is_empty`): ranks must stay in lock-step, so the trainer decides what to run
  for it (e.g. a forward with zero loss weight), instead of the loader silently substituting another sample.
  ``on_error="raise"`` propagates the error. Any other exception is a bug and always propagates.
* Preemption: the workers ignore SIGTERM (a job's SIGTERM reaches the whole process group); the trainer turns it
  into a checkpoint after the current step and a clean exit, which needs its workers alive until then.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..contract import EMPTY_KEY, is_empty
from .collate import collate_packed
from .errors import DataError
from .packing import EpochPlanner, PackPlan, grad_accum_for

logger = logging.getLogger(__name__)

EncodeFn = Callable[[int, int], dict]
__all__ = ["DatasetEncoder", "PackedLoader", "is_empty"]  # is_empty: re-exported from the contract
# Packing plans kept in memory (see PackedLoader.plan): one epoch's plan holds a few ids per sample, so two cover
# the current epoch and the next one (the trainer asks for micro-batch counts ahead) without holding every epoch.
PLANS_KEPT = 2
# Version tag of PackedLoader.state_dict(): the global cursor (older states were per-rank positions).
CURSOR_FORMAT = "global-cursor-1"


class DatasetEncoder:
    """A picklable ``encode_fn(dataset_idx, record_idx) -> Sample`` over several annotation tables.

    ``encode``: e.g. ``data.encode.encode_record``, called as
    ``encode(records[d][r], data_root=roots[d], dataset=names[d], index=r, **kwargs)`` (``kwargs`` carries the
    processor and the ``EncodeConfig``, never the model).
    """

    def __init__(
        self,
        records: Sequence[Sequence[Any]],
        roots: Sequence[str],
        names: Sequence[str],
        encode: Callable[..., dict],
        **kwargs: Any,
    ):
        if not len(records) == len(roots) == len(names):
            raise ValueError(
                f"need one root and one name per dataset, got {len(records)}, {len(roots)}, {len(names)}"
            )
        self.records, self.roots, self.names = list(records), list(roots), list(names)
        self.encode, self.kwargs = encode, kwargs

    def __call__(self, dataset_idx: int, record_idx: int) -> dict:
        record = self.records[dataset_idx][record_idx]
        return self.encode(
            record,
            data_root=self.roots[dataset_idx],
            dataset=self.names[dataset_idx],
            index=record_idx,
            **self.kwargs,
        )


class _Task(NamedTuple):
    epoch: int
    index: int  # this rank's micro-batch index in the epoch
    keys: list[tuple[int, int]]
    row: tuple[int, int]  # (optimizer step, slot) of the row in the epoch's global plan: its seed


class _TaskSampler(Sampler):
    """Yields this epoch's tasks from ``start``; reconfigured by the loader before each pass."""

    def __init__(self):
        self.tasks: list[_Task] = []
        self.start = 0

    def __iter__(self) -> Iterator[_Task]:
        return iter(self.tasks[self.start :])

    def __len__(self) -> int:
        return max(len(self.tasks) - self.start, 0)


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed python/numpy/torch for one micro-batch and restore the previous states afterwards (with
    ``num_workers=0`` this runs in the training process, whose RNG streams must not be disturbed)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class _EncodeDataset(Dataset):
    def __init__(self, encode_fn: EncodeFn, collate_fn: Callable, on_error: str, seed: int):
        self.encode_fn, self.collate_fn = encode_fn, collate_fn
        self.on_error, self.seed = on_error, seed

    def __getitem__(self, task: _Task) -> dict[str, Any]:
        seed = int(np.random.SeedSequence([self.seed, task.epoch, *task.row]).generate_state(1)[0])
        samples, skipped = [], []
        with _seeded(seed):
            for d, r in task.keys:
                try:
                    samples.append(self.encode_fn(d, r))
                except DataError as e:
                    if self.on_error == "raise":
                        raise
                    skipped.append((e.reason, str(e.locate(index=r))))
        if samples:
            batch = self.collate_fn(samples)
        else:
            batch = {EMPTY_KEY: True, "meta": [], "sample_lengths": [], "num_skipped": len(skipped)}
        return {"index": task.index, "batch": batch, "skipped": skipped}


def _identity(item: Any) -> Any:
    return item


def _ignore_sigterm(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """A preemption's SIGTERM reaches the whole process group, data workers included (torchrun, Slurm), but it is
    the trainer's to handle: it finishes the step, checkpoints and exits 0, with the workers still needed until
    then (a killed worker would abort the run). The workers end with the loader, or when their parent is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _start(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """``iter(loader)``, with the trainer's garbage collected before worker processes fork (the first ``iter()`` of
    a loader with workers forks them) and nothing the trainer holds collectable in them.

    A forked worker that frees an FFmpeg object the trainer made hangs for ever: a held-out evaluation decodes
    videos in the trainer, its PyAV filter graphs (unreachable cycles, freed by the collector) own swscale
    worker threads, and freeing one in the worker waits in ``pthread_cond_destroy`` for threads that exist only
    in the trainer (seen: the tiny pipeline stopped for 25 minutes at the start of stage 3, the worker in
    ``avfilter_graph_free`` called from the collector). So: collect in the trainer, where the threads live, and
    freeze what is left so that a worker's collector never visits it."""
    if not loader.num_workers:
        return iter(loader)
    gc.collect()
    gc.freeze()
    try:
        return iter(loader)
    finally:
        gc.unfreeze()


class PackedLoader:
    """Iterate rank ``rank``'s collated micro-batches of the epoch's global plan, one epoch per ``iter()``.

    ``plan``: a :class:`PackPlan` (the same micro-batches every epoch), an :class:`EpochPlanner` (a fresh mixture
    and packing per epoch, step counts without plans) or any ``plan(epoch) -> PackPlan`` (must be deterministic,
    it is called again after a resume). Either way the plan is global: ``plan.rows_per_step`` is ``G``, the
    packed rows of one optimizer step over all ranks, and must be the same in every epoch (module docstring). ``world_size``: the ranks that share each step's rows (default
    ``G``: one row per rank per step); rank ``rank`` gets :attr:`grad_accum` micro-batches per step.
    Follows ``contract.Loader``: ``micro_batches_per_epoch``, ``set_epoch``, ``state_dict`` /
    ``load_state_dict``, ``skipped``, ``token_budget``; and :meth:`reshard_state` for a checkpoint of another
    world size. ``encode_fn(dataset, record) -> Sample`` must be picklable when ``num_workers > 0`` (see
    :class:`DatasetEncoder`); the sample's key is ``plan.entries[id]``, or ``(0, id)`` for a plan built
    without a mixture. ``on_error``: ``"skip"`` or ``"raise"`` (see the module docstring). Yields packed rows
    from ``collate_fn`` (default :func:`collate_packed`) or empty markers (:func:`is_empty`).
    """

    def __init__(
        self,
        plan: PackPlan | EpochPlanner | Callable[[int], PackPlan],
        rank: int,
        encode_fn: EncodeFn,
        *,
        world_size: int | None = None,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        seed: int = 0,
        on_error: str = "skip",
        collate_fn: Callable[[list[dict]], dict] = collate_packed,
        timeout: float = 0,
        max_bad_fraction: float | None = None,
        min_samples_before_abort: int = 100,
    ):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self._plan_arg = plan
        self.rank = rank
        self.seed = seed
        self._epoch = 0
        self._position = 0  # micro-batches of the current epoch this rank has yielded
        self._skipped: Counter = Counter()
        self._seen = 0  # samples attempted (kept or skipped), over the whole run
        # a bad file is skipped and counted; a bad *dataset* (more than this share failing) stops the run
        self.max_bad_fraction = max_bad_fraction
        self.min_samples_before_abort = min_samples_before_abort
        self._logged_reasons: set[str] = set()
        self._plans: dict[int, PackPlan] = {}  # epoch -> plan, at most PLANS_KEPT (see plan())
        # epoch -> optimizer steps of the epoch, for every epoch planned so far (ints: kept for the whole run)
        self._steps: dict[int, int] = {}
        self.rows_per_step = self.plan(0).rows_per_step  # G: packed rows of one optimizer step, all ranks
        self.world_size = int(world_size) if world_size is not None else self.rows_per_step
        if self.world_size < 1 or not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} ranks")
        self._sampler = _TaskSampler()
        self._loader = DataLoader(
            _EncodeDataset(encode_fn, collate_fn, on_error, seed),
            batch_size=None,
            sampler=self._sampler,
            num_workers=num_workers,
            collate_fn=_identity,
            pin_memory=pin_memory and torch.cuda.is_available(),
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            persistent_workers=num_workers > 0,
            worker_init_fn=_ignore_sigterm if num_workers > 0 else None,
            timeout=timeout,
            # DataLoader draws a base seed per iteration; an own generator keeps the trainer's global RNG
            # untouched.
            generator=torch.Generator().manual_seed(seed),
        )

    @property
    def grad_accum(self) -> int:
        """Micro-batches this rank runs per optimizer step: ``ceil(G / world_size)`` (the trainer's grad_accum)."""
        return grad_accum_for(self.rows_per_step, self.world_size)

    @property
    def padding_per_step(self) -> int:
        """Empty rows per optimizer step over all ranks (``grad_accum x world - G``): idle micro-batches."""
        return self.grad_accum * self.world_size - self.rows_per_step

    # --- plan
    # --------------------------------------------------------------------------------------------------------
    def plan(self, epoch: int) -> PackPlan:
        """The global packing plan of ``epoch``, built once and kept while it may still be needed.

        The plan is asked for by resume and by iteration (and, with a plain ``plan(epoch)`` callable, by the
        trainer's step counts of every epoch; an :class:`EpochPlanner` counts without planning). At most
        ``PLANS_KEPT`` plans are kept: past epochs go first, then the furthest future one, so a look-ahead over all
        epochs does not evict the epochs about to run. Step counts of every epoch seen are kept apart
        (``micro_batches_per_epoch``).
        """
        if isinstance(self._plan_arg, PackPlan):
            return self._plan_arg
        epoch = int(epoch)
        if epoch in self._plans:
            return self._plans[epoch]
        plan = self._plan_arg(epoch)
        if hasattr(self, "rows_per_step") and plan.rows_per_step != self.rows_per_step:
            raise ValueError(
                f"the plan of epoch {epoch} has {plan.rows_per_step} rows per step, epoch 0's has "
                f"{self.rows_per_step}"
            )
        self._steps[epoch] = plan.steps
        self._plans[epoch] = plan
        while len(self._plans) > PLANS_KEPT:
            past = [e for e in self._plans if e < self._epoch]
            del self._plans[min(past) if past else max(self._plans)]
        return plan

    def _rows(self, plan: PackPlan, step: int) -> list[np.ndarray]:
        """This rank's rows of optimizer ``step`` in micro-step order (slots ``rank + j x world``); empty pads."""
        G, W = self.rows_per_step, self.world_size
        empty = np.empty(0, dtype=np.int64)
        return [plan.row(step, v) if v < G else empty for v in range(self.rank, self.grad_accum * W, W)]

    # --- iteration
    # --------------------------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Micro-batches of the current epoch already yielded by this rank (the next one to come)."""
        return self._position

    @property
    def skipped(self) -> dict[str, int]:
        """Samples dropped for bad data so far, by DataError reason."""
        return dict(self._skipped)

    def __len__(self) -> int:
        """Micro-batches of this rank in the current epoch (the whole epoch, not only what remains)."""
        return self.micro_batches_per_epoch(self._epoch)

    @property
    def token_budget(self) -> int:
        """Tokens per packed row the plan was built for (``data.max_tokens``): the trainer's packing-fill
        denominator; the same in every epoch, so any plan kept answers it."""
        kept = next(iter(self._plans.values()), None)
        return (kept or self.plan(self._epoch)).max_tokens

    def micro_batches_per_epoch(self, epoch: int) -> int:
        """Micro-batches of this rank in ``epoch``: the epoch's optimizer steps (plans differ a little from epoch
        to epoch) times :attr:`grad_accum`. An :class:`EpochPlanner` counts an epoch's steps without building its
        plan; with another ``plan(epoch)`` the plan is built (and kept, see :meth:`plan`)."""
        if isinstance(self._plan_arg, PackPlan):
            return self._plan_arg.steps * self.grad_accum
        if int(epoch) not in self._steps and isinstance(self._plan_arg, EpochPlanner):
            self._steps[int(epoch)] = self._plan_arg.steps(epoch)
        if int(epoch) not in self._steps:
            self.plan(epoch)
        return self._steps[int(epoch)] * self.grad_accum

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first micro-batch at the next ``iter()`` (the trainer calls this at each
        epoch boundary, whether or not the previous iterator was exhausted)."""
        self._epoch = int(epoch)
        self._position = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self.plan(self._epoch)
        n = plan.steps * self.grad_accum
        if self._position > n:
            raise ValueError(f"resume position {self._position} is past the epoch's {n} micro-batches")
        tasks = []
        for s in range(plan.steps):
            for j, mb in enumerate(self._rows(plan, s)):
                tasks.append(
                    _Task(self._epoch, len(tasks), plan.keys(mb), (s, self.rank + j * self.world_size))
                )
        self._sampler.tasks = tasks
        self._sampler.start = self._position
        for item in _start(self._loader):
            self._position = item["index"] + 1
            self._count_skips(item["skipped"])
            batch = item["batch"]
            self._seen += len(batch.get("meta", ())) + len(item["skipped"])
            self._check_bad_fraction()
            yield batch
        if self._skipped:
            logger.info("epoch %d: samples skipped so far by reason: %s", self._epoch, dict(self._skipped))
        self._epoch += 1
        self._position = 0

    def _check_bad_fraction(self) -> None:
        bad = sum(self._skipped.values())
        if self.max_bad_fraction is None or self._seen < self.min_samples_before_abort:
            return
        if bad / self._seen > self.max_bad_fraction:
            raise RuntimeError(
                f"{bad} of {self._seen} samples failed to decode ({dict(self._skipped)}), more than "
                f"data.max_bad_fraction={self.max_bad_fraction}: the data is broken, not a few files. Run "
                "`python -m videollama3_train.doctor` on it, fix or drop the failing files, or raise "
                "data.max_bad_fraction"
            )

    def _count_skips(self, skipped: list[tuple[str, str]]) -> None:
        for reason, message in skipped:
            self._skipped[reason] += 1
            if reason not in self._logged_reasons:
                self._logged_reasons.add(reason)
                logger.warning(
                    "skipping bad sample (further '%s' errors are only counted): %s", reason, message
                )

    # --- resume
    # --------------------------------------------------------------------------------------------------------
    def samples_before(self, epoch: int, step: int) -> int:
        """Samples in the first ``step`` optimizer steps of ``epoch`` (all ranks): the global sample cursor."""
        return self.plan(epoch).samples_before(step)

    def state_dict(self) -> dict[str, Any]:
        """Plain dict for the checkpoint: the global cursor (epoch, optimizer steps of it consumed, rows per step,
        samples consumed), this rank's exact position, and its skip counters."""
        step = self._position // self.grad_accum
        return {
            "format": CURSOR_FORMAT,
            "epoch": self._epoch,
            "step": step,
            "rows_per_step": self.rows_per_step,
            "samples": self.samples_before(self._epoch, step),
            "world_size": self.world_size,
            "rank": self.rank,
            "position": self._position,
            "seed": self.seed,
            "skipped": dict(self._skipped),
            "seen": self._seen,
        }

    def reshard_state(self, states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """This rank's state from the states every rank of a run at another world size saved (one per saved rank,
        in rank order): the shared global cursor; the skip counters summed into rank 0 (totals are kept)."""
        if not states:
            raise ValueError("no saved loader state to reshard")
        first = states[0]
        _check_format(first)
        for st in states:
            _check_format(st)
            if st["position"] % _grad_accum_of(st):
                raise ValueError(
                    f"rank {st['rank']}'s saved position {st['position']} is inside an optimizer step: a cursor "
                    "moves to another world size only at a step boundary"
                )
            if (st["epoch"], st["step"], st["rows_per_step"], st["seed"]) != (
                first["epoch"],
                first["step"],
                first["rows_per_step"],
                first["seed"],
            ):
                raise ValueError(f"the saved ranks disagree on the data cursor: {first} vs {st}")
        total: Counter = Counter()
        for st in states:
            total.update(st.get("skipped", {}))
        mine = self.rank == 0
        return {
            **first,
            "world_size": self.world_size,
            "rank": self.rank,
            "position": first["step"] * self.grad_accum,
            "skipped": dict(total) if mine else {},
            "seen": sum(int(st.get("seen", 0)) for st in states) if mine else 0,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s cursor. The plan must be the one the state was saved under (same seed, data,
        budgets and rows per step ``G``: the global batch); the world size may differ when the state comes from
        :meth:`reshard_state`. A mismatch is refused rather than resumed at a wrong place."""
        _check_format(state)
        if state["seed"] != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        if state["rows_per_step"] != self.rows_per_step:
            raise ValueError(
                f"the checkpoint's optimizer steps hold {state['rows_per_step']} packed rows, this loader's "
                f"{self.rows_per_step}: the global batch changed (trainer.global_batch_samples, or "
                "trainer.grad_accum x world size when that is unset), exact resume is impossible"
            )
        if (state["world_size"], state["rank"]) != (self.world_size, self.rank):
            raise ValueError(
                f"state of rank {state['rank']} of {state['world_size']}, this loader is rank {self.rank} of "
                f"{self.world_size}: use reshard_state() for a checkpoint of another world size"
            )
        epoch, step = int(state["epoch"]), int(state["step"])
        steps = self.micro_batches_per_epoch(epoch) // self.grad_accum
        if step > steps or self.samples_before(epoch, step) != state["samples"]:
            raise ValueError(
                f"the plan of epoch {epoch} has {steps} steps and {self.samples_before(epoch, step)} samples "
                f"before step {step}, the saved cursor {state['samples']}: data or budgets changed, exact "
                "resume is impossible"
            )
        self._epoch = epoch
        self._position = int(state["position"])
        self._skipped = Counter(state.get("skipped", {}))
        self._seen = int(state.get("seen", 0))
        self._logged_reasons = set(self._skipped)


def _grad_accum_of(state: dict[str, Any]) -> int:
    return grad_accum_for(int(state["rows_per_step"]), int(state["world_size"]))


def _check_format(state: dict[str, Any]) -> None:
    if state.get("format") != CURSOR_FORMAT:
        raise ValueError(
            "this loader state was written before the global data cursor (a per-rank position of a plan packed "
            "for one world size): resume it with the version of the code that wrote it, or start the run over"
        )
