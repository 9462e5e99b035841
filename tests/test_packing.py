"""Mixtures, the cost pre-pass (parallel, cached, tolerant of bad records), the packer (fill, balance)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from videollama3_train.data.config import DataConfig, DatasetConfig, EncodeConfig, check_data_and_encode
from videollama3_train.data.costs import compute_costs, cost_cache, cost_config_hash
from videollama3_train.data.errors import DataError
from videollama3_train.data.mixture import mixture_counts, plan_mixture
from videollama3_train.data.packing import build_epoch_plan, fill_ratio, pack, rank_balance
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
    plan = pack(costs, order, max_tokens=16384, max_patches=30000, buffer_size=512, num_ranks=4, seed=0)
    assert sorted(plan.oversized) == [10, 11] and plan.failed == [12]
    packed = _all_ids(plan)
    assert len(packed) == len(set(packed))
    assert sorted(packed + plan.leftover + plan.oversized + plan.failed) == list(range(len(costs)))
    assert len({len(r) for r in plan.micro_batches}) == 1
    for rank in plan.micro_batches:
        for mb in rank:
            assert costs[mb, 0].sum() <= 16384 and costs[mb, 1].sum() <= 30000
    assert len(plan.leftover) < len(costs) // 20


def test_pack_seeded():
    costs = realistic_costs(2000)
    order = np.arange(2000)
    kw = dict(max_tokens=16384, max_patches=40000, buffer_size=256, num_ranks=4)
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
        specs, costs, seed=0, epoch=0, max_tokens=16384, max_patches=40000, buffer_size=2048, num_ranks=8
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


def test_grad_accum_rounds_steps():
    costs = realistic_costs(1500)
    plan = pack(costs, np.arange(1500), max_tokens=16384, max_patches=40000, num_ranks=3, grad_accum=4)
    assert plan.steps % 4 == 0 and plan.steps > 0
    assert sorted(_all_ids(plan) + plan.leftover) == list(range(1500))


def test_fill_and_balance_helpers():
    costs = np.array([[10, 0], [6, 4], [4, 4], [10, 0]])
    assert fill_ratio(costs, [[0], [1, 2], [3]], max_tokens=10) == pytest.approx(1.0)
    bal = rank_balance(costs, [[[0], [1]], [[3], [2]]])
    assert bal["tokens_epoch"] == pytest.approx(16 / 15)
    assert bal["tokens_step_worst"] == pytest.approx(6 / 5)  # step 1: 6 vs 4 tokens
    assert bal["patches_epoch"] == pytest.approx(1.0)


def test_pack_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        pack(np.zeros((1, 2)), [0], max_tokens=0, max_patches=1)
    with pytest.raises(ValueError, match="shape"):
        pack(np.zeros((3,)), [0], max_tokens=1, max_patches=1)


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
