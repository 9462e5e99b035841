"""B3: packing quality and planning cost, today's packer beside the new one on the same inputs.

For each epoch size (``--samples``) the epoch plan (mixture + bin packing + dealing into steps of ``G`` rows) is
built in a fresh process, with this checkout's packer as training runs it (``new``: rows dealt by predicted compute,
tokens and patches, ``data/balance.py``) and with another checkout's (``--today``: a path whose
``videollama3_train`` is the packer to compare with) both as training ran it (``today``: rows dealt by patches) and
dealing by compute alone (``today-compute``, when that checkout has a cost model); ``new-memory``: this checkout's
packer under the activation bound training derives for the 2B preset (rows dealt by patches); all get the same
synthetic cost tables, interleaved. Each process reports planning wall and CPU time, peak RSS, fill ratio (real tokens / (rows x
token budget)) and the per-step rank balance (max/mean over ranks of tokens, patches and predicted compute, worst
and median step; the padded last step left out).

    python benchmarks/bench_packing.py --samples 10000 100000 1000000 --mix longvideo --ranks 8 64 \\
        --today /tmp/base --out benchmarks/results/B3_packing.jsonl

``--child`` runs one measurement (used by the parent).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MIXES = ("stage3", "longvideo")


def synthetic_costs(n: int, *, media_share: float, median_tokens: int, seed: int) -> np.ndarray:
    """(tokens, patches) for ``n`` samples: lognormal token lengths clipped to 200..8000; ``media_share`` of
    them carry vision patches, 0.2x..3x their token count (merge 1 images to merge 2 videos)."""
    rng = np.random.default_rng(seed)
    tokens = np.clip(rng.lognormal(np.log(median_tokens), 0.9, n), 200, 8000).astype(np.int64)
    has_media = rng.random(n) < media_share
    patches = np.where(has_media, (tokens * rng.uniform(0.2, 3.0, n)).astype(np.int64), 0)
    return np.stack([tokens, patches], axis=1)


def longvideo_costs(n: int, seed: int) -> list[np.ndarray]:
    """The long-video mix, three datasets, columns (tokens, patches, visual LLM tokens, tower sum P_f^2): 30% videos
    of 4k-16k tokens (90% of them visual, merge 2: 4 patches per visual token, up to 180 frames of >= 64 visual
    tokens), 50% images (300-2500 tokens, 85% visual, merge 1, one segment), 20% text (100-3000 tokens)."""
    rng = np.random.default_rng(seed)
    nv, ni = int(0.3 * n), int(0.5 * n)
    vt = rng.integers(4000, 16001, nv)
    vv = (0.9 * vt).astype(np.int64)
    frames = np.clip(vv // 64, 8, 180)
    it = rng.integers(300, 2501, ni)
    iv = (0.85 * it).astype(np.int64)
    tt = rng.integers(100, 3001, n - nv - ni)
    zero = np.zeros_like(tt)
    return [
        np.stack([vt, 4 * vv, vv, frames * (4 * vv // frames) ** 2], 1),
        np.stack([it, iv, iv, iv * iv], 1),
        np.stack([tt, zero, zero, zero], 1),
    ]


# the 2B preset's dimensions (model/presets.py), as plain numbers
SHAPE_2B = dict(d=1536, nq=12, nkv=2, hd=128, ff=8960, Ll=28, V=151936, dv=1152, ffv=4304, Lv=27)


def cost_model_module():
    """This checkout's data/cost_model.py (numpy only), loaded by path: --today's tree may not have one."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "videollama3_train" / "data" / "cost_model.py"
    spec = importlib.util.spec_from_file_location("cost_model_here", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def mix(name: str, n: int, seed: int) -> tuple[list[np.ndarray], list[float], int, int]:
    """``(cost tables, weights, max_tokens, max_patches)`` of a named mix of ``n`` samples."""
    if name == "longvideo":
        return longvideo_costs(n, seed), [0.3, 0.5, 0.2], 16384, 65536
    return (
        [
            synthetic_costs(n // 2, media_share=0.95, median_tokens=900, seed=seed),
            synthetic_costs(n // 4, media_share=1.0, median_tokens=3000, seed=seed + 1),
            synthetic_costs(n - n // 2 - n // 4, media_share=0.0, median_tokens=500, seed=seed + 2),
        ],
        [0.5, 0.3, 0.2],
        16384,
        40960,
    )


def child(args: argparse.Namespace) -> dict:
    """One measurement in this process: the packer importable here (this checkout or --today's)."""
    import inspect

    from videollama3_train.data import packing
    from videollama3_train.data.config import DatasetConfig

    full, weights, max_tokens, max_patches = mix(args.mix, args.samples, args.seed)
    cm = cost_model_module()
    model = cm.SampleCostModel(cm.FlopsShape(**SHAPE_2B))
    extra = (
        (lambda t: {"visual_tokens": t[:, 2], "patches_sq": t[:, 3]})
        if full[0].shape[1] >= 4
        else (lambda t: {})
    )
    flops = [model.sample_flops(t[:, :2], **extra(t)) for t in full]
    specs = [DatasetConfig(name=f"d{i}", weight=w) for i, w in enumerate(weights)]
    new = "rows_per_step" in inspect.signature(packing.build_epoch_plan).parameters
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    if args.impl == "memory":  # under the activation bound training derives for the 2B preset (DDP)
        from videollama3_train.data.cost_model import ActivationModel, FlopsShape

        planner = packing.EpochPlanner(
            specs, full, seed=args.seed, max_tokens=max_tokens, max_patches=max_patches, grad_accum=args.rows,
            world_size=1, activation=ActivationModel(FlopsShape(**SHAPE_2B), 16), max_activation_bytes=int(36.7e9),
        )  # fmt: skip
        plan = planner.plan(0)
    elif args.impl == "compute":  # rows dealt by predicted compute (the cost model sees every column)
        planner = packing.EpochPlanner(
            specs, full, seed=args.seed, max_tokens=max_tokens, max_patches=max_patches,
            grad_accum=args.rows, world_size=1, cost_model=model,
        )  # fmt: skip
        plan = planner.plan(0)
    else:
        grouping = {"rows_per_step": args.rows} if new else {"num_ranks": args.rows, "drop_last": False}
        costs = [t[:, :2] for t in full]
        plan = packing.build_epoch_plan(
            specs, costs, seed=args.seed, epoch=0, max_tokens=max_tokens, max_patches=max_patches, **grouping
        )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if new:
        steps_rows, ids, offsets = plan.steps_rows, plan.rows.ids, plan.rows.offsets
    else:  # today's: micro_batches[slot][step] lists; made into the same arrays outside the timing
        rows = [mb for slot in plan.micro_batches for mb in slot if mb]
        index, k = {}, 0
        for slot in plan.micro_batches:
            for mb in slot:
                if mb:
                    index[id(mb)] = k
                    k += 1
        steps_rows = np.array(
            [
                [index[id(slot[s])] if slot[s] else -1 for slot in plan.micro_batches]
                for s in range(plan.steps)
            ]
        )
        ids = np.array([i for r in rows for i in r])
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    ent = np.asarray(plan.entries, dtype=np.int64).reshape(-1, 2)
    per_sample = np.empty(len(ent))
    for d, f in enumerate(flops):
        per_sample[ent[:, 0] == d] = f[ent[ent[:, 0] == d, 1]]
    load = np.add.reduceat(plan.costs[ids][:, :2].astype(np.float64), offsets[:-1], axis=0)
    load = np.concatenate([load, np.add.reduceat(per_sample[ids], offsets[:-1])[:, None]], axis=1)
    slots = np.where(steps_rows[..., None] >= 0, load[np.maximum(steps_rows, 0)], 0)
    if (steps_rows[-1] < 0).any():
        slots = slots[:-1]
    ranks = slots.reshape(len(slots), -1, args.ranks, 3).sum(axis=1)
    mean = ranks.mean(axis=1)
    per_step = np.where(mean > 0, ranks.max(axis=1) / np.maximum(mean, 1e-9), 1.0)
    return {
        "impl": args.label,
        "mix": args.mix,
        "samples": args.samples,
        "rows_per_step": args.rows,
        "ranks": args.ranks,
        "wall_s": wall,
        "cpu_s": cpu,
        "samples_per_cpu_s": args.samples / cpu if cpu else None,
        "rss_before_mb": rss0 / 1024,
        "peak_rss_mb": rss / 1024,
        "rows": len(offsets) - 1,
        "steps": int(len(steps_rows)),
        "fill": float(load[:, 0].sum() / ((len(offsets) - 1) * max_tokens)),
        "tokens_step_worst": float(per_step[:, 0].max()),
        "tokens_step_median": float(np.median(per_step[:, 0])),
        "patches_step_worst": float(per_step[:, 1].max()),
        "patches_step_median": float(np.median(per_step[:, 1])),
        "compute_step_worst": float(per_step[:, 2].max()),
        "compute_step_median": float(np.median(per_step[:, 2])),
        "compute_step_mean": float(per_step[:, 2].mean()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, nargs="+", default=[10_000, 100_000], help="epoch sizes")
    ap.add_argument("--mix", choices=MIXES, nargs="+", default=list(MIXES))
    ap.add_argument(
        "--ranks", type=int, nargs="+", default=[8], help="data-parallel ranks (rows per step = ranks)"
    )
    ap.add_argument("--today", help="a checkout of the packer to compare with (its root goes on PYTHONPATH)")
    ap.add_argument(
        "--today-max", type=int, default=1_000_000, help="largest epoch given to --today's packer"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results (JSON lines) here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="compute", help=argparse.SUPPRESS)
    ap.add_argument("--label", default="new", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.samples, args.mix, args.ranks = args.samples[0], args.mix[0], args.ranks[0]
        args.rows = args.ranks
        print(json.dumps(child(args)))
        return
    here = str(Path(__file__).resolve().parents[1])
    results = []
    for n, m, ranks in ((n, m, k) for n in args.samples for m in args.mix for k in args.ranks):
        if True:
            impls = [("new", here, "compute"), ("new-memory", here, "memory")]
            if args.today and n <= args.today_max:
                impls = [("today", args.today, "plain"), ("today-compute", args.today, "compute"), *impls]
            for label, root, impl in impls:
                cmd = [sys.executable, __file__, "--child", "--impl", impl, "--label", label]
                cmd += ["--samples", str(n), "--mix", m]
                cmd += ["--ranks", str(ranks), "--seed", str(args.seed)]
                env = {**os.environ, "PYTHONPATH": root}
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                results.append(r)
                print(
                    f"{m:>9} {n:>8} {ranks:>3} ranks {label:>13}: cpu {r['cpu_s']:7.2f} s (wall {r['wall_s']:6.2f}) "
                    f"{r['samples_per_cpu_s'] / 1e6:5.2f} M samples/cpu-s, peak RSS {r['peak_rss_mb']:6.0f} MB, "
                    f"fill {r['fill']:.4f}, tokens step worst/median {r['tokens_step_worst']:.4f}/"
                    f"{r['tokens_step_median']:.4f}, patches {r['patches_step_worst']:.4f}/"
                    f"{r['patches_step_median']:.4f}, compute {r['compute_step_worst']:.4f}/"
                    f"{r['compute_step_median']:.4f}",
                    flush=True,
                )
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
