"""B5: memory and time of the LM loss at 16k tokens -- ours (chunked cross-entropy over labelled positions only,
``trainer.loss``) vs transformers' causal-LM loss (full ``(L, V)`` logits upcast to fp32, ``ForCausalLMLoss``,
which is ``model.loss_function`` of ``VideoLlama3ForConditionalGeneration``).

The loss part only: from the last hidden states ``(L, d)`` (fp32, as the final RMSNorm returns them under
autocast) and the fp32 master ``lm_head.weight`` ``(V, d)`` to ``loss.backward()`` (gradients of both included).
CUDA: bf16 autocast (the head matmul in bf16, like training); peak = ``max_memory_allocated`` minus what was
allocated before (inputs, weight). CPU: fp32, peak of the tensors allocated during the run, followed by a
``TorchDispatchMode`` (``common.LiveTensorMemory``); tracemalloc does not see torch's allocator.
Reported per method: median seconds of ``--repeats`` runs after ``--warmup``, peak memory, loss value, and the
largest gradient difference against transformers' loss on the same inputs.

    python benchmarks/bench_loss.py                                   # H100: 16k tokens, V 151936, d 1536
    nice -n 10 python benchmarks/bench_loss.py --tokens 2048 --chunk-size 512   # CPU (16k would need ~30 GiB)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # common.py
sys.path.append(os.path.dirname(_HERE))  # the repo root, when the package is not installed

from common import (  # noqa: E402
    IGNORE_INDEX,
    LiveTensorMemory,
    command_line,
    gib,
    machine_info,
    markdown_table,
    median,
    now,
    resolve_device,
    sync,
)
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

from videollama3_train.trainer.loss import chunked_cross_entropy, shift_and_select  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="positions in the row (L)")
    ap.add_argument("--hidden", type=int, default=1536, help="d (Qwen2.5-1.5B: 1536)")
    ap.add_argument("--vocab", type=int, default=151936, help="V (Qwen2: 151936)")
    ap.add_argument(
        "--label-fracs",
        default="0.25,1.0",
        help="fractions of positions that carry a label; ours runs once per fraction (transformers' loss "
        "costs the same whatever the fraction, it runs at the first one)",
    )
    ap.add_argument(
        "--chunk-size", type=int, default=4096, help="ours: rows of (chunk, V) fp32 logits at once"
    )
    ap.add_argument("--no-liger", action="store_true", help="ours: never use liger-kernel even if installed")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    ap.add_argument(
        "--warmup", type=int, default=None, help="untimed runs per method (default 2 CUDA, 0 CPU)"
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 5 CUDA, 1 CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the markdown report to this file")
    return ap.parse_args(argv)


def make_inputs(args, device: torch.device, frac: float):
    """fp32 ``hidden (L, d)``, fp32 ``weight (V, d)`` (leaves needing grad) and ``labels (L,)`` with ``frac``
    of the positions labelled (in answer-like runs of 1..64 tokens)."""
    g = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).to(device).requires_grad_(True)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(device).requires_grad_(True)
    labels = torch.full((args.tokens,), IGNORE_INDEX, dtype=torch.long)
    want = max(1, round(frac * args.tokens))
    if want >= args.tokens - 1:
        labels[1:] = torch.randint(0, args.vocab, (args.tokens - 1,), generator=g)
    else:
        while int((labels != IGNORE_INDEX).sum()) < want:
            start = int(torch.randint(1, args.tokens, (1,), generator=g))
            span = int(torch.randint(1, 65, (1,), generator=g))
            labels[start : start + span] = torch.randint(
                0, args.vocab, (min(span, args.tokens - start),), generator=g
            )
    return hidden, weight, labels.to(device)


def ours(hidden, weight, labels, args) -> torch.Tensor:
    hidden_sel, targets = shift_and_select(hidden[None], labels[None])
    loss_sum, n = chunked_cross_entropy(
        hidden_sel, weight, targets, chunk_size=args.chunk_size, use_liger=not args.no_liger
    )
    loss = loss_sum / max(n, 1)
    loss.backward()
    return loss.detach()


def transformers_loss(hidden, weight, labels, args) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight)  # what lm_head does (bf16 under autocast)
    loss = ForCausalLMLoss(logits[None], labels[None], vocab_size=args.vocab)
    loss.backward()
    return loss.detach()


def measure(fn, hidden, weight, labels, args) -> dict[str, Any]:
    device = hidden.device
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    times, peaks, loss = [], [], None
    for i in range(args.warmup + args.repeats):
        hidden.grad = weight.grad = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        tracker = nullcontext() if cuda else LiveTensorMemory()
        sync(device)
        start = time.perf_counter()
        with tracker, autocast:
            loss = fn(hidden, weight, labels, args)
        sync(device)
        seconds = time.perf_counter() - start
        if i >= args.warmup:
            times.append(seconds)
            peaks.append(torch.cuda.max_memory_allocated(device) - base if cuda else tracker.peak)
    return {
        "seconds": median(times),
        "peak_bytes": max(peaks),
        "loss": float(loss),
        "grads": (hidden.grad.detach().clone(), weight.grad.detach().clone()),
    }


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 0)
    args.repeats = args.repeats if args.repeats is not None else (5 if cuda else 1)
    fracs = [float(f) for f in args.label_fracs.split(",")]
    liger = False
    if cuda and not args.no_liger:
        try:
            import liger_kernel  # noqa: F401

            liger = True
        except ImportError:
            pass

    rows, results = [], []
    reference = None
    for k, frac in enumerate(fracs):
        hidden, weight, labels = make_inputs(args, device, frac)
        n_labels = int((labels[1:] != IGNORE_INDEX).sum())
        methods = [("ours", ours)] + ([("transformers", transformers_loss)] if k == 0 else [])
        # transformers first: its gradients are the reference the others are compared with
        for name, fn in reversed(methods):
            res = measure(fn, hidden, weight, labels, args)
            grads = res.pop("grads")
            if name == "transformers":
                reference = grads
                diff = 0.0
            elif reference is not None and k == 0:
                diff = max(float((a - b).abs().max()) for a, b in zip(grads, reference))
            else:
                diff = float("nan")
            del grads
            res.update(method=name, label_frac=frac, labelled=n_labels, grad_diff=diff)
            results.append(res)
        del hidden, weight, labels
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    full_logits = args.tokens * args.vocab * 4
    for r in results:
        if r["method"] == "ours":
            what = "chunked CE, labelled only" + (" (liger)" if liger else f", chunk {args.chunk_size}")
        else:
            what = "ForCausalLMLoss, full fp32 logits"
        rows.append(
            [
                r["method"],
                what,
                f"{r['label_frac']:.0%} ({r['labelled']:,})",
                f"{r['seconds']:.3f}",
                gib(r["peak_bytes"]),
                f"{r['peak_bytes'] / full_logits:.2f}",
                f"{r['loss']:.5f}",
                "-"
                if r["method"] == "transformers" or r["grad_diff"] != r["grad_diff"]
                else f"{r['grad_diff']:.2e}",
            ]
        )
    precision = "bf16 autocast, fp32 hidden and weight" if cuda else "fp32 (no autocast on CPU)"
    lines = [
        f"**B5 loss benchmark** -- L {args.tokens}, d {args.hidden}, V {args.vocab}, {now()}",
        "",
        f"- command: `{command_line(argv, 'benchmarks/bench_loss.py')}`",
        f"- machine: {machine_info(device)}",
        f"- precision: {precision}; forward + backward of the loss part, gradients of hidden and weight included",
        f"- peak: {'max_memory_allocated - allocated before' if cuda else 'live tensors allocated during the run (TorchDispatchMode)'}; "
        f"one full fp32 logits tensor = {gib(full_logits)}; median of {args.repeats} run(s) after {args.warmup} warm-up",
        "",
        markdown_table(
            [
                "method",
                "loss",
                "labelled",
                "seconds",
                "peak memory",
                "x full fp32 logits",
                "loss value",
                "max grad diff vs transformers",
            ],
            rows,
            align="lllrrrrr",
        ),
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return {"results": results, "report": report}


if __name__ == "__main__":
    main()
