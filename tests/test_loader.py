"""PackedLoader: plan order, exact mid-epoch resume without replay (0 and 2 workers), skip policy, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from videollama3_train.data.errors import DataError
from videollama3_train.data.loader import DatasetEncoder, PackedLoader, is_empty
from videollama3_train.data.packing import DatasetSpec, build_epoch_plan, pack

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


def make_plan(seed: int = 0, num_ranks: int = 2):
    return pack(
        COSTS, np.arange(N), max_tokens=256, max_patches=1, buffer_size=64, num_ranks=num_ranks, seed=seed
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
    specs = [DatasetSpec("a", weight=0.5), DatasetSpec("b", weight=0.5)]

    def plan_fn(epoch: int):
        return build_epoch_plan(specs, costs, seed=0, epoch=epoch, max_tokens=256, max_patches=1, num_ranks=2)

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


def _two_tables(dataset: int, record: int) -> dict:
    return encode(dataset, record + 60 * dataset)


def test_all_failed_micro_batch_is_an_empty_marker():
    costs = np.array([[10, 0]] * 6)
    plan = pack(costs, np.arange(6), max_tokens=20, max_patches=1, num_ranks=1)

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
    other_world = PackedLoader(make_plan(num_ranks=3), 0, encode)
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
