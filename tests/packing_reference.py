"""The packer as it was before the vectorised one (one sample at a time, in Python), kept as the oracle the new
packer's fill and balance are tested against (tests/test_packing.py) and benchmarked beside
(benchmarks/bench_packing.py). Bin packing: best-fit-decreasing inside a shuffle buffer, rows below ``close_fill``
reopened into the next buffer. Dealing: rows sorted by patches then tokens, cut into steps of ``G``, inside a step
the row with the most work to the slot with the least so far (LPT); the steps shuffled, the rows short of a whole
step in a last padded step."""

from __future__ import annotations

import numpy as np


def _best_fit_decreasing(ids, costs, max_tokens, max_patches):
    t = costs[ids, 0].astype(np.float64) / max_tokens
    p = costs[ids, 1].astype(np.float64) / max_patches
    order = np.lexsort((-p, -(t + p)))
    room_t, room_p = np.empty(len(ids)), np.empty(len(ids))
    members: list[list[int]] = []
    for k in order:
        nb = len(members)
        if nb:
            fits = (room_t[:nb] >= t[k] - 1e-12) & (room_p[:nb] >= p[k] - 1e-12)
            if fits.any():
                b = int(np.argmin(np.where(fits, (room_t[:nb] - t[k]) + (room_p[:nb] - p[k]), np.inf)))
                room_t[b] -= t[k]
                room_p[b] -= p[k]
                members[b].append(int(ids[k]))
                continue
        room_t[nb], room_p[nb] = 1.0 - t[k], 1.0 - p[k]
        members.append([int(ids[k])])
    return members


def reference_rows(
    costs, order, *, max_tokens, max_patches, buffer_size=2048, close_fill=0.97
) -> list[list[int]]:
    """Today's rows of the samples ``order`` (those over a budget or failed left out)."""
    costs = np.asarray(costs, dtype=np.int64)
    order = np.asarray(order, dtype=np.int64)
    c = costs[order]
    good = order[(c >= 0).all(1) & (c[:, 0] <= max_tokens) & (c[:, 1] <= max_patches)]
    rows: list[list[int]] = []
    carry = np.empty(0, dtype=np.int64)
    for start in range(0, len(good), buffer_size):
        chunk = np.concatenate([carry, good[start : start + buffer_size]])
        packed = _best_fit_decreasing(chunk, costs, max_tokens, max_patches)
        if start + buffer_size >= len(good):
            rows += packed
            carry = np.empty(0, dtype=np.int64)
            continue
        reopen = []
        for b in packed:
            tok, pat = costs[b].sum(0)
            if tok >= close_fill * max_tokens or pat >= close_fill * max_patches:
                rows.append(b)
            else:
                reopen += b
        carry = np.asarray(reopen, dtype=np.int64)
    if len(carry):
        rows += _best_fit_decreasing(carry, costs, max_tokens, max_patches)
    return rows


def reference_steps(rows, costs, rows_per_step, *, max_tokens, max_patches, seed=0, epoch=0) -> np.ndarray:
    """Today's dealing: ``(S, G)`` row index per step and slot, -1 padding."""
    costs = np.asarray(costs, dtype=np.int64)
    tok = np.array([costs[r, 0].sum() for r in rows], dtype=np.int64)
    pat = np.array([costs[r, 1].sum() for r in rows], dtype=np.int64)
    work = tok / max_tokens + pat / max_patches
    g = rows_per_step
    by_fill = np.argsort(-tok, kind="stable")
    keep = (len(rows) // g) * g
    tail, kept = by_fill[keep:], by_fill[:keep]
    kept = kept[np.lexsort((-tok[kept], -pat[kept]))]
    load = np.zeros(g)

    def deal(order):
        out = []
        for s in range(len(order) // g):
            step = order[s * g : (s + 1) * g]
            w = np.array([work[b] if b >= 0 else 0.0 for b in step])
            step = step[np.argsort(-w, kind="stable")]
            slots = np.full(g, -1, dtype=np.int64)
            for r, b in zip(np.argsort(load, kind="stable"), step, strict=True):
                if b >= 0:
                    slots[r] = b
                    load[r] += work[b]
            out.append(slots)
        return out

    steps = deal(kept)
    rng = np.random.default_rng([seed, epoch, 0xBA1])
    steps = [steps[i] for i in rng.permutation(len(steps))]
    if len(tail):
        padded = np.full(g, -1, dtype=np.int64)
        padded[: len(tail)] = np.sort(tail)
        steps += deal(padded)
    return np.array(steps, dtype=np.int64).reshape(-1, g)


def patch_order_steps(load, rows_per_step) -> np.ndarray:
    """The dealing without a cost model as it was when dealing by compute was switched on (frozen): rows by
    patches then tokens, cut into steps of ``G``; ``(S, G)`` whole steps only (the ``R mod G`` rows with the fewest
    patches are the partial step)."""
    load = np.asarray(load)
    order = np.lexsort((-load[:, 0], -load[:, 1]))
    keep = (len(load) // rows_per_step) * rows_per_step
    return order[:keep].reshape(-1, rows_per_step)
