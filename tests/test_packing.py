"""Mixtures, the cost pre-pass (parallel, cached, tolerant of bad records), the packer (fill, balance)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from videollama3_train.data.config import DataConfig, DatasetConfig, EncodeConfig, check_data_and_encode
from videollama3_train.data.costs import compute_costs, cost_cache, cost_config_hash
from videollama3_train.data.errors import DataError
from videollama3_train.data.mixture import mixture_counts, plan_mixture
from videollama3_train.data.packing import (
    EpochPlanner,
    PackPlan,
    Rows,
    bin_pack,
    build_epoch_plan,
    fill_ratio,
    grad_accum_for,
    pack,
    per_rank,
    rank_balance,
)
from videollama3_train.data.pool import parallel_map

# ------------------------------------------------------------------------------------------------------------
# mixtures


def test_plan_mixture_deterministic_and_seeded():
    specs = [DatasetConfig(name="a"), DatasetConfig(name="b", repeat=2)]
    sizes = [50, 30]
    a = plan_mixture(specs, sizes, seed=1, epoch=0)
    assert a == plan_mixture(specs, sizes, seed=1, epoch=0)
    assert a != plan_mixture(specs, sizes, seed=2, epoch=0)
    assert a != plan_mixture(specs, sizes, seed=1, epoch=1)
    # same multiset each epoch: every record of a once, of b twice
    assert Counter(a) == Counter(plan_mixture(specs, sizes, seed=1, epoch=1))
    assert Counter(a) == Counter({**{(0, r): 1 for r in range(50)}, **{(1, r): 2 for r in range(30)}})


def test_plan_mixture_weights_within_one_percent():
    specs = [
        DatasetConfig(name="img", weight=0.5),
        DatasetConfig(name="vid", weight=0.3),
        DatasetConfig(name="txt", weight=0.2),
    ]
    sizes = [1000, 5000, 200]
    plan = plan_mixture(specs, sizes, seed=0, epoch=0)
    share = np.bincount([d for d, _ in plan], minlength=3) / len(plan)
    np.testing.assert_allclose(share, [0.5, 0.3, 0.2], atol=0.01)
    assert len(plan) == sum(sizes)
    # txt (200 records, 1240 draws) is repeated as evenly as possible: every record 6 or 7 times
    per_record = Counter(r for d, r in plan if d == 2)
    assert set(per_record.values()) <= {6, 7} and len(per_record) == 200
    # vid (5000 records, 1860 draws) is sampled without repeats
    assert max(Counter(r for d, r in plan if d == 1).values()) == 1


def test_weighted_with_unweighted_datasets():
    specs = [DatasetConfig(name="w", weight=0.25), DatasetConfig(name="u")]
    assert mixture_counts(specs, [10, 300]) == [100, 300]
    with pytest.raises(ValueError, match="below 1"):
        mixture_counts([DatasetConfig(name="w", weight=1.0), DatasetConfig(name="u")], [10, 10])


def test_cap_is_a_fixed_subset():
    specs = [DatasetConfig(name="big", max_samples=40), DatasetConfig(name="small")]
    e0 = {r for d, r in plan_mixture(specs, [1000, 5], seed=3, epoch=0) if d == 0}
    e1 = {r for d, r in plan_mixture(specs, [1000, 5], seed=3, epoch=1) if d == 0}
    assert len(e0) == 40 and e0 == e1


def test_spec_validation():
    with pytest.raises(ValueError, match="not both"):
        DatasetConfig(name="x", weight=0.5, repeat=2)
    with pytest.raises(ValueError, match="weight"):
        DatasetConfig(name="x", weight=1.5)
    with pytest.raises(ValueError, match=r"data.datasets.x: repeat must be >= 1"):
        DatasetConfig(name="x", repeat=0)
    with pytest.raises(ValueError, match="max_samples"):
        DatasetConfig(name="x", max_samples=0)
    with pytest.raises(ValueError, match="sizes"):
        mixture_counts([DatasetConfig(name="x")], [1, 2])


# ------------------------------------------------------------------------------------------------------------
# the data config


def test_mixture_validated_at_config_time_as_hydra_builds_it():
    """A bad dataset stops the config (before any cost pass), and named datasets get their key as name."""
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(DataConfig)
    bad = OmegaConf.merge(schema, {"datasets": {"imgs": {"path": "a.jsonl", "weight": 2.0}}})
    with pytest.raises(ValueError, match=r"weight must be in \(0, 1\], got 2.0"):
        OmegaConf.to_object(bad)
    good = OmegaConf.to_object(OmegaConf.merge(schema, {"datasets": {"imgs": {"path": "a.jsonl"}}}))
    assert good.datasets["imgs"].name == "imgs"


def test_resolved_datasets_and_check_paths(tmp_path):
    ann = tmp_path / "ann" / "a.jsonl"
    ann.parent.mkdir()
    ann.write_text("{}\n")
    media = tmp_path / "media"
    media.mkdir()
    cfg = DataConfig(
        path=str(ann),
        datasets={"b": DatasetConfig(path=str(ann), root=str(media), repeat=2)},
    )
    resolved = cfg.resolved_datasets()
    assert list(resolved) == ["main", "b"]
    assert resolved["main"].name == "main" and resolved["main"].root == str(ann.parent)
    assert resolved["b"].name == "b" and resolved["b"].root == str(media) and resolved["b"].repeat == 2
    cfg.check_paths()

    missing = DataConfig(datasets={"c": DatasetConfig(path=str(tmp_path / "nope.jsonl"))})
    with pytest.raises(
        FileNotFoundError, match=r"data.datasets.c.path: annotation file of dataset 'c' not found"
    ):
        missing.check_paths()
    with pytest.raises(
        FileNotFoundError, match=r"data.root: media root of dataset 'main' is not a directory"
    ):
        DataConfig(path=str(ann), root=str(tmp_path / "no_media")).check_paths()
    with pytest.raises(FileNotFoundError, match="data.heldout_path"):
        DataConfig(path=str(ann), heldout_path=str(tmp_path / "held.jsonl")).check_paths()


def test_data_and_encode_cross_checks():
    data = DataConfig(path="a.jsonl", max_tokens=1024, max_patches=4096)
    check_data_and_encode(data, EncodeConfig(max_length=1024, max_visual_tokens=1024))
    with pytest.raises(ValueError, match=r"encode.max_length=2048 .* data.max_tokens=1024"):
        data.validate_against(EncodeConfig(max_length=2048))
    # merge-2 video frames: 2048 tokens x 4 patches each do not fit 4096 patches
    with pytest.raises(
        ValueError, match=r"encode.max_visual_tokens=2048 .*video_merge_size=2.*data.max_patches"
    ):
        data.validate_against(EncodeConfig(max_length=1024, max_visual_tokens=2048))
    with pytest.raises(ValueError, match="image_merge_size"):
        data.validate_against(EncodeConfig(max_length=1024, max_visual_tokens=8192, video_merge_size=1))


# ------------------------------------------------------------------------------------------------------------
# cost pre-pass


def _cost(record: dict) -> tuple[int, int]:
    if record.get("bad"):
        raise DataError("missing_file", f"record {record['id']} points nowhere")
    return record["id"] * 10, record["id"] % 3


def _explode(record: dict) -> tuple[int, int]:
    raise AssertionError("the cache should have been used")


RECORDS = [{"id": i, "bad": i % 17 == 5} for i in range(300)]


def test_compute_costs_serial_parallel_and_failures():
    serial = compute_costs(RECORDS, _cost, num_workers=0, progress=False)
    parallel = compute_costs(RECORDS, _cost, num_workers=2, chunk_size=32, progress=False)
    np.testing.assert_array_equal(serial.costs, parallel.costs)
    assert serial.costs.dtype == np.int64 and serial.costs.shape == (300, 2)
    bad = [i for i in range(300) if i % 17 == 5]
    assert sorted(parallel.failures) == bad
    assert (serial.costs[bad] == -1).all()
    assert serial.costs[7].tolist() == [70, 1]
    assert parallel.reason_counts() == {"missing_file": len(bad)}
    assert "points nowhere" in parallel.failures[5][1]


class FakeTokenizer:
    name_or_path = "fake"

    def __init__(self, size: int = 100):
        self.size = size

    def __len__(self) -> int:
        return self.size


def test_cost_cache_key(tmp_path):
    """One key scheme: the file name follows the cost-relevant encode fields; the key adds file and tokenizer."""
    ann = tmp_path / "ann.jsonl"
    ann.write_text("x")
    enc = EncodeConfig()
    path, key = cost_cache(ann, enc, FakeTokenizer())
    assert path.parent == tmp_path and path.name.endswith(".costs.npy")
    # compression and decoding never change a cost: same cache
    same = EncodeConfig(use_token_compression=True, decode_scale=False, frame_cache_dir="/c")
    assert cost_cache(ann, same, FakeTokenizer()) == (path, key)
    assert cost_config_hash(same) == cost_config_hash(enc)
    assert cost_cache(ann, EncodeConfig(image_merge_size=2), FakeTokenizer())[0] != path
    assert cost_cache(ann, enc, FakeTokenizer(101))[1] != key
    ann.write_text("xy")  # an edited annotation file
    assert cost_cache(ann, enc, FakeTokenizer())[1] != key


def test_compute_costs_cache(tmp_path):
    ann = tmp_path / "ann.jsonl"
    ann.write_text("x")
    path, key = cost_cache(ann, EncodeConfig(), FakeTokenizer())
    first = compute_costs(RECORDS, _cost, cache_path=path, cache_key=key, progress=False)
    again = compute_costs(RECORDS, _explode, cache_path=path, cache_key=key, progress=False)
    np.testing.assert_array_equal(first.costs, again.costs)
    assert again.failures == first.failures
    # a changed annotation file or config invalidates the cache
    with pytest.raises(AssertionError, match="cache"):
        compute_costs(RECORDS, _explode, cache_path=path, cache_key=key + "other", progress=False)


def test_compute_costs_by_index():
    table = compute_costs(5, lambda i: (i, 2 * i), progress=False)
    assert table.costs.tolist() == [[i, 2 * i] for i in range(5)]


# ------------------------------------------------------------------------------------------------------------
# packing


def realistic_costs(n: int, seed: int = 0) -> np.ndarray:
    """Lognormal token lengths clipped to 200..8000; half the samples carry vision patches (0.2x..3x their
    tokens: merge 1 images to merge 2 videos)."""
    rng = np.random.default_rng(seed)
    tokens = np.clip(rng.lognormal(np.log(1200), 0.9, n), 200, 8000).astype(np.int64)
    has_media = rng.random(n) < 0.5
    patches = np.where(has_media, (tokens * rng.uniform(0.2, 3.0, n)).astype(np.int64), 0)
    return np.stack([tokens, patches], axis=1)


def _all_ids(plan) -> list[int]:
    return [i for rank in plan.micro_batches for mb in rank for i in mb]


def test_pack_budgets_and_accounting():
    costs = realistic_costs(3000, seed=1)
    costs[10] = (20000, 0)  # over the token budget alone
    costs[11] = (100, 99999)  # over the patch budget alone
    costs[12] = (-1, -1)  # failed in the pre-pass
    order = np.random.default_rng(0).permutation(len(costs))
    plan = pack(costs, order, max_tokens=16384, max_patches=30000, buffer_size=512, rows_per_step=4, seed=0)
    assert sorted(plan.oversized) == [10, 11] and plan.failed.tolist() == [12]
    packed = _all_ids(plan)
    assert len(packed) == len(set(packed))
    # every sample packed, reported oversized or reported failed
    assert sorted(packed + plan.oversized.tolist() + plan.failed.tolist()) == list(range(len(costs)))
    assert len({len(r) for r in plan.micro_batches}) == 1
    for rank in plan.micro_batches:
        for mb in rank:
            assert costs[mb, 0].sum() <= 16384 and costs[mb, 1].sum() <= 30000
    # only the last step has empty (padding) rows
    assert (plan.steps_rows[:-1] >= 0).all() and len(plan.rows) == (plan.steps_rows >= 0).sum()


def test_pack_seeded():
    costs = realistic_costs(2000)
    order = np.arange(2000)
    kw = dict(max_tokens=16384, max_patches=40000, buffer_size=256, rows_per_step=4)
    a = pack(costs, order, seed=0, **kw)
    assert a.micro_batches == pack(costs, order, seed=0, **kw).micro_batches
    b = pack(costs, order, seed=1, **kw)
    assert a.micro_batches != b.micro_batches
    assert sorted(_all_ids(a)) == sorted(_all_ids(b))  # same samples, other order


def test_realistic_mixture_fill_and_balance():
    costs = [realistic_costs(6000, seed=2), realistic_costs(3000, seed=3), realistic_costs(1000, seed=4)]
    specs = [
        DatasetConfig(name="img", weight=0.5),
        DatasetConfig(name="vid", weight=0.3),
        DatasetConfig(name="txt", weight=0.2),
    ]
    plan = build_epoch_plan(
        specs, costs, seed=0, epoch=0, max_tokens=16384, max_patches=40000, buffer_size=2048, rows_per_step=8
    )
    stats = plan.stats()
    assert stats["fill_ratio"] >= 0.97, stats
    assert stats["balance_tokens_epoch"] <= 1.05 and stats["balance_tokens_step"] <= 1.05, stats
    assert stats["balance_patches_epoch"] <= 1.05 and stats["balance_patches_step"] <= 1.10, stats
    share = np.bincount([plan.entries[i][0] for i in _all_ids(plan)], minlength=3) / len(_all_ids(plan))
    np.testing.assert_allclose(share, [0.5, 0.3, 0.2], atol=0.01)
    # sample ids index the mixture entries: their costs are the datasets' costs
    mb = plan.micro_batches[3][0]
    expected = sum(costs[plan.entries[i][0]][plan.entries[i][1]] for i in mb)
    np.testing.assert_array_equal(plan.costs[mb].sum(0), expected)


@pytest.mark.parametrize(
    ("name", "max_patches", "buffer_size"),
    [("loose", 40000, 2048), ("tight", 16384, 512), ("small", 40000, 64)],
)
def test_new_packer_against_todays_on_fill_and_balance(name, max_patches, buffer_size):
    """The vectorised best-fit-decreasing against the one-sample-at-a-time packer it replaced (the oracle in
    tests/packing_reference.py), same inputs: fill within 0.5% (the rule inside a buffer is the same; only the
    rows below close_fill are regrouped differently), token and patch balance at least as good (+0.5%)."""
    from packing_reference import reference_rows, reference_steps

    costs = realistic_costs(6000, seed=7)
    order = np.random.default_rng(3).permutation(len(costs))
    kw = dict(max_tokens=16384, max_patches=max_patches, buffer_size=buffer_size)
    new = pack(costs, order, rows_per_step=8, **kw)
    old_rows = reference_rows(costs, order, **kw)
    old_fill = costs[:, 0][np.concatenate(old_rows)].sum() / (len(old_rows) * 16384)
    assert new.fill_ratio() >= old_fill - 0.005, (new.fill_ratio(), old_fill)
    old = PackPlan(
        Rows.from_lists(old_rows, costs),
        reference_steps(old_rows, costs, 8, max_tokens=16384, max_patches=max_patches),
        costs,
        16384,
        max_patches,
    )
    b_new, b_old = new.balance(), old.balance()
    for key in ("tokens_step", "patches_step", "tokens_epoch", "patches_epoch"):
        assert b_new[key] <= b_old[key] + 0.005, (key, b_new[key], b_old[key])


@pytest.mark.parametrize(("max_tokens", "max_patches"), [(16384, 30000), (16381, 65521)])
def test_same_rows_as_todays_packer_when_one_buffer_holds_the_epoch(max_tokens, max_patches):
    """With the whole epoch in one buffer the two packers run the same best-fit-decreasing: the same rows. Prime
    budgets make the exact integer score too large for int32 (the int64 path)."""
    from packing_reference import reference_rows

    costs = realistic_costs(700, seed=5)
    order = np.random.default_rng(1).permutation(len(costs))
    kw = dict(max_tokens=max_tokens, max_patches=max_patches, buffer_size=1000)
    new = bin_pack(costs, order, **kw)
    old = reference_rows(costs, order, **kw)
    assert sorted(new.row(r).tolist() for r in range(len(new))) == sorted(old)


# the 2B preset's dimensions (docs/reference.md §1), for the activation-memory model
SHAPE_2B = dict(d=1536, nq=12, nkv=2, hd=128, ff=8960, Ll=28, V=151936, dv=1152, ffv=4304, Lv=27)


def _oracle_peak(bound, ids) -> int:
    """A row's predicted peak, summed in Python from the per-sample terms: base + sum(add) + max(peak)."""
    return (
        bound.base + sum(int(bound.add[i]) for i in ids) + max((int(bound.peak[i]) for i in ids), default=0)
    )


