"""B11: does the cost model's predicted compute order the measured step times of packed rows?

Builds packed rows of very different compositions at one shape (default ``tiny``, row budget 1024 tokens): text
rows of many short samples down to one long sample, rows of many small images or one large image, videos of many
small frames or few large ones (merge 2, compression mask), mixed rows, and a few part-filled rows. Each row is
collated by ``data.collate.collate_packed`` with random pixels of the encoder's output shape (``common.add_pixels``:
content does not change the compute), and stepped as training steps it: ``model.api.hidden_states`` +
``chunked_cross_entropy`` forward and backward (no optimizer step: it costs the same for every row), per-sample
attention by the varlen kernel (on CPU its reference: one SDPA call per sample / per image or frame).

Predicted cost: ``trainer.metrics.flops_per_step`` of the row's ``batch_stats`` (the MFU metric's count, the same
formula as ``data.cost_model``), and the packer's estimate from the cost table alone
(``SampleCostModel.sample_flops`` of ``(tokens, patches)``, summed over the row). Measured: after ``--warmup``
rounds, ``--repeats`` rounds over all rows in a shuffled round-robin order (the machine may be loaded by others:
every row sees the same load), the median step time per row. Reported: the Spearman rank correlation of
predicted FLOPs and measured time, the load average before and after, and a least-squares fit of
``time = a * FLOPs + b * samples + c * segments + d`` (what per-call overhead costs at this shape).

    nice -n 10 python benchmarks/bench_cost_model.py --threads 1 --repeats 7 --out benchmarks/results/B11_cost_model.json
    python benchmarks/bench_cost_model.py --device cuda --shape small         # on a GPU (device_check.py)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # common.py
sys.path.append(os.path.dirname(_HERE))  # the repo root, when the package is not installed

from common import (  # noqa: E402
    IGNORE_INDEX,
    SHAPES,
    TIMESTAMP_TOKENS,
    add_pixels,
    build_bench_model,
    command_line,
    machine_info,
    markdown_table,
    media_token_ids,
    now,
    resolve_device,
    sample_costs,
    sync,
)

from videollama3_train.contract import VISUAL_KEYS  # noqa: E402
from videollama3_train.data.collate import collate_packed  # noqa: E402
from videollama3_train.data.cost_model import SampleCostModel  # noqa: E402
from videollama3_train.model import api  # noqa: E402
from videollama3_train.model.attention import select_attention  # noqa: E402
from videollama3_train.trainer.loss import chunked_cross_entropy, shift_and_select  # noqa: E402
from videollama3_train.trainer.metrics import batch_stats, flops_per_step, shape_from_config  # noqa: E402

FORWARD_KEYS = ("input_ids", "position_ids", *VISUAL_KEYS)


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------


def make_sample(
    rng: np.random.Generator,
    vocab: int,
    *,
    text: int,
    images: tuple[tuple[int, int], ...] = (),
    video: tuple[int, int, int, float] | None = None,
) -> dict[str, Any]:
    """One Sample dict: ``images`` merge-1 grids ``(h, w)`` (one token per patch, a "\\n" after each), ``video``
    ``(frames, hh, ww, keep)``: a merge-2 grid ``(frames, 2hh, 2ww)`` whose compression mask keeps ``keep`` of each
    frame's ``hh*ww`` tokens (at least one), timestamp tokens before each frame; then ``text`` tokens, the last
    half labelled. Pixels are added later (``add_pixels``)."""
    image_id, video_id = media_token_ids(vocab)
    hi = min(image_id, video_id)  # text ids below the media ids (and the Qwen2 ones)
    ids: list[np.ndarray] = []
    out: dict[str, Any] = {}
    for h, w in images:
        ids += [np.full(h * w, image_id), rng.integers(0, hi, 1)]
    if images:
        out["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in images], dtype=torch.long)
        out["image_merge_sizes"] = torch.ones(len(images), dtype=torch.long)
    if video is not None:
        t, hh, ww, keep = video
        mask = torch.from_numpy(rng.random((t, hh * ww)) < keep)
        mask[:, 0] = True
        for f in range(t):
            ids += [rng.integers(0, hi, TIMESTAMP_TOKENS), np.full(int(mask[f].sum()), video_id)]
        out["video_grid_thw"] = torch.tensor([[t, 2 * hh, 2 * ww]], dtype=torch.long)
        out["video_merge_sizes"] = torch.tensor([2], dtype=torch.long)
        out["video_compression_mask"] = mask.reshape(-1)
    prompt = rng.integers(0, hi, text)
    ids.append(prompt)
    input_ids = torch.from_numpy(np.concatenate(ids).astype(np.int64))
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[-max(1, text // 2) :] = input_ids[-max(1, text // 2) :]
    return {"input_ids": input_ids, "labels": labels, **out}


def row_specs() -> list[tuple[str, list[dict[str, Any]]]]:
    """``(name, [sample spec])`` of every row (tiny shape, 1024-token budget); a spec is ``make_sample``'s
    keywords, ``n`` copies."""

    def rep(n: int, **kw) -> list[dict[str, Any]]:
        return [kw] * n

    return [
        ("text 64 x 16", rep(64, text=16)),
        ("text 32 x 32", rep(32, text=32)),
        ("text 16 x 64", rep(16, text=64)),
        ("text 8 x 128", rep(8, text=128)),
        ("text 4 x 256", rep(4, text=256)),
        ("text 2 x 512", rep(2, text=512)),
        ("text 1 x 1024", rep(1, text=1024)),
        ("text 1 x 512 (half row)", rep(1, text=512)),
        ("text 1 x 256 (quarter row)", rep(1, text=256)),
        ("images 32 x 4x4", rep(32, text=14, images=((4, 4),))),
        ("images 16 x 6x6", rep(16, text=24, images=((6, 6),))),
        ("images 4 x 14x14", rep(4, text=50, images=((14, 14),))),
        ("image 1 x 30x30", rep(1, text=100, images=((30, 30),))),
        ("image 1 x 31x32", rep(1, text=30, images=((31, 32),))),
        ("image 1 x 16x16 (quarter row)", rep(1, text=50, images=((16, 16),))),
        ("video 16 fr 6x6 keep 1", rep(1, text=100, video=(16, 6, 6, 1.0))),
        ("video 64 fr 4x4 keep .4", rep(1, text=20, video=(64, 4, 4, 0.4))),
        ("video 8 fr 10x10 keep 1", rep(1, text=100, video=(8, 10, 10, 1.0))),
        ("videos 4 x 8 fr 4x4", rep(4, text=40, video=(8, 4, 4, 1.0))),
        ("video 8 fr 16x16 keep .1", rep(1, text=100, video=(8, 16, 16, 0.1))),
        ("video 32 fr 8x8 keep .2", rep(1, text=100, video=(32, 8, 8, 0.2))),
        (
            "mixed: 2 images, video, 4 texts",
            [*rep(1, text=40, images=((10, 10), (10, 10))), *rep(1, text=40, video=(8, 5, 5, 1.0))]
            + rep(4, text=100),
        ),
        ("mixed: text 500 + image 20x20", [*rep(1, text=500), *rep(1, text=60, images=((20, 20),))]),
        (
            "mixed: 8 texts, 4 images, video",
            rep(8, text=64) + rep(4, text=20, images=((8, 8),)) + rep(1, text=20, video=(8, 3, 3, 1.0)),
        ),
    ]


def build_rows(vocab: int, max_tokens: int, seed: int) -> list[tuple[str, dict[str, Any], np.ndarray]]:
    """``(name, collated CPU row, cost table)`` of every row; rows over ``max_tokens`` are a bug of the specs."""
    rng = np.random.default_rng([seed, 0xB10])
    rows = []
    for i, (name, specs) in enumerate(row_specs()):
        samples = [make_sample(rng, vocab, **spec) for spec in specs]
        costs = sample_costs(samples)
        if costs[:, 0].sum() > max_tokens:
            raise ValueError(f"row {name!r}: {costs[:, 0].sum()} tokens > budget {max_tokens}")
        batch = collate_packed([add_pixels(s, seed + 7919 * i + j) for j, s in enumerate(samples)])
        rows.append((name, batch, costs))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------


def train_step(model, batch: dict[str, Any], autocast) -> None:
    """Forward + backward of one packed row as ``trainer.step`` runs it (loss on labelled positions only)."""
    kwargs = {k: batch[k] for k in FORWARD_KEYS if k in batch}
    with autocast:
        hidden = api.hidden_states(model, **kwargs)
        hidden_sel, targets = shift_and_select(hidden, batch["labels"])
        head = api.output_layer(model)
        loss_sum, n = chunked_cross_entropy(hidden_sel, head.weight, targets, chunk_size=4096, bias=head.bias)
    (loss_sum / max(n, 1)).backward()
    model.zero_grad(set_to_none=True)


def measure(
    model, batches: list[dict[str, Any]], device, *, warmup: int, repeats: int, seed: int
) -> np.ndarray:
    """``(repeats, rows)`` step seconds: each round steps every row once, in a fresh shuffled order."""
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    rng = np.random.default_rng([seed, 0x7135])
    times = np.zeros((repeats, len(batches)))
    for r in range(warmup + repeats):
        for i in rng.permutation(len(batches)):
            sync(device)
            t0 = time.perf_counter()
            train_step(model, batches[i], autocast)
            sync(device)
            if r >= warmup:
                times[r - warmup, i] = time.perf_counter() - t0
    return times


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):  # ties share their average rank
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def overhead_fit(flops, samples, segments, seconds) -> dict[str, float]:
    """Least squares ``seconds = a * FLOPs + b * samples + c * segments + d`` (per-call overheads)."""
    x = np.column_stack([flops, samples, segments, np.ones(len(flops))]).astype(np.float64)
    coef, *_ = np.linalg.lstsq(x, np.asarray(seconds, dtype=np.float64), rcond=None)
    fitted = x @ coef
    return {
        "s_per_gflop": float(coef[0] * 1e9),
        "s_per_sample": float(coef[1]),
        "s_per_segment": float(coef[2]),
        "s_fixed": float(coef[3]),
        "spearman_fitted": spearman(fitted, seconds),
    }


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:i] | auto")
    ap.add_argument("--attn", default="auto", help="auto: varlen on CUDA, its reference kernel on CPU")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed for the whole run)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds over all rows")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds; the median per row is reported")
    ap.add_argument("--max-tokens", type=int, default=1024, help="row budget (the rows are built to fit it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", default=None, help="write the results as JSON here (and the table beside it, .md)"
    )
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    attn = args.attn
    if attn == "auto":
        attn = "varlen" if device.type == "cuda" else "varlen_reference"
    attn = select_attention(attn)
    model = build_bench_model(args.shape, attn, seed=args.seed, device=device)
    shape = shape_from_config(model.config)
    packer_model = SampleCostModel(shape, merge=1)
    rows = build_rows(model.config.text_config.vocab_size, args.max_tokens, args.seed)
    batches = [
        {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for _, b, _ in rows
    ]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    times = measure(model, batches, device, warmup=args.warmup, repeats=args.repeats, seed=args.seed)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()

    out_rows = []
    for (name, batch, costs), col in zip(rows, times.T, strict=True):
        stats = batch_stats(batch)
        flops = flops_per_step(shape, stats, llm_trains=True, vision_trains=True)
        out_rows.append(
            {
                "row": name,
                "samples": len(stats["sample_lengths"]),
                "segments": len(stats["sample_lengths"]) + len(stats["segment_patches"]),
                "tokens": stats["N_tokens"],
                "patches": sum(stats["segment_patches"]),
                "flops": flops["total"],
                "flops_attn_share": (flops["F_attn"] + flops["F_vit"]) / flops["total"],
                "flops_packer": float(packer_model.sample_flops(costs).sum()),
                "seconds": float(np.median(col)),
                "seconds_iqr": float(np.percentile(col, 75) - np.percentile(col, 25)),
            }
        )
    col = {k: [r[k] for r in out_rows] for k in out_rows[0]}
    return {
        "command": command_line(None, "benchmarks/bench_cost_model.py"),
        "date": now(),
        "machine": machine_info(device),
        "shape": args.shape,
        "attn": attn,
        "threads": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "load_before": load_before,
        "load_after": load_after,
        "wall_s": wall,
        "rows": out_rows,
        "spearman": spearman(col["flops"], col["seconds"]),
        "spearman_packer": spearman(col["flops_packer"], col["seconds"]),
        "spearman_tokens": spearman(col["tokens"], col["seconds"]),
        "fit": overhead_fit(col["flops"], col["samples"], col["segments"], col["seconds"]),
    }


def render(res: dict[str, Any]) -> str:
    table = markdown_table(
        ["row", "samples", "segments", "tokens", "patches", "predicted MFLOP", "packer MFLOP", "measured ms"],
        [
            [
                r["row"], r["samples"], r["segments"], r["tokens"], r["patches"], f"{r['flops'] / 1e6:.0f}",
                f"{r['flops_packer'] / 1e6:.0f}", f"{r['seconds'] * 1e3:.1f}",
            ]
            for r in sorted(res["rows"], key=lambda r: r["flops"])
        ],
    )  # fmt: skip
    fit = res["fit"]
    return "\n".join(
        [
            f"{res['date']}; {res['machine']}; shape {res['shape']}, attention {res['attn']}; "
            f"{res['warmup']} warm-up + {res['repeats']} timed rounds (median), rows shuffled each round; "
            f"load average before {res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f}; "
            f"wall {res['wall_s']:.0f} s",
            "",
            table,
            "",
            f"Spearman(predicted FLOPs, time) = {res['spearman']:.3f}; packer's estimate: "
            f"{res['spearman_packer']:.3f}; tokens alone: {res['spearman_tokens']:.3f}",
            f"fit: time = {fit['s_per_gflop']:.4f} s/GFLOP + {fit['s_per_sample'] * 1e3:.3f} ms/sample + "
            f"{fit['s_per_segment'] * 1e3:.3f} ms/segment + {fit['s_fixed'] * 1e3:.1f} ms; "
            f"Spearman(fit, time) = {fit['spearman_fitted']:.3f}",
        ]
    )


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    res = run(args)
    text = render(res)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(text + "\n")
    return res


if __name__ == "__main__":
    main()
