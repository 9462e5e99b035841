"""PackedLoader: plan order, exact mid-epoch resume without replay (0 and 2 workers), skip policy, seeding."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch

from videollama3_train.data.config import DatasetConfig
from videollama3_train.data.errors import DataError
from videollama3_train.data.loader import DatasetEncoder, PackedLoader, is_empty
from videollama3_train.data.packing import build_epoch_plan, pack

N = 120
COSTS = np.stack([20 + (np.arange(N) * 37) % 90, np.zeros(N, dtype=np.int64)], axis=1)
BAD = {5, 40, 41}  # records whose encoding fails


def encode(dataset: int, record: int) -> dict:
    """Module-level (picklable) synthetic encoder: ids carry the record so batches can be checked; a random
    draw shows per-micro-batch seeding."""
    if record in BAD:
        raise DataError("corrupt_image", f"synthetic failure of record {record}")
    n = int(COSTS[record, 0])
    ids = torch.full((n,), record, dtype=torch.long)
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "meta": {"dataset": str(dataset), "index": record, "noise": float(torch.rand(()))},
    }


def make_plan(seed: int = 0, rows_per_step: int = 2):
    return pack(
        COSTS,
        np.arange(N),
        max_tokens=256,
        max_patches=1,
        buffer_size=64,
        rows_per_step=rows_per_step,
        seed=seed,
    )


def ids_of(batch: dict) -> list[int]:
    return [m["index"] for m in batch["meta"]]


def test_yields_the_plan_in_order_minus_bad_samples():
    plan = make_plan()
    loader = PackedLoader(plan, rank=1, encode_fn=encode)
    batches = list(loader)
    assert len(batches) == len(loader) == plan.steps
    for batch, mb in zip(batches, plan.micro_batches[1], strict=True):
        assert ids_of(batch) == [i for i in mb if i not in BAD]
        if not mb:  # the last step's padding row: an empty marker
            assert is_empty(batch)
            continue
        assert batch["input_ids"].shape == (1, sum(batch["sample_lengths"]))
    n_bad = sum(i in BAD for mb in plan.micro_batches[1] for i in mb)
    assert sum(loader.skipped.values()) == n_bad
    assert loader.epoch == 1 and loader.position == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_matches_uninterrupted(num_workers):
    plan = make_plan()
    full = [(ids_of(b), b["meta"]) for b in PackedLoader(plan, 0, encode, num_workers=num_workers)]
    assert len(full) > 10

    first = PackedLoader(plan, 0, encode, num_workers=num_workers, prefetch_factor=2)
    it = iter(first)
    head = [(ids_of(next(it)), None) for _ in range(7)]
    state = first.state_dict()
    assert state["position"] == 7 and state["epoch"] == 0
    del it, first

    calls = []

    def counting(d: int, r: int) -> dict:
        calls.append(r)
        return encode(d, r)

    resumed = PackedLoader(plan, 0, counting if num_workers == 0 else encode, num_workers=num_workers)
    resumed.load_state_dict(state)
    tail = [(ids_of(b), b["meta"]) for b in resumed]
    assert [h for h, _ in head] == [ids for ids, _ in full[:7]]
    assert tail == full[7:]  # same samples and the same per-sample random draws
    if num_workers == 0:  # nothing before the saved position was encoded again
        assert set(calls) == {i for mb in plan.micro_batches[0][7:] for i in mb}


def test_seeding_independent_of_workers_and_leaves_global_rng_alone():
    plan = make_plan()
    torch.manual_seed(123)
    expected_next = torch.rand(())
    torch.manual_seed(123)
    serial = [b["meta"] for b in PackedLoader(plan, 0, encode, num_workers=0)]
    assert torch.rand(()) == expected_next
    parallel = [b["meta"] for b in PackedLoader(plan, 0, encode, num_workers=2)]
    assert serial == parallel
    other_seed = [b["meta"] for b in PackedLoader(plan, 0, encode, seed=1)]
    assert other_seed != serial


def test_epochs_with_a_plan_per_epoch_and_resume_across():
    costs = [COSTS[:60], COSTS[60:]]
    specs = [DatasetConfig(name="a", weight=0.5), DatasetConfig(name="b", weight=0.5)]

    def plan_fn(epoch: int):
        return build_epoch_plan(
            specs, costs, seed=0, epoch=epoch, max_tokens=256, max_patches=1, rows_per_step=2
        )

    loader = PackedLoader(plan_fn, 1, _two_tables)
    e0 = [b["meta"] for b in loader]
    e1 = [b["meta"] for b in loader]
    assert loader.epoch == 2 and e0 != e1
    assert all(m["dataset"] in ("0", "1") for batch in e0 for m in batch)

    interrupted = PackedLoader(plan_fn, 1, _two_tables)
    list(interrupted)
    it = iter(interrupted)
    assert [next(it)["meta"] for _ in range(3)] == e1[:3]
    state = interrupted.state_dict()
    assert (state["epoch"], state["position"]) == (1, 3)
    again = PackedLoader(plan_fn, 1, _two_tables)
    again.load_state_dict(state)
    assert [b["meta"] for b in again] == e1[3:]


def test_each_epoch_is_planned_once():
    """The trainer asks for every epoch's count at start, then iterates the epochs: each plan is built once for
    both (the first two stay cached; a later one is rebuilt at most once), and the loader follows the contract."""
    from videollama3_train.contract import Loader

    costs = [COSTS[:60], COSTS[60:]]
    specs = [DatasetConfig(name="a", weight=0.5), DatasetConfig(name="b", weight=0.5)]
    built = []

    def plan_fn(epoch: int):
        built.append(epoch)
        return build_epoch_plan(
            specs, costs, seed=0, epoch=epoch, max_tokens=256, max_patches=1, rows_per_step=2
        )

    loader = PackedLoader(plan_fn, 0, _two_tables)
    assert isinstance(loader, Loader)
    counts = [loader.micro_batches_per_epoch(e) for e in range(3)]
    assert built == [0, 1, 2]
    assert [loader.micro_batches_per_epoch(e) for e in range(3)] == counts and built == [0, 1, 2]
    for e in range(3):
        loader.set_epoch(e)
        assert len(list(loader)) == counts[e]
    assert built == [0, 1, 2, 2]  # only the epoch beyond the two kept plans is packed again
    assert loader.plan(1) is loader.plan(1)


def _two_tables(dataset: int, record: int) -> dict:
    return encode(dataset, record + 60 * dataset)


def test_all_failed_micro_batch_is_an_empty_marker():
    costs = np.array([[10, 0]] * 6)
    plan = pack(costs, np.arange(6), max_tokens=20, max_patches=1, rows_per_step=1)

    def fail_first_bin(d: int, r: int) -> dict:
        if r in plan.micro_batches[0][0]:
            raise DataError("missing_file", "gone")
        return {"input_ids": torch.ones(10, dtype=torch.long), "labels": torch.ones(10, dtype=torch.long)}

    batches = list(PackedLoader(plan, 0, fail_first_bin))
    assert is_empty(batches[0]) and batches[0]["num_skipped"] == 2
    assert not any(is_empty(b) for b in batches[1:])


def test_raise_policy_and_bad_state():
    plan = make_plan()
    with pytest.raises(DataError, match="synthetic failure"):
        list(PackedLoader(plan, 0, encode, on_error="raise"))
    with pytest.raises(ValueError, match="on_error"):
        PackedLoader(plan, 0, encode, on_error="ignore")
    with pytest.raises(ValueError, match="outside"):
        PackedLoader(plan, 2, encode)
    state = PackedLoader(plan, 0, encode).state_dict()
    other_world = PackedLoader(make_plan(rows_per_step=3), 0, encode)
    with pytest.raises(ValueError, match="exact resume"):
        other_world.load_state_dict(state)


def test_dataset_encoder_passes_location():
    seen = []

    def fake_encode(record, *, data_root, dataset, index, **kw):
        seen.append((record, data_root, dataset, index, kw))
        return {}

    enc = DatasetEncoder([["a0", "a1"], ["b0"]], ["/ra", "/rb"], ["A", "B"], fake_encode, processor="P")
    enc(1, 0)
    enc(0, 1)
    assert seen == [("b0", "/rb", "B", 0, {"processor": "P"}), ("a1", "/ra", "A", 1, {"processor": "P"})]


# ----------------------------------------------------------------------------------------------------------------
# The global plan and the global cursor: the same steps on any world size, resume at another one
# ----------------------------------------------------------------------------------------------------------------


def make_global_plan(rows_per_step: int = 3, seed: int = 0):
    """A global plan: ``rows_per_step`` packed rows per optimizer step, the rows short of a whole step kept."""
    return make_plan(seed=seed, rows_per_step=rows_per_step)


def _steps_of(loaders: list[PackedLoader], start: int = 0, epoch: int | None = None) -> list[list[int]]:
    """Sample ids of each optimizer step from ``start`` on, all ranks together, from ``loaders`` (one per rank)
    iterated in lock-step (grad_accum micro-batches each per step, as the trainer takes them); ``epoch``: start
    that epoch first (``set_epoch``, as the trainer does at an epoch boundary), else go on from where they are."""
    if epoch is not None:
        for ld in loaders:
            ld.set_epoch(epoch)
    its = [iter(ld) for ld in loaders]
    ga = loaders[0].grad_accum
    steps = []
    for _ in range(start, loaders[0].micro_batches_per_epoch(loaders[0].epoch) // ga):
        ids = []
        for it in its:
            for _ in range(ga):
                ids += ids_of(next(it))
        steps.append(sorted(ids))
    return steps


def test_every_sample_is_trained_the_rows_short_of_a_step_in_a_last_padded_step():
    plan = make_global_plan(3)
    assert len(plan.rows) % 3  # this plan has rows short of a whole step
    packed = sorted(i for slot in plan.micro_batches for mb in slot for i in mb)
    assert packed == list(range(N))  # every sample of the epoch is in a row
    last = [slot[-1] for slot in plan.micro_batches]
    assert [] in last and any(last), last  # the partial step comes last, padded with empty rows
    assert all(all(slot[s] for slot in plan.micro_batches) for s in range(plan.steps - 1))
    assert plan.steps == len(plan.rows) // 3 + 1


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_step_trains_on_the_same_rows_on_every_world_size(world):
    """G = 3 rows per step dealt over 1..4 ranks (grad_accum 3, 2, 1, 1; padding rows where the world does not
    divide 3): every step's samples are those of the plan's column, every sample once per epoch."""
    plan = make_global_plan(3)
    loaders = [PackedLoader(plan, r, encode, world_size=world) for r in range(world)]
    assert loaders[0].grad_accum == -(-3 // world)
    assert loaders[0].padding_per_step == loaders[0].grad_accum * world - 3
    steps = _steps_of(loaders)
    expected = [
        sorted(i for slot in plan.micro_batches for i in slot[s] if i not in BAD) for s in range(plan.steps)
    ]
    assert steps == expected
    assert sorted(i for s in steps for i in s) == sorted(set(range(N)) - BAD)


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2), (2, 3), (3, 2)])
def test_resume_at_another_world_size_sees_every_sample_once(first, second):
    """Two epochs of a per-epoch plan; the first world runs 1 epoch and 2 steps, checkpoints every rank's state; the
    second world resumes from them (``reshard_state``): the steps after the cursor are the uninterrupted ones, no
    sample of the epoch is seen twice or skipped, the bad-sample counters keep their totals."""
    specs = [DatasetConfig(name="a")]

    def plan_fn(epoch: int):
        return build_epoch_plan(
            specs,
            [COSTS],
            seed=0,
            epoch=epoch,
            max_tokens=256,
            max_patches=1,
            buffer_size=64,
            rows_per_step=3,
        )

    reference = [PackedLoader(plan_fn, r, encode, world_size=1) for r in range(1)]
    ref_epochs = [_steps_of(reference, epoch=0), _steps_of(reference, epoch=1)]

    before = [PackedLoader(plan_fn, r, encode, world_size=first) for r in range(first)]
    assert _steps_of(before, epoch=0) == ref_epochs[0]  # epoch 0, whole
    for ld in before:
        ld.set_epoch(1)
    its = [iter(ld) for ld in before]
    head = []
    for _ in range(2):  # two steps of epoch 1
        ids = [i for it in its for _ in range(before[0].grad_accum) for i in ids_of(next(it))]
        head.append(sorted(ids))
    states = [ld.state_dict() for ld in before]
    assert {(s["epoch"], s["step"], s["rows_per_step"]) for s in states} == {(1, 2, 3)}
    # the global sample cursor: every sample of the first two steps, the bad ones (skipped, counted) included
    assert states[0]["samples"] == sum(len(slot[s]) for slot in plan_fn(1).micro_batches for s in range(2))
    skipped_total = sum(sum(s["skipped"].values()) for s in states)

    after = [PackedLoader(plan_fn, r, encode, world_size=second) for r in range(second)]
    for ld in after:
        ld.load_state_dict(ld.reshard_state(states))
    assert after[0].epoch == 1 and after[0].position == 2 * after[0].grad_accum
    assert sum(sum(ld.skipped.values()) for ld in after) == skipped_total
    tail = _steps_of(after, start=2)
    assert head + tail == ref_epochs[1]
    seen = [i for s in head + tail for i in s]
    assert sorted(seen) == sorted(set(range(N)) - BAD) and len(seen) == len(set(seen))


def test_a_cursor_moves_only_at_a_step_boundary_and_keeps_its_global_batch():
    plan = make_global_plan(4)
    loaders = [PackedLoader(plan, r, encode, world_size=2) for r in range(2)]  # grad_accum 2
    its = [iter(ld) for ld in loaders]
    for it in its:
        next(it)  # half of step 1
    states = [ld.state_dict() for ld in loaders]
    with pytest.raises(ValueError, match="inside an optimizer step"):
        PackedLoader(plan, 0, encode, world_size=1).reshard_state(states)
    same = PackedLoader(plan, 1, encode, world_size=2)
    same.load_state_dict(states[1])  # the same world: exact, mid-step too
    assert same.position == 1
    with pytest.raises(ValueError, match="reshard_state"):
        PackedLoader(plan, 0, encode, world_size=1).load_state_dict(states[0])
    with pytest.raises(ValueError, match="global batch changed"):
        PackedLoader(make_global_plan(2), 0, encode, world_size=2).load_state_dict(states[0])
    old = {"epoch": 0, "position": 3, "rank": 0, "seed": 0, "micro_batches": 10}
    with pytest.raises(ValueError, match="before the global data cursor"):
        PackedLoader(plan, 0, encode, world_size=2).load_state_dict(old)


def test_data_workers_survive_the_sigterm_meant_for_the_trainer():
    """A preemption's SIGTERM reaches the data workers too (torchrun, Slurm signal the process group): they ignore
    it, so the trainer can finish its step, checkpoint and exit cleanly; the epoch goes on unharmed."""
    import multiprocessing
    import os
    import signal

    plan = make_plan()
    loader = PackedLoader(plan, 0, encode, num_workers=1)
    it = iter(loader)
    first = [ids_of(next(it))]
    workers = multiprocessing.active_children()
    assert workers
    for w in workers:
        os.kill(w.pid, signal.SIGTERM)
    rest = [ids_of(b) for b in it]
    assert first + rest == [[i for i in mb if i not in BAD] for mb in plan.micro_batches[0]]


class _Finalised:
    """A reference cycle (freed only by the garbage collector) that writes the pid of the process freeing it."""

    def __init__(self, path) -> None:
        self.path, self.cycle = path, self

    def __del__(self) -> None:
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")


def encode_collecting(dataset: int, record: int) -> dict:
    gc.collect()  # what a worker's collector does sooner or later
    return encode(dataset, record)


def test_workers_never_free_the_trainers_garbage(tmp_path):
    """Garbage of the trainer at the moment the workers fork is freed in the trainer, never in a worker (a worker
    freeing the trainer's PyAV filter graph hangs in pthread_cond_destroy: loader._start)."""
    log = tmp_path / "freed_by"
    enabled = gc.isenabled()
    gc.disable()  # the cycle must still be garbage when the workers fork
    try:
        _Finalised(log)
        batches = list(PackedLoader(make_plan(), 0, encode_collecting, num_workers=1))
    finally:
        if enabled:
            gc.enable()
    assert batches
    assert log.read_text().split() == [str(os.getpid())]