@pytest.mark.parametrize("attention", ["flash", "eager"])
def test_memory_bound_no_row_over_it_and_every_sample_accounted(attention):
    """Under data.max_activation_gb no row's predicted peak is over the bound; a sample over it on its own is
    reported (oversized and over_memory, counted), never packed nor dropped; the bound binds (without it, rows
    would be over)."""
    from videollama3_train.data.cost_model import ActivationModel, FlopsShape

    costs = realistic_costs(3000, seed=11)
    costs[7] = (-1, -1)  # failed in the pre-pass
    model = ActivationModel(FlopsShape(**SHAPE_2B), 16, attention=attention)
    free = model.bound(costs, 0)
    alone = free.base + free.add + free.peak
    limit = int(np.percentile(alone, 98))  # ~2% of the samples over the bound on their own
    bound = model.bound(costs, limit)
    order = np.random.default_rng(4).permutation(len(costs))
    kw = dict(max_tokens=16384, max_patches=40000, buffer_size=512)
    rows = bin_pack(costs, order, memory=bound, **kw)
    peaks = [_oracle_peak(bound, rows.row(r)) for r in range(len(rows))]
    assert max(peaks) <= limit
    np.testing.assert_array_equal(rows.peak, peaks)
    over = set(np.flatnonzero((alone > limit) & (costs[:, 0] >= 0)).tolist())
    assert over and set(rows.over_memory.tolist()) == over and over <= set(rows.oversized.tolist())
    assert rows.failed.tolist() == [7]
    assert sorted(rows.ids.tolist() + rows.oversized.tolist() + rows.failed.tolist()) == list(
        range(len(costs))
    )
    unbounded = bin_pack(costs, order, **kw)
    assert max(_oracle_peak(bound, unbounded.row(r)) for r in range(len(unbounded))) > limit


