"""PackedLoader: one rank's micro-batches of a :class:`PackPlan`, encoded in worker processes, resumable.

Design:

* A torch ``DataLoader`` with ``batch_size=None`` runs over *tasks* ``(epoch, index, keys)``: the sampler
  (main process) hands each worker the ``(dataset, record)`` keys of one micro-batch; the worker encodes them
  with ``encode_fn`` and collates the row. Because the task carries everything that changes per epoch, the
  dataset held by the (persistent) workers never changes and workers live as long as the loader.
* Resume: the loader counts the micro-batches it has *yielded*; ``state_dict()`` saves ``(epoch, position)``
  and ``load_state_dict()`` starts the sampler at that position — nothing is replayed or re-decoded.
  Prefetched but unconsumed batches are simply produced again after a restart.
* Randomness inside ``encode_fn`` (if any) is seeded per micro-batch from ``(seed, epoch, rank, index)``, so
  the batches do not depend on which worker ran them or on ``num_workers``.
* Bad data (``on_error="skip"``): a sample whose ``encode_fn`` raises ``DataError`` is dropped from its
  micro-batch, counted by reason, and the first error of each reason is logged with its message. A micro-batch
  whose samples all failed is yielded as an *empty marker* ``{"empty": True, "meta": [], "sample_lengths": [],
  "num_skipped": n}`` (see :func:`is_empty`): ranks must stay in lock-step, so the trainer decides what to run
  for it (e.g. a forward with zero loss weight), instead of the loader silently substituting another sample.
  ``on_error="raise"`` propagates the error. Any other exception is a bug and always propagates.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .collate import collate_packed
from .errors import DataError
from .packing import PackPlan

logger = logging.getLogger(__name__)

EncodeFn = Callable[[int, int], dict]


def is_empty(batch: dict[str, Any]) -> bool:
    """True for the marker of a micro-batch whose samples all failed to encode."""
    return bool(batch.get("empty", False))


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
    index: int
    keys: list[tuple[int, int]]


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
    def __init__(self, encode_fn: EncodeFn, collate_fn: Callable, on_error: str, seed: int, rank: int):
        self.encode_fn, self.collate_fn = encode_fn, collate_fn
        self.on_error, self.seed, self.rank = on_error, seed, rank

    def __getitem__(self, task: _Task) -> dict[str, Any]:
        seed = int(
            np.random.SeedSequence([self.seed, task.epoch, self.rank, task.index]).generate_state(1)[0]
        )
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
            batch = {"empty": True, "meta": [], "sample_lengths": [], "num_skipped": len(skipped)}
        return {"index": task.index, "batch": batch, "skipped": skipped}


def _identity(item: Any) -> Any:
    return item


class PackedLoader:
    """Iterate rank ``rank``'s collated micro-batches of ``plan``, one epoch per ``iter()``.

    ``plan``: a :class:`PackPlan` (the same micro-batches every epoch) or ``plan(epoch) -> PackPlan`` (a fresh
    mixture and packing per epoch; must be deterministic, it is called again after a resume).
    ``encode_fn(dataset, record) -> Sample`` must be picklable when ``num_workers > 0`` (see
    :class:`DatasetEncoder`); the sample's key is ``plan.entries[id]``, or ``(0, id)`` for a plan built
    without a mixture. ``on_error``: ``"skip"`` or ``"raise"`` (see the module docstring). Yields packed rows
    from ``collate_fn`` (default :func:`collate_packed`) or empty markers (:func:`is_empty`).
    """

    def __init__(
        self,
        plan: PackPlan | Callable[[int], PackPlan],
        rank: int,
        encode_fn: EncodeFn,
        *,
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
        self._position = 0
        self._skipped: Counter = Counter()
        self._seen = 0  # samples attempted (kept or skipped), over the whole run
        # a bad file is skipped and counted; a bad *dataset* (more than this share failing) stops the run
        self.max_bad_fraction = max_bad_fraction
        self.min_samples_before_abort = min_samples_before_abort
        self._logged_reasons: set[str] = set()
        self._cached_plan: tuple[int, PackPlan] | None = None
        self._check_rank(self._plan(0))
        self._sampler = _TaskSampler()
        self._loader = DataLoader(
            _EncodeDataset(encode_fn, collate_fn, on_error, seed, rank),
            batch_size=None,
            sampler=self._sampler,
            num_workers=num_workers,
            collate_fn=_identity,
            pin_memory=pin_memory and torch.cuda.is_available(),
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            persistent_workers=num_workers > 0,
            timeout=timeout,
            # DataLoader draws a base seed per iteration; an own generator keeps the trainer's global RNG
            # untouched.
            generator=torch.Generator().manual_seed(seed),
        )

    # --- plan
    # --------------------------------------------------------------------------------------------------------
    def _plan(self, epoch: int) -> PackPlan:
        if isinstance(self._plan_arg, PackPlan):
            return self._plan_arg
        if self._cached_plan is None or self._cached_plan[0] != epoch:
            self._cached_plan = (epoch, self._plan_arg(epoch))
        return self._cached_plan[1]

    def _check_rank(self, plan: PackPlan) -> None:
        if not 0 <= self.rank < plan.num_ranks:
            raise ValueError(f"rank {self.rank} is outside the plan's {plan.num_ranks} ranks")

    # --- iteration
    # --------------------------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Micro-batches of the current epoch already yielded (the next one to come)."""
        return self._position

    @property
    def skipped(self) -> dict[str, int]:
        """Samples dropped for bad data so far, by DataError reason."""
        return dict(self._skipped)

    def __len__(self) -> int:
        """Micro-batches of this rank in the current epoch (the whole epoch, not only what remains)."""
        return len(self._plan(self._epoch).micro_batches[self.rank])

    @property
    def token_budget(self) -> int:
        """Tokens per packed row the plan was built for (``data.max_tokens``): the trainer's packing-fill
        denominator."""
        return self._plan(self._epoch).max_tokens

    def micro_batches_per_epoch(self, epoch: int) -> int:
        """Micro-batches of this rank in ``epoch`` (plans differ a little from epoch to epoch)."""
        if isinstance(self._plan_arg, PackPlan):
            return len(self._plan_arg.micro_batches[self.rank])
        return len(self._plan_arg(epoch).micro_batches[self.rank])

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first micro-batch at the next ``iter()`` (the trainer calls this at each
        epoch boundary, whether or not the previous iterator was exhausted)."""
        self._epoch = int(epoch)
        self._position = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self._plan(self._epoch)
        self._check_rank(plan)
        mbs = plan.micro_batches[self.rank]
        if self._position > len(mbs):
            raise ValueError(f"resume position {self._position} is past the epoch's {len(mbs)} micro-batches")
        entries = plan.entries
        self._sampler.tasks = [
            _Task(self._epoch, i, [entries[s] if entries is not None else (0, s) for s in mb])
            for i, mb in enumerate(mbs)
        ]
        self._sampler.start = self._position
        for item in self._loader:
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
    def state_dict(self) -> dict[str, Any]:
        """Plain dict for the checkpoint: where the next micro-batch is, and the skip counters."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "rank": self.rank,
            "seed": self.seed,
            "micro_batches": len(self),
            "skipped": dict(self._skipped),
            "seen": self._seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s next micro-batch. The plan must be the one the state was saved under (same
        seed, ranks and data); a different micro-batch count is refused rather than resumed at a wrong
        place."""
        if state["rank"] != self.rank:
            raise ValueError(f"state was saved by rank {state['rank']}, this loader is rank {self.rank}")
        if state["seed"] != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        self._epoch = int(state["epoch"])
        n = len(self)
        if state["micro_batches"] != n:
            raise ValueError(
                f"the plan of epoch {self._epoch} has {n} micro-batches for rank {self.rank} but the saved "
                f"state had {state['micro_batches']}: data, budgets or world size changed, exact resume is "
                "impossible"
            )
        self._position = int(state["position"])
        self._skipped = Counter(state.get("skipped", {}))
        self._seen = int(state.get("seen", 0))
        self._logged_reasons = set(self._skipped)
