"""B3: packing quality on a synthetic, realistic mixture.

Prints fill ratio (real tokens / (rows * token budget)) and rank balance (max/mean over ranks, per step and
over the epoch) for our packer (best-fit-decreasing in a shuffle buffer + LPT dealing to ranks) and for a
naive baseline: samples concatenated in order until the next one would overflow a budget, rows dealt
round-robin to ranks (what in-order concatenation, as in the official code, amounts to).

    python benchmarks/bench_packing.py --samples 50000 --ranks 8 --max-tokens 16384
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from videollama3_train.data.config import DatasetConfig
from videollama3_train.data.packing import build_epoch_plan, fill_ratio, rank_balance


def synthetic_costs(n: int, *, media_share: float, median_tokens: int, seed: int) -> np.ndarray:
    """(tokens, patches) for ``n`` samples: lognormal token lengths clipped to 200..8000; ``media_share`` of
    them carry vision patches, 0.2x..3x their token count (merge 1 images to merge 2 videos)."""
    rng = np.random.default_rng(seed)
    tokens = np.clip(rng.lognormal(np.log(median_tokens), 0.9, n), 200, 8000).astype(np.int64)
    has_media = rng.random(n) < media_share
    patches = np.where(has_media, (tokens * rng.uniform(0.2, 3.0, n)).astype(np.int64), 0)
    return np.stack([tokens, patches], axis=1)


def naive_pack(costs: np.ndarray, order: np.ndarray, max_tokens: int, max_patches: int, ranks: int):
    """In-order greedy concatenation, rows dealt round-robin; a tail that does not fill a step is dropped."""
    rows, row, t, p = [], [], 0, 0
    for i in order:
        ct, cp = costs[i]
        if ct > max_tokens or cp > max_patches:
            continue
        if row and (t + ct > max_tokens or p + cp > max_patches):
            rows.append(row)
            row, t, p = [], 0, 0
        row.append(int(i))
        t, p = t + ct, p + cp
    if row:
        rows.append(row)
    steps = len(rows) // ranks
    return [[rows[s * ranks + r] for s in range(steps)] for r in range(ranks)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--samples", type=int, default=50_000, help="samples in the epoch (all datasets together)"
    )
    ap.add_argument("--ranks", type=int, default=8, help="data-parallel ranks")
    ap.add_argument("--max-tokens", type=int, default=16384, help="token budget per micro-batch (row)")
    ap.add_argument("--max-patches", type=int, default=40960, help="vision-patch budget per micro-batch")
    ap.add_argument("--buffer", type=int, default=2048, help="shuffle buffer of the packer, in samples")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    # a stage-3-like mixture: image SFT, video, text-only, with different typical lengths and media shares
    n = args.samples
    costs = [
        synthetic_costs(n // 2, media_share=0.95, median_tokens=900, seed=args.seed),
        synthetic_costs(n // 4, media_share=1.0, median_tokens=3000, seed=args.seed + 1),
        synthetic_costs(n - n // 2 - n // 4, media_share=0.0, median_tokens=500, seed=args.seed + 2),
    ]
    specs = [
        DatasetConfig(name="image", weight=0.5),
        DatasetConfig(name="video", weight=0.3),
        DatasetConfig(name="text", weight=0.2),
    ]

    start = time.perf_counter()
    plan = build_epoch_plan(
        specs,
        costs,
        seed=args.seed,
        epoch=0,
        max_tokens=args.max_tokens,
        max_patches=args.max_patches,
        buffer_size=args.buffer,
        num_ranks=args.ranks,
    )
    elapsed = time.perf_counter() - start
    naive = naive_pack(plan.costs, np.arange(len(plan.costs)), args.max_tokens, args.max_patches, args.ranks)

    print(f"{n} samples, {args.ranks} ranks, budget {args.max_tokens} tokens / {args.max_patches} patches")
    columns = ("rows/rank", "fill", "tok step", "tok epoch", "patch step", "patch epoch")
    print(f"{'packer':<10}" + "".join(f"{c:>12}" for c in columns))
    for name, mbs in (("ours", plan.micro_batches), ("naive", naive)):
        flat = [mb for rank in mbs for mb in rank]
        bal = rank_balance(plan.costs, mbs)
        values = (
            fill_ratio(plan.costs, flat, args.max_tokens),
            bal["tokens_step"],
            bal["tokens_epoch"],
            bal["patches_step"],
            bal["patches_epoch"],
        )
        print(f"{name:<10}{len(mbs[0]):>12}" + "".join(f"{v:>12.4f}" for v in values))
    print(
        f"packing took {elapsed:.2f} s; oversized {len(plan.oversized)}, leftover (not a whole step) "
        f"{len(plan.leftover)} samples"
    )


if __name__ == "__main__":
    main()