@pytest.mark.parametrize("attention", ["flash", "sdpa"])
def test_a_bound_that_cannot_bind_leaves_the_rows_as_they_are(attention):
    """The model's upper bound of any row's peak under the token and patch budgets is above every row packed without
    the bound; with the bound at it, the packer leaves memory out of its loop: the same rows, their peaks reported."""
    from videollama3_train.data.cost_model import ActivationModel, FlopsShape

    costs = realistic_costs(2000, seed=12)
    model = ActivationModel(FlopsShape(**SHAPE_2B), 16, attention=attention)
    kw = dict(max_tokens=16384, max_patches=40000, buffer_size=256)
    order = np.random.default_rng(5).permutation(len(costs))
    free = bin_pack(costs, order, **kw)
    cap = model.bound(costs, 0, (16384, 40000)).row_cap
    assert max(_oracle_peak(model.bound(costs, 0), free.row(r)) for r in range(len(free))) <= cap
    bound = model.bound(costs, cap, (16384, 40000))
    assert not bound.binds
    rows = bin_pack(costs, order, memory=bound, **kw)
    np.testing.assert_array_equal(rows.ids, free.ids)
    assert rows.peak.max() <= cap and len(rows.oversized) == 0


def test_the_largest_attention_workspace_counts_once_per_row():
    """A row's peak holds the largest per-sample attention workspace once (the tower runs one segment at a time), not
    the sum: two samples whose workspaces alone fill most of the bound share a row when their linear parts fit."""
    from videollama3_train.data.binpack import MemoryBound

    costs = np.array([[100, 0]] * 3)
    bound = MemoryBound(add=np.array([10, 10, 45]), peak=np.array([600, 600, 500]), base=50, limit=700)
    rows = bin_pack(costs, [0, 1, 2], max_tokens=1000, max_patches=10, memory=bound)
    # 50 + 10 + 10 + max(600, 600) = 670 <= 700; with sample 2 too: 50 + 65 + 600 = 715 > 700
    assert sorted(sorted(rows.row(r).tolist()) for r in range(len(rows))) == [[0, 1], [2]]
    assert sorted(rows.peak.tolist()) == [595, 670]


