"""Bin packing: samples -> rows under a token budget, a vision-patch budget and, optionally, a bound on each row's
predicted activation memory (:class:`MemoryBound`, from :mod:`.cost_model`).

Best-fit-decreasing inside shuffle buffers of ``buffer_size`` samples, every buffer of the epoch at once: the Python
loop runs over the position inside a buffer (~``buffer_size`` iterations for any epoch size) and each iteration is a
few numpy calls over (buffers x open rows). What makes it fast (B3, BENCHMARKS.md):

* sizes and rooms are integers and the best-fit score ``room_t / T + room_p / P`` is kept, scaled by
  ``lcm(T, P)``, as one exact integer per row: a row that cannot take the sample gets a high bit set and
  ``argmin`` does the rest (two compares, one ``or``, one ``argmin`` per iteration, in int16 / int32 where the values
  fit); the float version spent ~2x as long in ``np.where`` over float64;
* a row with less room than every sample still to come in its buffer, in tokens, patches or memory, can take no
  more: every ``_COMPACT`` iterations such rows leave the arrays the loop scans (they keep their number).

The rows are the same as the one-sample-at-a-time packer's inside a buffer (tests/test_packing.py checks it against
the frozen copy in tests/packing_reference.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .costs import PATCHES, TOKENS

logger = logging.getLogger(__name__)

__all__ = ["MemoryBound", "Rows", "bin_pack", "row_sums"]

_COMPACT = 128  # iterations between two removals of full rows from the scanned arrays (32-512 measured alike)


@dataclass
class Rows:
    """Packed rows: row ``r`` holds the sample ids ``ids[offsets[r]:offsets[r + 1]]`` (largest first).

    ``load[r]``: its ``(tokens, patches)``. ``oversized``: ids over a budget on their own (never packed,
    reported); ``over_memory``: those of them whose predicted activation peak alone is over the memory bound;
    ``failed``: ids whose cost pre-pass failed (cost ``-1``). Every id of the input is in exactly one of rows,
    oversized, failed. ``peak[r]``: the predicted activation peak of row ``r`` in bytes, when a memory bound
    planned the rows (None otherwise)."""

    ids: np.ndarray
    offsets: np.ndarray
    load: np.ndarray
    oversized: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    failed: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    over_memory: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    peak: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, r: int) -> np.ndarray:
        return self.ids[self.offsets[r] : self.offsets[r + 1]]

    @property
    def sizes(self) -> np.ndarray:
        """Samples per row."""
        return np.diff(self.offsets)

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]], costs: np.ndarray) -> Rows:
        """Rows given as lists of ids (small, hand-made plans)."""
        sizes = np.array([len(r) for r in rows], dtype=np.int64)
        ids = np.array([i for r in rows for i in r], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return cls(ids, offsets, row_sums(np.asarray(costs, dtype=np.int64)[ids, :2], offsets))


@dataclass(frozen=True)
class MemoryBound:
    """A bound on each row's predicted activation peak: ``base + sum(add[i]) + max(peak[i])`` over the row's
    samples ``i`` must not exceed ``limit`` (bytes, integers). ``add`` / ``peak``: ``(N,)`` per sample id, from
    ``cost_model.ActivationModel.sample_memory``; ``base``: what every row holds whatever its samples.
    ``row_cap``: an upper bound of the peak of any row within the token and patch budgets, when known: at or below
    ``limit`` the bound cannot bind, and the packer leaves it out of its loop (which it slows ~2x) and only checks
    it (the rows are the same)."""

    add: np.ndarray
    peak: np.ndarray
    base: int
    limit: int
    row_cap: int | None = None

    @property
    def binds(self) -> bool:
        return self.row_cap is None or self.row_cap > self.limit

    def row_peak(self, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """``(R,)`` predicted peak of each row (bytes)."""
        mx = np.zeros(len(offsets) - 1, dtype=np.int64)
        nonempty = np.diff(offsets) > 0
        if len(ids):
            mx[nonempty] = np.maximum.reduceat(self.peak[ids], offsets[:-1][nonempty])
        return self.base + row_sums(self.add[ids], offsets) + mx


def row_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-row sums of ``values`` (ids order) for rows given by ``offsets`` (empty rows sum to 0)."""
    out = np.zeros((len(offsets) - 1, *values.shape[1:]), dtype=values.dtype)
    nonempty = np.diff(offsets) > 0
    if len(values):
        out[nonempty] = np.add.reduceat(values, offsets[:-1][nonempty], axis=0)
    return out


