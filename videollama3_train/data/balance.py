"""Rows to optimizer steps, level on three counts at once: predicted compute, tokens and patches.

A step of ``G`` rows runs as fast as its slowest rank, so the rows of a step should cost alike. Sorting rows by one
count and cutting the order into steps of ``G`` makes that count level and leaves the others to chance: by patches
(the rule without a cost model) a step can hold a long-video row beside rows of many short images whose compute is
30% lower; by predicted compute, a video row beside an image row of the same FLOPs and a quarter of the patches
(B3: patch balance median 1.02-1.03 instead of 1.0005). :func:`level_steps` keeps all three level:

1. **Bands.** Rows sorted by compute are cut into bands of ``B`` steps; inside a band they are sorted by patches,
   then cut into steps. Every step's compute then lies within its band's, and its patches within a ``1/B``-th of
   the band's. ``B`` is the one of ``1, 2, 4, ...`` with the least worst compute step whose median token and patch
   balance is at most the patch order's (:func:`patch_order`, the rule without a cost model).
2. **The partial step.** The ``R mod G`` rows short of a whole step are taken where compute has a gap (a video row
   beside text-and-image rows, ~240 against ~185 TFLOP at the 2B shape), as :func:`leftover_split` says.
3. **Repair.** The worst step of each count (compute first, then patches and tokens, twice) swaps one row with a
   row of a step nearby in the band order, or of the partial step, while that lowers it, and no swap lets another
   count's worst step exceed its bound (the patch order's worst or the current one, whichever is higher) nor a token
   or patch median rise over the patch order's (a move that does is undone); for compute, where no swap helps, a
   chain move passes its lightest row up the heavier steps (:meth:`_Repair._chain`). The candidates repaired: every
   band count ``B`` whose token and patch medians are within the patch order's, then the patch order itself.
4. **Guard.** The first repaired candidate whose worst and median token and patch balance are all at most the patch
   order's (:func:`patch_order`; but for float noise, ``NOISE``) is dealt; if none is, the patch order is (logged):
   dealing by compute never costs token or patch balance. On B3's long-video mix no band keeps the patch order's
   token and patch medians (they are 1.0001-1.0005 there), so the repaired patch order is dealt: its worst compute
   step falls (1.084-1.197 to 1.047-1.086), its median stays the patch order's.

Balance is measured per slot (one rank per row), the finest split: with ``W`` ranks each running ``G / W`` slots of a
step, a rank's sum is at most ``G / W`` times the largest row and the ranks' mean ``G / W`` times the rows' mean, so
per-rank max/mean never exceeds per-slot max/mean for any ``W`` dividing ``G``, and nothing here depends on ``W``
(the plan is the same on every world size, as exact resume at another world size needs). With sequence
parallelism a row is run by one SP group (``data.loader`` deals slots to groups), so the groups are level alike.
Every rank plans for itself, so the plan must not depend on rounding: the loads are integers, held exactly in float64
while a row's FLOPs stay under 2^53 (~9e15; a 16k-token row at the 7B shape is ~2e15), so sums in any order are exact
and every rank, whatever its CPU, deals the same steps.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["NOISE", "level_steps", "patch_order", "leftover_split", "step_ratios", "summary"]

TOKENS, PATCHES, COMPUTE = 0, 1, 2  # columns of ``load``
# The guard itself is strict: the plan dealt is never worse than the patch order on the worst or median token and
# patch step, but for float noise (the loads are exact integers; only max/mean rounds).
NOISE = 1e-9
_REPAIR_ITERS = 300  # swaps per count at most (each scores ~5 x 2048 candidates)


def step_ratios(load: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """``(S, 3)``: max/mean over the slots of each step (``steps`` ``(S, G)`` row ids), per column of ``load``."""
    if len(steps) == 0:
        return np.ones((0, load.shape[1]))
    x = load[steps]
    mean = x.mean(axis=1)
    return np.where(mean > 0, x.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)


def summary(ratios: np.ndarray) -> np.ndarray:
    """``(6,)``: worst tokens, patches, compute, then their medians, over steps."""
    if len(ratios) == 0:
        return np.ones(6)
    return np.concatenate([ratios.max(axis=0), np.median(ratios, axis=0)])


def patch_order(load: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, left)``: rows by patches then tokens, cut into steps of ``g``; the last ``R mod g`` rows (the fewest
    patches) are the partial step. The rule without a cost model."""
    n = len(load)
    order = np.lexsort((-load[:, TOKENS], -load[:, PATCHES]))
    keep = (n // g) * g
    return order[:keep].reshape(-1, g), order[keep:]


def leftover_split(work: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, left)``: the rows of whole steps sorted by decreasing ``work``, and the ``R mod g`` rows of the partial
    step: the lightest few (a half-empty row of the last packing round) and a run of consecutive rows in ``work``
    order where the worst whole step of the contiguous cut is least (a gap in compute is where it straddles)."""
    n = len(work)
    by_work = np.argsort(-work, kind="stable")
    best = min(
        _leftover_start(work[by_work[: n - light]], g, n % g - light) + (light,)
        for light in range(min(n % g, 8) + 1)
    )
    start, light = best[1], best[2]
    left = np.concatenate([by_work[start : start + n % g - light], by_work[n - light :]])
    kept = np.concatenate([by_work[:start], by_work[start + n % g - light : n - light]])
    return kept, left


def _leftover_start(sorted_work: np.ndarray, g: int, left: int) -> tuple[float, int]:
    """``(worst step, start)``: where a run of ``left`` rows starts in ``sorted_work`` (decreasing, ``len - left`` a
    multiple of ``g``): a multiple of ``g`` chosen so that the worst max/mean of the whole steps around it is least
    (ties: the lightest rows), and that worst max/mean. O(R) per candidate."""
    n = len(sorted_work)
    whole = (n - left) // g
    if whole == 0:
        return 1.0, 0

    def ratios(w: np.ndarray) -> np.ndarray:
        groups = w[: (len(w) // g) * g].reshape(-1, g)
        mean = groups.mean(axis=1)
        return np.where(mean > 0, groups.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)

    before = ratios(sorted_work)  # steps aligned at 0: step k is rows [k g, (k + 1) g)
    after = ratios(sorted_work[left:])  # aligned after a leftover run at the start
    worst_before = np.concatenate(
        [[1.0], np.maximum.accumulate(before[:whole])]
    )  # [k]: worst of steps 0..k-1
    worst_after = np.concatenate([np.maximum.accumulate(after[:whole][::-1])[::-1], [1.0]])  # [k]: steps k..
    cost = np.maximum(worst_before, worst_after)
    best = np.flatnonzero(cost <= cost.min())[-1]  # the least worst step; the lightest rows on a tie
    return float(cost[best]), int(best) * g


def _banded(load: np.ndarray, kept: np.ndarray, g: int, band_steps: int) -> np.ndarray:
    """``kept`` (sorted by decreasing compute) cut into bands of ``band_steps`` steps, each sorted by patches then
    tokens, cut into steps of ``g``: ``(S, g)``."""
    band = np.arange(len(kept)) // (band_steps * g)
    order = np.lexsort((-load[kept, TOKENS], -load[kept, PATCHES], band))
    return kept[order].reshape(-1, g)


def level_steps(load: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, left)``: whole steps ``(S, g)`` of row ids, in band order (the caller shuffles them), and the row
    ids of the partial step. ``load`` ``(R, 3)``: each row's tokens, patches and predicted compute (module
    docstring)."""
    load = np.asarray(load, dtype=np.float64)
    ref_steps, ref_left = patch_order(load, g)
    ref = summary(step_ratios(load, ref_steps))
    kept, left = leftover_split(load[:, COMPUTE], g)
    s = len(kept) // g
    if s == 0:
        return kept.reshape(0, g), left
    near = np.r_[ref[TOKENS + 3], ref[PATCHES + 3]] + NOISE  # the medians allowed
    tried = []
    b = 1
    while True:
        steps = _banded(load, kept, g, b)
        got = summary(step_ratios(load, steps))
        fits = bool((got[[TOKENS + 3, PATCHES + 3]] <= near).all())
        tried.append((not fits, got[COMPUTE], got[COMPUTE + 3], b, steps))
        if b >= s:
            break
        b = min(2 * b, s)
    tried.sort(key=lambda t: t[:4])
    allowed = np.full(
        4, NOISE
    )  # strict: tokens and patches no worse than the patch order's, worst and median
    bound = ref[:3].copy()
    bound[COMPUTE] = 1.0  # compute: never above the current worst step
    # every band candidate whose medians fit, then the patch order itself: the repair holds the medians it starts
    # from, so that one lowers the worst compute step while keeping the patch order's token and patch balance
    starts = [(t[-1], left) for t in tried if not t[0]] + [(ref_steps, ref_left)]
    for steps, rest in starts:
        steps, rest = _Repair(load, steps, rest.copy(), bound, np.r_[ref[3:5], np.inf] + NOISE).run()
        got = summary(step_ratios(load, steps))
        if (got[[TOKENS, PATCHES, TOKENS + 3, PATCHES + 3]] <= ref[[0, 1, 3, 4]] + allowed).all():
            return steps, rest
    logger.info(
        "dealing by compute would cost token or patch balance here (worst/median %s against %s): rows dealt by "
        "patches",
        np.round(got, 4).tolist(),
        np.round(ref, 4).tolist(),
    )
    return ref_steps, ref_left


class _Repair:
    """Swaps that lower the worst step of one count at a time (module docstring, step 3). Steps are kept with their
    per-column sums, largest value (and its slot) and second largest, so a candidate swap is scored without
    touching the other rows."""

    def __init__(
        self, load: np.ndarray, steps: np.ndarray, left: np.ndarray, bound: np.ndarray, median: np.ndarray
    ):
        self.x, self.steps, self.left = load, steps.copy(), left
        self.g = steps.shape[1]
        self.bound = bound - 1.0  # in excess over 1: ratio - 1
        # a step may go over ``median`` (per column) only while fewer than 45% of the steps are: the median holds
        self.median = median - 1.0
        self.room = int(0.45 * len(steps))
        self.sum = np.zeros((len(steps), 3))
        self.top = np.zeros((len(steps), 3))
        self.second = np.zeros((len(steps), 3))
        self.arg = np.zeros((len(steps), 3), dtype=np.int64)
        self._update(np.arange(len(steps)))

    def _update(self, which: np.ndarray) -> None:
        v = self.x[self.steps[which]]  # (k, g, 3)
        order = np.argsort(-v, axis=1, kind="stable")
        self.sum[which] = v.sum(axis=1)
        self.arg[which] = order[:, 0]
        self.top[which] = np.take_along_axis(v, order[:, :1], axis=1)[:, 0]
        if self.g > 1:
            self.second[which] = np.take_along_axis(v, order[:, 1:2], axis=1)[:, 0]
        self.excess = _excess(self.top, self.sum, self.g)

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        """Per column, the worst step while a swap lowers it (going on to the next worst steps, tried, lowered the
        median compute of B3's 10k-sample plan by 0.0004 for 20x the time: not kept). Patches and tokens only
        while their worst step is over its bound (the patch order's worst), so that they do not spend the compute
        won."""
        self._worst(COMPUTE)
        for d in (PATCHES, TOKENS, PATCHES, TOKENS):
            self._worst(d)
        return self.steps, self.left

    def _worst(self, d: int) -> None:
        """The worst step of column ``d`` while a swap (for compute, a chain move) lowers it."""
        for _ in range(_REPAIR_ITERS):
            a = int(np.argmax(self.excess[:, d]))
            if self.excess[a, d] <= (1e-9 if d == COMPUTE else self.bound[d]):
                return
            if self._swap_once(d, a) is None and (d != COMPUTE or not self._chain(a)):
                return

    def _chain(self, a: int) -> bool:
        """A move along the heavier steps for the worst compute step ``a`` when no swap of two rows helps (its
        light rows sit at a gap in compute: every row light enough to replace one is in ``a`` already). Step ``a``'s
        lightest row goes to a heavier step ``c_k``; each step ``c_j`` of ``c_1 .. c_k`` (by mean compute, the
        lightest first) passes its lightest core row (at least 95% of its median: not a light row placed there
        earlier) down to ``c_{j-1}`` (``c_0`` = ``a``). The ``k`` with the least worst step is taken, under the same
        bounds as a swap; False when none lowers ``a``. B3, 10k samples at G = 64: the worst step 1.078 -> 1.052."""
        g, x = self.g, self.x
        mean = self.sum[:, COMPUTE] / g
        up = np.flatnonzero(mean > mean[a])
        if len(up) == 0:
            return False
        up = up[np.argsort(mean[up], kind="stable")]
        ia = int(np.argmin(x[self.steps[a], COMPUTE]))
        light = self.steps[a, ia]
        vals = x[self.steps[up]]  # (m, g, 3)
        core = vals[..., COMPUTE] >= 0.95 * np.median(vals[..., COMPUTE], axis=1, keepdims=True)
        lo = np.argmin(np.where(core, vals[..., COMPUTE], np.inf), axis=1)
        give = self.steps[up, lo]
        xg, xl = x[give], x[light]
        keep = np.ones(vals.shape[:2], dtype=bool)
        keep[np.arange(len(up)), lo] = False
        rest_max = np.where(keep[..., None], vals, -np.inf).max(axis=1)
        rest_sum = self.sum[up] - xg
        nxt = np.vstack([xg[1:], np.zeros((1, 3))])  # c_j (j < k) takes c_{j+1}'s row
        e_mid = _excess(np.maximum(rest_max, nxt), rest_sum + nxt, g)
        e_mid[-1] = -np.inf  # the heaviest step of the chain is never in the middle
        e_end = _excess(np.maximum(rest_max, xl), rest_sum + xl, g)  # c_k takes a's light row
        in_a = np.ones(g, dtype=bool)
        in_a[ia] = False
        e_a = _excess(np.maximum(x[self.steps[a]][in_a].max(axis=0), xg[0]), self.sum[a] - xl + xg[0], g)
        before_k = np.vstack([np.full((1, 3), -np.inf), np.maximum.accumulate(e_mid[:-1], axis=0)])
        worst = np.maximum(np.maximum(before_k, e_end), e_a)  # (m, 3): the chain ending at c_k
        ok = worst[:, COMPUTE] < self.excess[a, COMPUTE] - 1e-9
        for c in (TOKENS, PATCHES):
            ok &= worst[:, c] <= max(self.bound[c], self.excess[:, c].max()) + 1e-12
            over = self.excess[:, c] > self.median[c]
            now = int(over.sum())
            was = over[a] + np.cumsum(over[up])
            becomes = (e_a[c] > self.median[c]) + np.r_[0, np.cumsum(e_mid[:-1, c] > self.median[c])]
            ok &= now - was + becomes + (e_end[:, c] > self.median[c]) <= max(self.room, now)
        if not ok.any():
            return False
        k = int(np.argmin(np.where(ok, worst[:, COMPUTE], np.inf)))
        changed = np.r_[a, up[: k + 1]]
        was, medians = self.steps[changed].copy(), self._medians()
        self.steps[a, ia] = give[0]
        self.steps[up[:k], lo[:k]] = give[1 : k + 1]
        self.steps[up[k], lo[k]] = light
        self._update(changed)
        return self._held(medians, changed, was, self.left.copy())

    def _swap_once(self, d: int, a: int, below: float | None = None) -> tuple[int, ...] | None:
        """One swap that lowers step ``a``'s max/mean of column ``d`` without another step's rising to it (with
        ``below``: both steps end at most ``below``, in excess); the steps changed, or None when there is no such
        swap."""
        g, x = self.g, self.x
        worst = self.excess[a, d]
        k = max(1, 1024 // g)
        near = np.r_[max(0, a - k) : a, a + 1 : min(len(self.steps), a + k + 1)]
        rows = np.concatenate([self.steps[near].ravel(), self.left])
        owner = np.concatenate([np.repeat(near, g), np.full(len(self.left), -1)])
        slot = np.concatenate([np.tile(np.arange(g), len(near)), np.arange(len(self.left))])
        # the rows of step a worth moving: its largest in column d and its four smallest
        mine = np.unique(np.r_[self.arg[a, d], np.argsort(x[self.steps[a], d], kind="stable")[:4]])
        xa, xp = x[self.steps[a, mine]], x[rows]  # (m, 3), (M, 3)
        # step a with its row i replaced by candidate j: (m, M, 3)
        rest_a = np.where(mine[:, None] == self.arg[a], self.second[a], self.top[a])
        ea = _excess(np.maximum(rest_a[:, None], xp[None]), self.sum[a] - xa[:, None] + xp[None], g)
        # the candidate's step with j replaced by row i (the partial step is not measured)
        b = np.maximum(owner, 0)
        rest_b = np.where(slot[:, None] == self.arg[b], self.second[b], self.top[b])
        eb = _excess(np.maximum(rest_b[None], xa[:, None]), self.sum[b][None] - xp[None] + xa[:, None], g)
        eb[:, owner < 0] = 0.0
        target = np.maximum(ea[..., d], eb[..., d])
        ok = target < worst - 1e-9
        if below is not None:
            ok &= target <= below
        for c in range(3):
            if c != d:
                cap = np.maximum(self.bound[c], self.excess[:, c].max())
                ok &= (ea[..., c] <= cap + 1e-12) & (eb[..., c] <= cap + 1e-12)
            if c != COMPUTE:
                over = self.excess[:, c] > self.median[c]
                now = int(over.sum())
                after = now - over[a] - np.where(owner >= 0, over[b], False)
                after = after + (ea[..., c] > self.median[c]) + (eb[..., c] > self.median[c])
                ok &= after <= max(self.room, now)
        if not ok.any():
            return None
        i, j = np.unravel_index(np.argmin(np.where(ok, target, np.inf)), target.shape)
        i = mine[i]
        row_a, row_b, other = self.steps[a, i], rows[j], owner[j]
        changed = np.array([a, other]) if other >= 0 else np.array([a])
        was, was_left, medians = self.steps[changed].copy(), self.left.copy(), self._medians()
        self.steps[a, i] = row_b
        if other >= 0:
            self.steps[other, slot[j]] = row_a
        else:
            self.left[slot[j]] = row_a
        self._update(changed)
        return tuple(int(c) for c in changed) if self._held(medians, changed, was, was_left) else None

    def _medians(self) -> np.ndarray:
        return np.median(self.excess[:, [TOKENS, PATCHES]], axis=0)

    def _held(self, before: np.ndarray, changed: np.ndarray, was: np.ndarray, was_left: np.ndarray) -> bool:
        """Whether the token and patch medians stayed within their bounds (or, above one, did not rise) after a
        move; if not, the move is undone. The count of steps over a bound alone does not hold the median: with an
        even number of steps it is the mean of the two middle ones, and a step already over may rise."""
        now = self._medians()
        if (now <= np.maximum(self.median[[TOKENS, PATCHES]], before) + 1e-12).all():
            return True
        self.steps[changed], self.left[:] = was, was_left
        self._update(changed)
        return False


def _excess(top: np.ndarray, total: np.ndarray, g: int) -> np.ndarray:
    """max/mean - 1 from the largest value and the sum of ``g`` values (0 where the sum is 0)."""
    mean = total / g
    return np.where(mean > 0, top / np.where(mean > 0, mean, 1.0), 1.0) - 1.0