def test_epoch_planner_counts_samples_over_the_memory_bound():
    from videollama3_train.data.cost_model import ActivationModel, FlopsShape

    costs = [realistic_costs(2000, seed=2)]
    model = ActivationModel(FlopsShape(**SHAPE_2B), 16)
    free = model.bound(costs[0], 0)
    limit = int(np.percentile(free.base + free.add + free.peak, 95))
    kw = dict(seed=0, max_tokens=16384, max_patches=40000, grad_accum=4)
    plan = EpochPlanner(
        [DatasetConfig(name="a")], costs, activation=model, max_activation_bytes=limit, **kw
    ).plan(0)
    stats = plan.stats()
    assert (
        stats["samples_over_memory"]
        == stats["samples_oversized"]
        == int((free.base + free.add + free.peak > limit).sum())
    )
    assert stats["samples_packed"] + stats["samples_oversized"] == 2000 and plan.rows.peak.max() <= limit
    off = EpochPlanner([DatasetConfig(name="a")], costs, activation=model, max_activation_bytes=0, **kw).plan(
        0
    )
    assert off.stats()["samples_oversized"] == 0 and off.rows.peak is None  # 0: no bound


def test_per_rank_follows_the_loaders_slots_and_balance_helpers():
    slot = np.arange(1, 7, dtype=np.int64).reshape(1, 6)  # one step, G = 6 slots
    np.testing.assert_array_equal(per_rank(slot, 4), [[1 + 5, 2 + 6, 3, 4]])  # slots r, r + W
    assert grad_accum_for(6, 4) == 2 and grad_accum_for(6, 6) == 1 and grad_accum_for(5, 1) == 5
    load = np.array([[[10, 0], [5, 4]], [[6, 4], [4, 4]]])  # (steps, ranks, tokens/patches)
    bal = rank_balance(load)
    assert bal["tokens_epoch"] == pytest.approx(16 / 12.5)  # rank totals 16 and 9
    assert bal["tokens_step_worst"] == pytest.approx(10 / 7.5)  # step 0: 10 vs 5 tokens
    assert bal["tokens_step_median"] == pytest.approx((10 / 7.5 + 6 / 5) / 2)
    assert bal["patches_epoch"] == pytest.approx(8 / 6)
    rows = Rows.from_lists([[0], [1, 2], [3]], np.array([[10, 0], [6, 4], [4, 4], [10, 0]]))
    assert fill_ratio(rows, max_tokens=10) == pytest.approx(1.0)