# ============================================================================================================
# best-fit-decreasing, every buffer at once
# ============================================================================================================


class _Bins:
    """The open rows of every buffer, ``(B, W)`` arrays (slot ``w`` of buffer ``b``): rooms in tokens, patches
    and memory, the largest per-sample peak term, the scaled score, the row's number in its buffer. A slot past
    ``nopen[b]`` is empty (room -1: nothing fits). Scratch arrays of the same shape are reused by every
    iteration: allocating (B, W) temporaries anew cost ~15% of the loop."""

    def __init__(self, nbuf: int, score_dtype, room_dtypes, memory: bool):
        self.cap, self.nbuf, self.score_dtype = 64, nbuf, score_dtype
        # tokens and patches in the smallest integers that hold the budget (a compare over int16 takes half the
        # time of one over int32), memory in int64 bytes
        self.dtypes = {"rt": room_dtypes[0], "rp": room_dtypes[1], "sc": score_dtype, "bid": np.int64}
        if memory:
            self.dtypes.update(ra=np.int64, mx=np.int64)
        for n, dt in self.dtypes.items():
            setattr(self, n, np.full((nbuf, self.cap), -1 if n == "rt" else 0, dtype=dt))
        self.nopen = np.zeros(nbuf, dtype=np.int64)
        self._views()

    def _views(self) -> None:
        """Flat views (one take / put per array and iteration) and scratch arrays at the current capacity."""
        self.flat = {n: getattr(self, n).reshape(-1) for n in self.dtypes}
        self.base = np.arange(self.nbuf) * self.cap
        self.nofit = np.empty((self.nbuf, self.cap), dtype=bool)
        self.other = np.empty((self.nbuf, self.cap), dtype=bool)
        self.x = np.empty((self.nbuf, self.cap), dtype=self.score_dtype)

    def grow(self) -> None:
        for n in self.dtypes:
            a = getattr(self, n)
            setattr(self, n, np.concatenate([a, np.full_like(a, -1 if n == "rt" else 0)], axis=1))
        self.cap *= 2
        self._views()

    def compact(self, tmin: np.ndarray, pmin: np.ndarray, amin: np.ndarray | None) -> None:
        """Move the rows that can take none of the samples still to come (less room than the smallest of them in
        one dimension) out of the scanned slots; the others keep their order (so ties resolve as before)."""
        w = int(self.nopen.max())
        if not w:
            return
        closed = (self.rt[:, :w] < tmin[:, None]) | (self.rp[:, :w] < pmin[:, None])
        if amin is not None:
            closed |= self.ra[:, :w] < amin[:, None]
        keep = np.argsort(closed, axis=1, kind="stable")
        for n in self.dtypes:
            a = getattr(self, n)
            a[:, :w] = np.take_along_axis(a[:, :w], keep, axis=1)
        self.nopen = w - closed.sum(axis=1)
        dead = np.arange(w)[None, :] >= self.nopen[:, None]
        self.rt[:, :w][dead] = -1  # nothing fits an empty slot


def _score_weights(max_tokens: int, max_patches: int):
    """``(wt, wp, dtype)``: ``room_t * wt + room_p * wp`` is ``lcm(T, P) * (room_t / T + room_p / P)``, exact; int32
    when it fits below the 'does not fit' bit (bit 30), else int64 (bit 62)."""
    g = math.gcd(max_tokens, max_patches)
    wt, wp = max_patches // g, max_tokens // g
    top = max_tokens * wt + max_patches * wp
    return wt, wp, (np.int32 if top < 2**30 else np.int64)


