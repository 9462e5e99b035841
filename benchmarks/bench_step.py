"""B4: one training step of VideoLLaMA3 -- ours (packed row, chunked loss, selective checkpointing) vs the native
model fed padded batches -- on a synthetic stage-3-like mixture (images, videos, text-only; no media decoded).

Ours: micro-batches of at most ``--max-tokens`` tokens packed by the project's ``data.packing.pack`` and
``data.collate.collate_packed``; one packed row, ``--attn varlen`` (CUDA) or ``sdpa``; ``model.api.hidden_states``
then ``shift_and_select`` + ``chunked_cross_entropy`` against ``model.api.output_layer`` on labelled positions only
(what ``trainer.step.LossModule`` does); activation checkpointing of every ``--ckpt-llm-every``-th LLM layer
(+ the vision tower with ``--ckpt-vision``); bf16 autocast and fused AdamW on CUDA.
Baseline, same process: the native model on padded batches (``collate_padded``, attention_mask, sdpa,
``model(**inputs, labels=...)``: full-vocabulary fp32 loss), full checkpointing of both towers (as in the
docs/reference.md §5 anchor), the largest batch of ``--baseline-batches`` that does not run out of memory.

Both: a gradient-clip + AdamW step per micro-batch; ``--warmup`` steps, then the MEDIAN of ``--steps`` timed
steps: real tokens/s (padding excluded), MFU by ``trainer.metrics.flops_per_step`` (docs/reference.md §6) against
989.4 TFLOP/s, peak memory (CUDA: ``max_memory_allocated``; CPU: parameters + optimizer state + the peak of
tensors allocated during one extra untimed step, followed by a ``TorchDispatchMode``; and the process RSS
high-water mark, which is monotonic over the process so it covers every earlier mode too).

    python benchmarks/bench_step.py --shape 2b                       # H100: the real comparison
    nice -n 10 python benchmarks/bench_step.py --shape small         # CPU: a few layers of the 2B widths
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # common.py
sys.path.append(os.path.dirname(_HERE))  # the repo root, when the package is not installed

from common import (  # noqa: E402
    DEFAULT_MAX_TOKENS,
    SHAPES,
    LiveTensorMemory,
    add_pixels,
    build_bench_model,
    command_line,
    gib,
    machine_info,
    markdown_table,
    median,
    mixture_summary,
    now,
    resolve_device,
    rss_peak_bytes,
    sample_costs,
    set_checkpointing,
    static_bytes,
    sync,
    synthetic_samples,
)

from videollama3_train.contract import VISUAL_KEYS  # noqa: E402
from videollama3_train.data.collate import collate_packed, collate_padded, forward_kwargs  # noqa: E402
from videollama3_train.data.packing import pack  # noqa: E402
from videollama3_train.model import api  # noqa: E402
from videollama3_train.model.attention import select_attention  # noqa: E402
from videollama3_train.trainer.loss import chunked_cross_entropy, shift_and_select  # noqa: E402
from videollama3_train.trainer.metrics import (  # noqa: E402
    H100_BF16_PEAK,
    batch_stats,
    flops_per_step,
    shape_from_config,
)

# The model's forward kwargs of a packed row, labels aside (the loss takes them).
VISUAL_AND_TEXT = ("input_ids", "position_ids", *VISUAL_KEYS)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="2b")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    ap.add_argument(
        "--max-tokens", type=int, default=None, help="row budget (default: 16384 at 2b, 1024 else)"
    )
    ap.add_argument(
        "--max-patches", type=int, default=None, help="vision patches per row (default 4x tokens)"
    )
    ap.add_argument(
        "--scale", type=float, default=None, help="sample-length scale (default max_tokens / 16384)"
    )
    ap.add_argument("--mix", default="0.55,0.30,0.15", help="shares of image,video,text-only samples")
    ap.add_argument(
        "--attn",
        choices=["auto", "varlen", "varlen_reference", "sdpa"],
        default="auto",
        help="ours; auto: varlen on CUDA, sdpa on CPU; varlen_reference: the varlen plumbing with the plain-PyTorch "
        "kernel (CPU)",
    )
    ap.add_argument(
        "--ckpt-llm-every", type=int, default=2, help="ours: checkpoint every n-th LLM layer (0=off)"
    )
    ap.add_argument("--ckpt-vision", action="store_true", help="ours: checkpoint every vision-tower layer")
    ap.add_argument(
        "--chunk-size", type=int, default=4096, help="ours: rows of (chunk, V) fp32 logits at once"
    )
    ap.add_argument(
        "--baseline-batches",
        default="8,6,4,3,2,1",
        help="padded batch sizes to try, largest first (OOM -> next)",
    )
    ap.add_argument(
        "--cpu-logits-gib",
        type=float,
        default=6.0,
        help="CPU only (no OOM to catch): skip baseline batches whose full-vocab logits (fp32 copy + its "
        "gradient + the model-dtype logits) would exceed this many GiB",
    )
    ap.add_argument("--baseline-ckpt", choices=["both", "none"], default="both")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--no-ours", action="store_true")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 CUDA, 1 CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10 CUDA, 3 CPU)")
    ap.add_argument("--no-memory-step", action="store_true", help="CPU: skip the extra memory-tracked step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the markdown report to this file")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def build_data(args, vocab: int, n_steps: int, max_batch: int) -> tuple[list, list, dict[str, Any]]:
    """Packed micro-batches for ours (lists of samples, fullest first) and the sample stream for the baseline."""
    mean_len = None
    pool = 64
    while True:
        samples = synthetic_samples(
            pool,
            vocab=vocab,
            max_tokens=args.max_tokens,
            scale=args.scale,
            mix=args.mix_shares,
            seed=args.seed,
        )
        costs = sample_costs(samples)
        mean_len = costs[:, 0].mean()
        need = int(2 * n_steps * args.max_tokens / mean_len) + n_steps * max_batch + 16
        if pool >= need:
            break
        pool = need
    plan = pack(
        costs,
        np.arange(len(samples)),
        max_tokens=args.max_tokens,
        max_patches=args.max_patches,
        buffer_size=len(samples),
        seed=args.seed,
    )
    rows = sorted(plan.micro_batches[0], key=lambda mb: -int(costs[mb, 0].sum()))[:n_steps]
    # the fullest rows, then in the packer's own (shuffled) order so images / videos / text alternate
    order = {tuple(mb): i for i, mb in enumerate(plan.micro_batches[0])}
    rows.sort(key=lambda mb: order[tuple(mb)])
    packed = [[samples[i] for i in mb] for mb in rows]
    fill = float(np.mean([costs[mb, 0].sum() / args.max_tokens for mb in rows]))
    info = {**mixture_summary(samples), "fill": fill, "pool": len(samples)}
    return packed, samples, info


# ---------------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------------


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def ours_step(model, batch, optimizer, autocast, chunk_size: int, after_backward=None) -> float:
    kwargs = {k: batch[k] for k in VISUAL_AND_TEXT if k in batch}
    with autocast:
        hidden = api.hidden_states(model, **kwargs)
        hidden_sel, targets = shift_and_select(hidden, batch["labels"])
        head = api.output_layer(model)
        loss_sum, n = chunked_cross_entropy(
            hidden_sel, head.weight, targets, chunk_size=chunk_size, bias=head.bias
        )
        loss = loss_sum / max(n, 1)
    loss.backward()
    if after_backward is not None:
        after_backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def baseline_step(model, batch, optimizer, autocast, chunk_size: int, after_backward=None) -> float:
    with autocast:
        loss = model(**forward_kwargs(batch), use_cache=False).loss
    loss.backward()
    if after_backward is not None:
        after_backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def run_mode(
    args, *, name: str, attn: str, ckpt: tuple[int, bool], batches: list[dict], step_fn, n_logit_all: bool
) -> dict[str, Any]:
    """Build a fresh model + optimizer, run warmup + timed steps over ``batches`` (CPU tensors), measure."""
    device = args.device_obj
    cuda = device.type == "cuda"
    model = build_bench_model(args.shape, attn, seed=args.seed, device=device)
    ckpt_desc = set_checkpointing(model, llm_every=ckpt[0], vision=ckpt[1])
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, fused=cuda or None
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    shape = shape_from_config(model.config)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    times, tok_s, mfus, tokens, losses = [], [], [], [], []
    total = args.warmup + args.steps
    for i in range(total):
        cpu_batch = batches[i % len(batches)]
        stats = batch_stats(cpu_batch)
        if n_logit_all:  # the native loss computes logits at every real position (padding excluded here)
            stats = {**stats, "N_logit_tokens": stats["N_tokens"]}
        flops = flops_per_step(shape, stats, llm_trains=True, vision_trains=True)["total"]
        batch = to_device(cpu_batch, device)
        sync(device)
        start = time.perf_counter()
        losses.append(step_fn(model, batch, optimizer, autocast, args.chunk_size))
        sync(device)
        seconds = time.perf_counter() - start
        del batch
        if i >= args.warmup:
            times.append(seconds)
            tokens.append(stats["N_tokens"])
            tok_s.append(stats["N_tokens"] / seconds)
            mfus.append(flops / seconds / H100_BF16_PEAK)

    result = {
        "name": name,
        "attn": attn,
        "ckpt": ckpt_desc,
        "step_s": median(times),
        "tokens_per_s": median(tok_s),
        "mfu": median(mfus),
        "tokens_per_step": median(tokens),
        "loss": losses[-1],
    }
    if cuda:
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    elif not args.no_memory_step:
        static = static_bytes(model, optimizer)
        batch = to_device(batches[0], device)
        fwd_bwd = {}
        with LiveTensorMemory() as tracker:
            step_fn(
                model,
                batch,
                optimizer,
                autocast,
                args.chunk_size,
                after_backward=lambda: fwd_bwd.setdefault("peak", tracker.peak),
            )
        result["peak_bytes"] = static + tracker.peak
        result["fwd_bwd_peak_bytes"] = static + fwd_bwd["peak"]
        result["rss_bytes"] = rss_peak_bytes()
    del model, optimizer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_mode_or_oom(args, **kwargs) -> dict[str, Any] | None:
    """:func:`run_mode`, or None when it ran out of CUDA memory (the memory is released before returning)."""
    res = None
    try:
        res = run_mode(args, **kwargs)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not (args.device_obj.type == "cuda" and is_oom(e)):
            raise
    # out of memory: cleaned up here, once the exception (whose traceback holds the model) is gone
    if res is None:
        gc.collect()
        torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def configure(argv=None) -> argparse.Namespace:
    """Parsed arguments with the derived fields (``device_obj``, row budget, scale, warm-up and timed steps,
    ``ours_attn`` resolved by ``select_attention``, ``baseline_sizes``, ``n_steps``, ``vocab``, ``pad_id``)."""
    args = parse_args(argv)
    device = args.device_obj = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS[args.shape]
    args.max_patches = args.max_patches or 4 * args.max_tokens
    args.scale = args.scale if args.scale is not None else args.max_tokens / 16384
    args.mix_shares = [float(x) for x in args.mix.split(",")]
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.steps = args.steps if args.steps is not None else (10 if cuda else 3)
    args.baseline_sizes = [int(b) for b in args.baseline_batches.split(",")]
    if args.attn == "auto":
        args.attn = "varlen" if cuda else "sdpa"
    try:
        args.ours_attn = select_attention(args.attn)
    except RuntimeError as e:
        raise SystemExit(str(e)) from e
    args.vocab = SHAPES[args.shape].text.vocab_size
    args.n_steps = args.warmup + args.steps
    args.pad_id = 151643 if args.vocab > 151643 else 0  # <|endoftext|>
    return args


def ours_batches(args, packed_rows: list[list[dict]]) -> list[dict]:
    """The packed rows as collated CPU micro-batches, with random pixels."""
    return [
        collate_packed([add_pixels(s, args.seed + 7919 * i + j) for j, s in enumerate(row)])
        for i, row in enumerate(packed_rows)
    ]


def run_ours(args, batches: list[dict], ckpt: tuple[int, bool]) -> dict[str, Any] | None:
    """Ours on ``batches`` with checkpointing ``(every n-th LLM layer, vision tower)``; None on CUDA OOM."""
    res = run_mode_or_oom(
        args,
        name="ours",
        attn=args.ours_attn,
        ckpt=ckpt,
        batches=batches,
        step_fn=ours_step,
        n_logit_all=False,
    )
    if res is not None:
        res["batch"] = f"1 packed row <= {args.max_tokens}"
        res["loss_kind"] = "chunked CE, labelled only"
    return res


def padded_batches(args, stream: list[dict], size: int) -> list[dict]:
    """``args.n_steps`` padded batches of ``size`` consecutive samples of ``stream`` (what the native
    processor returns for a batch: right padding, ``attention_mask``), with random pixels."""
    batches = []
    for i in range(args.n_steps):
        group = stream[(i * size) % len(stream) :][:size]
        group = group if len(group) == size else stream[:size]
        batches.append(
            collate_padded(
                [add_pixels(s, args.seed + 104729 * i + j) for j, s in enumerate(group)],
                pad_id=args.pad_id,
            )
        )
    return batches


def run_baseline(args, stream: list[dict], sizes: list[int] | None = None) -> dict[str, Any]:
    """The native model on padded batches: the largest of ``sizes`` (default ``args.baseline_sizes``) that does
    not run out of memory. Returns its result, or a row saying none fits."""
    cuda = args.device_obj.type == "cuda"
    base_ckpt = (1, True) if args.baseline_ckpt == "both" else (0, False)
    skipped: list[str] = []
    for size in sizes or args.baseline_sizes:
        batches = padded_batches(args, stream, size)
        if (
            not cuda
            and max(b["input_ids"].numel() for b in batches) * args.vocab * 12 > args.cpu_logits_gib * 2**30
        ):
            print(
                f"baseline: batch {size} would need > {args.cpu_logits_gib} GiB of logits on CPU, "
                "trying a smaller one",
                file=sys.stderr,
            )
            skipped.append(f"{size} (> {args.cpu_logits_gib:g} GiB logits on CPU)")
            continue
        res = run_mode_or_oom(
            args,
            name="native baseline",
            attn="sdpa",
            ckpt=base_ckpt,
            batches=batches,
            step_fn=baseline_step,
            n_logit_all=True,
        )
        if res is None:
            print(f"baseline: batch {size} ran out of memory, trying a smaller one", file=sys.stderr)
            skipped.append(f"{size} (OOM)")
            del batches
            gc.collect()
            continue
        widths = [b["input_ids"].shape[1] for b in batches]
        res["batch"] = f"{size} padded (median width {int(np.median(widths))})"
        res["batch_size"] = size
        res["loss_kind"] = "native, full-vocab fp32"
        res["skipped"] = skipped
        return res
    return {"name": "native baseline", "batch": "none fits: " + ", ".join(skipped), "skipped": skipped}


def main(argv=None) -> dict[str, Any]:
    args = configure(argv)
    packed_rows, stream, info = build_data(args, args.vocab, args.n_steps, max(args.baseline_sizes))

    results = []
    if not args.no_ours:
        batches = ours_batches(args, packed_rows)
        res = run_ours(args, batches, (args.ckpt_llm_every, args.ckpt_vision))
        results.append(res or {"name": "ours", "batch": "out of memory"})
        del batches

    if not args.no_baseline:
        results.append(run_baseline(args, stream))

    report = render(args, argv, info, results)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return {"results": results, "info": info, "report": report}


def render(args, argv, info, results) -> str:
    cuda = args.device_obj.type == "cuda"
    mem_head = "peak memory (max_memory_allocated)" if cuda else "peak tensor memory (params+optim+step)"
    headers = [
        "setup",
        "batch",
        "attention",
        "checkpointing",
        "loss",
        "tokens/step",
        "step s",
        "tokens/s",
        "MFU vs 989.4 TF/s",
        mem_head,
    ]
    if not cuda:
        headers[-1] = "peak tensor memory, whole step"
        headers[-1:-1] = ["peak tensor memory, fwd+bwd"]
        headers.append("process RSS high-water")
    rows = []
    for r in results:
        if "step_s" not in r:
            rows.append([r["name"], r["batch"]] + ["-"] * (len(headers) - 2))
            continue
        row = [
            r["name"],
            r["batch"],
            r["attn"],
            r["ckpt"],
            r["loss_kind"],
            f"{r['tokens_per_step']:,.0f}",
            f"{r['step_s']:.3f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{100 * r['mfu']:.2f}%" if r["mfu"] >= 1e-3 else f"{100 * r['mfu']:.2g}%",
            gib(r["peak_bytes"]) if "peak_bytes" in r else "-",
        ]
        if not cuda:
            row[-1:-1] = [gib(r["fwd_bwd_peak_bytes"]) if "fwd_bwd_peak_bytes" in r else "-"]
            row.append(gib(r["rss_bytes"]) if "rss_bytes" in r else "-")
        rows.append(row)
    share = ", ".join(f"{k} {v:.0%}" for k, v in info["share"].items())
    lines = [
        f"**B4 step benchmark** -- shape `{args.shape}`, {now()}",
        "",
        f"- command: `{command_line(argv, 'benchmarks/bench_step.py')}`",
        f"- machine: {machine_info(args.device_obj)}",
        f"- precision: {'bf16 autocast, fp32 master weights, fused AdamW' if cuda else 'fp32, AdamW (foreach)'}",
        f"- data: {info['pool']} synthetic samples ({share}), median {info['median_tokens']} tokens, "
        f"{info['label_fraction']:.1%} labelled; length scale {args.scale:.4g}; rows of <= {args.max_tokens} tokens "
        f"/ {args.max_patches} patches, mean fill {info['fill']:.1%}",
        f"- {args.warmup} warm-up steps, median of {args.steps} timed steps (forward + backward + clip + AdamW)",
        "",
        markdown_table(headers, rows, align="lllll" + "r" * (len(headers) - 5)),
    ]
    done = [r for r in results if "step_s" in r]
    if len(done) == 2:
        o, b = done
        lines += [
            "",
            f"ours / baseline: {o['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s"
            + (
                f", {o['peak_bytes'] / b['peak_bytes']:.2f}x peak memory (whole step)"
                if "peak_bytes" in o and "peak_bytes" in b
                else ""
            )
            + (
                f", {o['fwd_bwd_peak_bytes'] / b['fwd_bwd_peak_bytes']:.2f}x (fwd+bwd)"
                if "fwd_bwd_peak_bytes" in o and "fwd_bwd_peak_bytes" in b
                else ""
            ),
        ]
    for r in results:
        if r.get("skipped"):
            lines += ["", f"{r['name']}: larger batches tried first: {', '.join(r['skipped'])}"]
    if not cuda:
        lines += [
            "",
            "CPU run: MFU is against the H100 peak and only shows the formula runs; timings are not "
            "representative of a GPU.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