def test_epoch_planner_packs_epoch_0_once_and_counts_without_planning(monkeypatch):
    """One rule for training and the doctor: G from epoch 0's rows (packed once), every epoch's step count from bin
    packing alone, equal to the step count of its plan."""
    from videollama3_train.data import packing

    calls = []
    real = packing.bin_pack
    monkeypatch.setattr(packing, "bin_pack", lambda *a, **k: calls.append(1) or real(*a, **k))
    costs = [realistic_costs(3000, seed=2), realistic_costs(1500, seed=3)]
    specs = [DatasetConfig(name="a", weight=0.7), DatasetConfig(name="b", weight=0.3)]
    planner = EpochPlanner(
        specs, costs, seed=1, max_tokens=16384, max_patches=40000, global_batch_samples=128, world_size=3
    )
    plan0 = planner.plan(0)
    assert len(calls) == 1  # G and epoch 0's plan from one packing
    assert planner.rows_per_step == round(128 / (plan0.stats()["samples_packed"] / len(plan0.rows)))
    assert (
        planner.grad_accum == -(-planner.rows_per_step // 3) and plan0.rows_per_step == planner.rows_per_step
    )
    counts = [planner.steps(e) for e in range(3)]
    assert len(calls) == 3 and counts[0] == plan0.steps
    assert [planner.plan(e).steps for e in range(3)] == counts
    assert planner.plan(2).micro_batches == planner.plan(2).micro_batches  # deterministic per epoch
    plain = EpochPlanner(
        specs, costs, seed=1, max_tokens=16384, max_patches=40000, grad_accum=2, world_size=3
    )
    assert plain.rows_per_step == 6 and plain.grad_accum == 2


def test_pack_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        pack(np.zeros((1, 2)), [0], max_tokens=0, max_patches=1)
    with pytest.raises(ValueError, match="shape"):
        pack(np.zeros((3,)), [0], max_tokens=1, max_patches=1)
    with pytest.raises(ValueError, match="rows_per_step"):
        pack(np.ones((3, 2)), [0], max_tokens=1, max_patches=1, rows_per_step=0)


# ------------------------------------------------------------------------------------------------------------
# the process pool


def _square(x: int) -> int:
    if x == 13:
        raise KeyError("thirteen")
    return x * x


_STATE: dict[str, int] = {}


def _init(offset: int) -> None:
    _STATE["offset"] = offset


def _shifted(x: int) -> int:
    return x + _STATE["offset"]


@pytest.mark.parametrize("workers", [0, 2])
def test_parallel_map_order_initializer_and_progress_hooks(workers):
    seen = []
    out = parallel_map(
        _shifted,
        range(20),
        workers=workers,
        desc="test",
        progress=False,
        initializer=_init,
        initargs=(100,),
        on_result=lambda r: seen.append(r) or {"n": len(seen)},
    )
    assert out == [100 + i for i in range(20)] and seen == out


@pytest.mark.parametrize("workers", [1, 2])
def test_parallel_map_error_keeps_its_type_and_names_the_item(workers):
    with pytest.raises(KeyError, match="thirteen") as e:
        parallel_map(_square, range(20), workers=workers, desc="squares", progress=False)
    assert any("squares" in n and "item 13" in n for n in getattr(e.value, "__notes__", []))