def _best_fit_decreasing(
    size: np.ndarray,
    valid: np.ndarray,
    budget: tuple[int, int],
    mem: tuple[np.ndarray, np.ndarray, int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing in every buffer at once. ``size`` ``(B, L, 2)``: integer (tokens, patches) of each
    buffer's samples sorted by decreasing normalised size (``valid`` False on padding, which has size 0 and never
    opens a row). ``mem``: ``(add, peak, limit)`` ``(B, L)`` arrays in the same order and the memory left for
    them (the bound less its base), or None. Returns each sample's row within its buffer ``(B, L)`` and the rows
    per buffer ``(B,)``.

    The rule, per buffer: each sample, largest first, goes into the open row it leaves with the least normalised
    slack in tokens + patches among those where it fits every budget (the memory bound included), else a new row.
    """
    nbuf, length, _ = size.shape
    max_t, max_p = budget
    wt, wp, dt = _score_weights(max_t, max_p)
    shift = 30 if dt is np.int32 else 62
    high = dt(1 << shift)
    room = [np.int16 if b < 2**15 else np.int32 for b in budget]
    bins = _Bins(nbuf, dt, room, mem is not None)
    ts, ps = size[:, :, TOKENS].astype(room[0]), size[:, :, PATCHES].astype(room[1])
    # the smallest size still to come in each buffer, per dimension (padding excluded): rows with less room close
    suffix_min = [
        np.minimum.accumulate(np.where(valid, a, np.iinfo(a.dtype).max)[:, ::-1], axis=1)[:, ::-1]
        for a in ((ts, ps) if mem is None else (ts, ps, mem[0]))
    ]
    nbins = np.zeros(nbuf, dtype=np.int64)
    where = np.full((nbuf, length), -1, dtype=np.int32)  # a row's number inside its buffer
    peaks = mem is not None and bool(mem[1].any())
    for k in range(length):
        if k and k % _COMPACT == 0:
            bins.compact(*(m[:, k] for m in suffix_min), *([None] if mem is None else []))
        if int(bins.nopen.max()) >= bins.cap:
            bins.grow()
        w = max(int(bins.nopen.max()), 1)
        t, p = ts[:, k], ps[:, k]
        # rows the sample does not fit get the high bit on top of their score: argmin = the best fit
        nofit, x = bins.nofit[:, :w], bins.x[:, :w]
        np.less(bins.rt[:, :w], t[:, None], out=nofit)
        nofit |= np.less(bins.rp[:, :w], p[:, None], out=bins.other[:, :w])
        if mem is not None:
            a, pk = mem[0][:, k], mem[1][:, k]
            if peaks:  # the row's largest peak term may grow
                nofit |= bins.ra[:, :w] < a[:, None] + np.maximum(pk[:, None] - bins.mx[:, :w], 0)
            else:  # no per-segment workspace (flash attention): the linear part alone
                nofit |= bins.ra[:, :w] < a[:, None]
        np.left_shift(nofit.view(np.int8), shift, out=x, dtype=dt, casting="unsafe")
        x |= bins.sc[:, :w]
        best = x.argmin(axis=1)
        fresh = bins.x.reshape(-1)[bins.base + best] >= high
        fresh &= valid[:, k]
        at = bins.base + np.where(fresh, bins.nopen, best)
        f = bins.flat
        room_t = np.where(fresh, max_t, f["rt"][at]) - t
        room_p = np.where(fresh, max_p, f["rp"][at]) - p
        f["rt"][at], f["rp"][at] = room_t, room_p
        f["sc"][at] = room_t.astype(dt) * wt + room_p.astype(dt) * wp
        if mem is not None:
            mx = f["mx"][at]
            f["ra"][at] = np.where(fresh, mem[2] - pk, f["ra"][at] - np.maximum(pk - mx, 0)) - a
            f["mx"][at] = np.where(fresh, pk, np.maximum(mx, pk))
        where[:, k] = row = np.where(fresh, nbins, f["bid"][at])
        f["bid"][at] = row
        bins.nopen += fresh
        nbins += fresh
    return where, nbins


def _pack_buffers(
    ids: np.ndarray, costs: np.ndarray, budget: tuple[int, int], buffer_size: int, memory: MemoryBound | None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``ids`` (``costs`` ``(N, 2)`` integer tokens, patches per id) packed ``buffer_size`` at a time, in
    order. Returns ``(members, offsets)``: the ids grouped by row (largest first inside a row), rows in buffer
    order."""
    n = len(ids)
    buffer_size = min(buffer_size, n)  # one buffer holds them all: no iteration over padding
    nbuf = -(-n // buffer_size)
    pad = nbuf * buffer_size - n
    valid = np.concatenate([np.ones(n, dtype=bool), np.zeros(pad, dtype=bool)])
    padded = np.concatenate([ids, np.zeros(pad, dtype=np.int64)])
    c = costs[padded]
    c[n:] = 0  # padding: size 0, sorted last
    # by normalised size (t / T + p / P, scaled to exact integers), then patches, decreasing; in place, as the
    # temporaries of a million samples are 8 MB each
    wt, wp, _ = _score_weights(*budget)
    top = budget[TOKENS] * wt + budget[PATCHES] * wp
    key = c[:, TOKENS] * wt
    key += c[:, PATCHES] * wp
    if (top + 1) * (budget[PATCHES] + 1) * buffer_size < 2**62:
        # one int64 key (size, patches, position): a plain argsort, ~8x faster than lexsort, same order
        np.subtract(top, key, out=key)
        key *= budget[PATCHES] + 1
        key += budget[PATCHES]
        key -= c[:, PATCHES]
        key *= buffer_size
        key = key.reshape(nbuf, buffer_size)
        key += np.arange(buffer_size)
        order = np.argsort(key, axis=-1)
    else:
        order = np.lexsort(
            (-c[:, PATCHES].reshape(nbuf, buffer_size), -key.reshape(nbuf, buffer_size)), axis=-1
        )
    del key
    order += (np.arange(nbuf) * buffer_size)[:, None]
    flat = order.ravel()  # sorted position -> padded position
    sorted_ids = padded[flat]
    valid = valid[flat].reshape(nbuf, buffer_size)
    size = c[flat].reshape(nbuf, buffer_size, 2)
    del c, padded, order, flat
    mem = None
    if memory is not None:
        add = (memory.add[sorted_ids] * valid.ravel()).reshape(nbuf, buffer_size)
        peak = (memory.peak[sorted_ids] * valid.ravel()).reshape(nbuf, buffer_size)
        mem = (add, peak, memory.limit - memory.base)
    where, nbins = _best_fit_decreasing(size, valid, budget, mem)
    del size, mem
    first = np.concatenate([[0], np.cumsum(nbins)[:-1]])
    gbin = (first[:, None] + where).ravel()[valid.ravel()]  # global row of every sample, in sorted order
    grouped = np.argsort(gbin, kind="stable")
    members = sorted_ids[valid.ravel()][grouped]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(gbin, minlength=int(nbins.sum())))]).astype(np.int64)
    return members, offsets


