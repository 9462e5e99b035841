"""Mixtures: an epoch's sample list ``(dataset, record)`` drawn from the datasets' weights / repeats / caps.

``DatasetConfig`` is validated when the config is built, before any of this runs; the packer
(:mod:`.packing`) takes the list this module draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .config import DatasetConfig

# ============================================================================================================
# Mixtures
# ============================================================================================================


def _capped_records(spec: DatasetConfig, size: int, seed: int, dataset_idx: int) -> np.ndarray:
    """Record indices a dataset contributes from, sorted. The subset under a cap depends on the seed only (not
    on the epoch), so a capped dataset always trains on the same records."""
    if spec.max_samples is None or spec.max_samples >= size:
        return np.arange(size, dtype=np.int64)
    rng = np.random.default_rng([seed, dataset_idx, 0xCA9])
    return np.sort(rng.choice(size, size=spec.max_samples, replace=False))


def _draw(records: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` records: whole passes over ``records``, then a without-replacement remainder."""
    n = len(records)
    if n == 0 or count == 0:
        return np.empty(0, dtype=np.int64)
    full, rest = divmod(count, n)
    parts = [records] * full + [rng.choice(records, size=rest, replace=False)]
    return np.concatenate(parts)


def mixture_counts(specs: Sequence[DatasetConfig], sizes: Sequence[int]) -> list[int]:
    """Samples per dataset in one epoch.

    Unweighted datasets contribute ``repeat * size`` (after the cap). Weighted datasets share the epoch so
    that dataset ``i`` makes up ``weight_i`` of it: with only weighted datasets the weights are normalised and
    the epoch is as long as the (capped) datasets together; mixed with unweighted ones the weights must sum
    below 1 and the unweighted datasets fill the rest.
    """
    if len(specs) != len(sizes):
        raise ValueError(f"{len(specs)} dataset specs but {len(sizes)} sizes")
    capped = [
        min(n, s.max_samples) if s.max_samples is not None else n for s, n in zip(specs, sizes, strict=True)
    ]
    fixed = sum(c * (s.repeat or 1) for s, c in zip(specs, capped, strict=True) if s.weight is None)
    weighted = [i for i, s in enumerate(specs) if s.weight is not None]
    wsum = sum(specs[i].weight for i in weighted)
    for i in weighted:
        if capped[i] == 0:
            raise ValueError(f"dataset {specs[i].name!r} has a weight but no records")
    if weighted and len(weighted) < len(specs):
        if wsum >= 1:
            raise ValueError(
                f"weights sum to {wsum:.3f} but unweighted datasets need a share too: keep them below 1"
            )
        total = fixed / (1 - wsum)
        shares = {i: specs[i].weight for i in weighted}
    else:
        total = sum(capped)
        shares = {i: specs[i].weight / wsum for i in weighted} if weighted else {}
    counts = []
    for i, (s, c) in enumerate(zip(specs, capped, strict=True)):
        counts.append(round(shares[i] * total) if i in shares else c * (s.repeat or 1))
    return counts


def plan_mixture(
    specs: Sequence[DatasetConfig], sizes: Sequence[int], seed: int, epoch: int
) -> list[tuple[int, int]]:
    """The epoch's samples as a list of ``(dataset index, record index)``: :func:`mixture_table` as tuples."""
    return [(int(d), int(r)) for d, r in mixture_table(specs, sizes, seed, epoch)]


def mixture_table(specs: Sequence[DatasetConfig], sizes: Sequence[int], seed: int, epoch: int) -> np.ndarray:
    """The epoch's samples, shape ``(N, 2)``: ``(dataset index, record index)`` per row, shuffled; deterministic
    in ``(seed, epoch)``. An array, not a list of tuples: at a million samples the list alone is ~100 MB.

    Each dataset's count comes from :func:`mixture_counts`, so weights hold exactly up to rounding (one
    sample).
    """
    counts = mixture_counts(specs, sizes)
    rng = np.random.default_rng([seed, epoch, 0x3D])
    chunks = []
    for d, (spec, n, count) in enumerate(zip(specs, sizes, counts, strict=True)):
        rec = _draw(_capped_records(spec, n, seed, d), count, rng)
        chunks.append(np.stack([np.full(len(rec), d, dtype=np.int64), rec], axis=1))
    table = np.concatenate(chunks) if chunks else np.empty((0, 2), dtype=np.int64)
    return table[rng.permutation(len(table))]