def _select_rows(members: np.ndarray, offsets: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows ``keep`` (bool per row) of ``(members, offsets)``."""
    sizes = np.diff(offsets)
    return members[np.repeat(keep, sizes)], np.concatenate([[0], np.cumsum(sizes[keep])]).astype(np.int64)


def _split_unpackable(c: np.ndarray, order: np.ndarray, max_tokens: int, max_patches: int, memory):
    """``(failed, oversized, over_memory)`` masks over ``order``: failed in the cost pass, over a budget on their
    own (the memory bound included), and of those, over the memory bound."""
    failed = (c < 0).any(axis=1)
    over_mem = np.zeros(len(order), dtype=bool)
    if memory is not None:
        over_mem = ~failed & (memory.base + memory.add[order] + memory.peak[order] > memory.limit)
    over = ~failed & ((c[:, TOKENS] > max_tokens) | (c[:, PATCHES] > max_patches) | over_mem)
    if over.any():
        logger.warning(
            "%d samples exceed the budget of %d tokens / %d patches%s on their own and are not packed",
            int(over.sum()),
            max_tokens,
            max_patches,
            f" / {memory.limit / 1e9:.1f} GB of predicted activations ({int(over_mem.sum())} of them)"
            if memory is not None
            else "",
        )
    return failed, over, over_mem


def bin_pack(
    costs: np.ndarray,
    order: Sequence[int] | np.ndarray,
    *,
    max_tokens: int,
    max_patches: int,
    buffer_size: int = 2048,
    close_fill: float = 0.97,
    memory: MemoryBound | None = None,
) -> Rows:
    """Pack the samples ``order`` (ids into ``costs``, ``(N, 2+)``: tokens, patches) into rows under both budgets
    and, with ``memory``, under its bound on each row's predicted activation peak.

    ``order`` is consumed ``buffer_size`` ids at a time (the shuffle buffer: a larger buffer packs tighter but
    mixes less; pass ``order`` shuffled, ``mixture_table`` does); inside a buffer, best-fit-decreasing. Rows below
    ``close_fill`` of every budget are packed again, with the other buffers' such rows, in a second round (and so
    on until one buffer holds them all), so that only the last round leaves half-empty rows. Items over a budget on
    their own go to ``oversized`` (and, when it is the memory bound, to ``over_memory`` too); items with a negative
    cost to ``failed``.
    """
    if not (0 < max_tokens < 2**31 and 0 < max_patches < 2**31):
        raise ValueError(
            f"budgets must be positive (and below 2**31), got max_tokens={max_tokens}, max_patches={max_patches}"
        )
    if buffer_size < 1:
        raise ValueError("buffer_size must be >= 1")
    costs = np.asarray(costs, dtype=np.int64)
    order = np.asarray(order, dtype=np.int64)
    if costs.ndim != 2 or costs.shape[1] < 2:
        raise ValueError(
            f"costs must have shape (N, 2) (tokens, patches; more columns are ignored), got {costs.shape}"
        )
    costs = costs[:, :2]
    failed, over, over_mem = _split_unpackable(costs[order], order, max_tokens, max_patches, memory)
    todo = order[~failed & ~over]
    budget = (int(max_tokens), int(max_patches))
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    packing = memory if memory is not None and memory.binds else None
    while len(todo):
        members, offsets = _pack_buffers(todo, costs, budget, buffer_size, packing)
        if len(todo) <= buffer_size:  # the last round: every row stays
            parts.append((members, offsets))
            break
        full = (row_sums(costs[members], offsets) >= close_fill * np.array(budget)).any(axis=1)
        if packing is not None:
            full |= packing.row_peak(members, offsets) >= close_fill * packing.limit
        parts.append(_select_rows(members, offsets, full))
        rest, _ = _select_rows(members, offsets, ~full)
        if len(rest) == len(
            todo
        ):  # nothing closed (cannot happen with close_fill <= 1): keep them as they are
            parts.append(_select_rows(members, offsets, ~full))
            break
        todo = rest
    ids = np.concatenate([m for m, _ in parts]) if parts else np.empty(0, dtype=np.int64)
    sizes = np.concatenate([np.diff(o) for _, o in parts]) if parts else np.empty(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    out = Rows(ids, offsets, row_sums(costs[ids], offsets), order[over], order[failed], order[over_mem])
    _check_rows(out, max_tokens, max_patches, memory)
    return out


def _check_rows(rows: Rows, max_tokens: int, max_patches: int, memory: MemoryBound | None) -> None:
    """Every row within its budgets, checked again on the final rows (the packer's own arithmetic is not trusted
    here); sets ``rows.peak`` under a memory bound."""
    bad = (rows.load[:, TOKENS] > max_tokens) | (rows.load[:, PATCHES] > max_patches)
    if bad.any():
        raise AssertionError(f"packed rows over budget: {rows.load[bad][:3].tolist()}")
    if memory is not None:
        rows.peak = memory.row_peak(rows.ids, rows.offsets)
        over = rows.peak > memory.limit
        if over.any():
            raise AssertionError(
                f"packed rows over the memory bound of {memory.limit} bytes: {rows.peak[over][:3].tolist()}"
            )
