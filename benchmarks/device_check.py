"""The device check: the first command a session lent a GPU runs. One script, one JSON + one markdown result.

    python benchmarks/device_check.py --out DIR              # CUDA: < 8 minutes on one H100 / H200
    python benchmarks/device_check.py --dry-run --out DIR    # CPU: the same code at the tiny shape, 1-2 minutes

Needs torch, transformers and accelerate only (no deepspeed, hydra, wandb, av, datasets, flash-attn, liger).
Four parts, each in its own try/except (a failure is recorded and the next part runs), the result files
rewritten after every part and every sweep setting:

(a) ``isolation``: one packed row of mixed samples (several images at merge 1, a pruned video at merge 2,
    text-only) through ``flash_varlen`` (the CUDA varlen kernel; ``flash_varlen_reference``, the plain-PyTorch
    kernel, in the dry run) and ``flash_attention_2`` when flash-attn is installed, in bf16 autocast with fp32
    master weights, against the oracle: each sample alone through ``sdpa`` (same autocast, and fp32). Two small
    models: the tiny preset, and one with the 2B head dims (vision 72, LLM 128 with 6:1 GQA). Recorded per case:
    loss relative difference, gradient cosine and relative error per tower, the kernel calls per tower, the
    dtypes the kernel received, and two negative controls (segments merged in the LLM, in the vision tower) that
    must move the loss by more than the tolerance, so the check can see a leak.
(b) ``b4``: B4 at the 2B shape (``bench_step``): the native model fed padded batches (``collate_padded``: right
    padding and ``attention_mask`` as the processor returns them; sdpa, full checkpointing, full-vocabulary loss),
    the largest batch that fits, vs ours (packed 16k-token rows, varlen attention, chunked loss) over a sweep of
    selective checkpointing settings; median of the warm steps: tokens/s, MFU (docs/reference.md §6), peak memory.
(c) ``b5``: B5 at 16k tokens (``bench_loss``): our chunked loss vs transformers' loss, time and peak memory.
(d) ``cost``: B11 (``bench_cost_model``): 24 packed rows of very different compositions (``small`` shape on
    CUDA, ``tiny`` in the dry run), predicted FLOPs (``data.cost_model``) vs measured forward+backward time per row,
    and their Spearman rank correlation. Not part of ``ok``.

A global time budget (``--budget-s``, default 450 s from the start of the process) skips what would not finish
in it (sweep settings first; each is estimated from the previous one), and the skips are recorded; a watchdog
writes the result and exits at ``--hard-limit-s`` (default 470 s) whatever is running.

JSON (``DIR/device_check.json``; ``DIR/device_check.md`` is its table form)::

    {"schema": 1, "mode": "cuda" | "cpu-dry-run", "command", "machine", "versions": {...}, "started_utc",
     "budget_s", "hard_limit_s", "elapsed_s", "budget_exceeded", "skipped": [str], "aborted": str | null,
     "ok": bool,
     "isolation": {"status": "ok" | "failed" | "error" | "skipped", "seconds", "tolerance": {...},
                   "cases": [{"shape", "backend", "samples", "tokens", "loss_rel_diff_bf16", "loss_rel_diff_fp32",
                              "grad_cosine": {group: c}, "grad_rel_err": {group: e}, "kernel_calls",
                              "kernel_calls_expected", "kernel_dtypes",
                              "leak": {"llm" | "vision": {"loss_rel_diff", "grad_cosine_min"}},
                              "checks": {name: bool}, "pass": bool}], "error"?},
     "b4": {"status": "ok" | "partial" | "failed" | "error" | "skipped", "seconds", "shape", "attn", "data": {...}, "baseline": {...},
            "ours": [{"setting", "llm_every", "vision", "status": "ok" | "oom" | "skipped", "tokens_per_s", "mfu",
                      "peak_bytes", "step_s", "tokens_per_step", "loss", "seconds"}],
            "best": {...}, "speedup_tokens_per_s", "peak_memory_ratio", "error"?},
     "b5": {"status", "seconds", "tokens", "vocab", "hidden", "results": [{"method", "label_frac", "labelled",
            "seconds", "peak_bytes", "loss", "grad_diff"}], "error"?},
     "cost": {"status", "seconds", "shape", "spearman", "fit": {...}, "rows": [{"row", "flops", "seconds", ...}]}}

Exit status 0 when every part ran and the isolation passed, 1 otherwise, 3 when the watchdog fired.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # the budget counts from here: imports included

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from contextlib import contextmanager, nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # common.py, bench_step.py, bench_loss.py
sys.path.append(os.path.dirname(_HERE))  # the repo root, when the package is not installed

import bench_loss  # noqa: E402
import bench_step  # noqa: E402
from common import (  # noqa: E402
    IGNORE_INDEX,
    add_pixels,
    command_line,
    gib,
    machine_info,
    markdown_table,
    media_token_ids,
    now,
    synthetic_samples,
)

from videollama3_train.contract import VISUAL_KEYS  # noqa: E402
from videollama3_train.data.collate import collate_packed, forward_kwargs  # noqa: E402
from videollama3_train.model import attention  # noqa: E402
from videollama3_train.model.presets import (  # noqa: E402
    PRESETS,
    ModelShape,
    TextShape,
    VisionShape,
    build_model_config,
)

SCHEMA = 1

# ---------------------------------------------------------------------------------------------------------------
# (a) isolation
# ---------------------------------------------------------------------------------------------------------------

ISOLATION_SHAPES: dict[str, ModelShape] = {
    "tiny": PRESETS["tiny"],
    # two layers per tower at the 2B head dims: vision 288/4 = 72 (2B: 1152/16), LLM 768/6 = 128 with 6 query heads
    # per KV head (Qwen2.5-1.5B: 12 / 2)
    "2b-head-dims": ModelShape(
        vision=VisionShape(
            hidden_size=288, intermediate_size=576, num_hidden_layers=2, num_attention_heads=4
        ),
        text=TextShape(
            hidden_size=768,
            intermediate_size=1024,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=1,
            vocab_size=640,
        ),
    ),
}

# bf16 keeps 8 bits of mantissa. The packed row and the samples alone go through the same bf16 roundings except
# inside attention (one kernel call per row vs one per sample) and the summation order. CPU dry run (reference
# kernel): loss within 2e-7 of the bf16 oracle and 2.3e-3 of the fp32 one, gradient cosines >= 0.9999; the CUDA
# kernel and sdpa's CUDA kernels round differently, hence the margin. Gradients are compared as directions per
# tower. Each negative control (segments merged in one tower) must break a tolerance -- the loss (LLM leak: 2-9%)
# or a tower's gradient cosine (vision leak) -- so the tolerances cannot hide a leak.
TOLERANCE = {
    "loss_rtol_bf16": 5e-3,  # |packed - alone| / |alone|, both under bf16 autocast
    "loss_rtol_fp32_oracle": 1e-2,  # |packed bf16 - alone fp32| / |alone fp32|
    "grad_cosine_min": 0.99,  # per tower (vision, projector, LLM) and for the whole model
}
HALF = (torch.float16, torch.bfloat16)


def _isolation_model(shape: ModelShape, device: torch.device):
    """The ``sdpa`` oracle model: random fp32 weights, sharp attention (init std 0.2) so that a leak between samples
    moves the loss visibly."""
    from transformers import VideoLlama3ForConditionalGeneration

    image_id, video_id = media_token_ids(shape.text.vocab_size)
    cfg = build_model_config(
        shape, image_token_id=image_id, video_token_id=video_id, attn_implementation="sdpa"
    )
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c.initializer_range = 0.2
    torch.manual_seed(0)
    with torch.device(device):
        model = VideoLlama3ForConditionalGeneration(cfg)
    return model.float().train()


def _isolation_samples(vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    """Text-only, a one-image and a multi-image sample (merge 1), a pruned video (merge 2): the mix of a stage-3
    packed row, at lengths a tiny model runs in milliseconds."""
    pool = synthetic_samples(64, vocab=vocab, max_tokens=400, scale=0.03, mix=(0.5, 0.3, 0.2), seed=seed)
    picked: list[dict[str, Any]] = []

    def take(pred) -> None:
        for s in pool:
            if pred(s) and not any(s is p for p in picked):
                picked.append(s)
                return

    take(lambda s: s["meta"]["modality"] == "image" and len(s["image_grid_thw"]) == 1)
    take(lambda s: s["meta"]["modality"] == "video" and not bool(s["video_compression_mask"].all()))
    take(lambda s: s["meta"]["modality"] == "text")
    take(lambda s: s["meta"]["modality"] == "image" and len(s["image_grid_thw"]) > 1)
    take(lambda s: s["meta"]["modality"] == "video")
    if {s["meta"]["modality"] for s in picked} != {"image", "video", "text"}:
        raise RuntimeError("the synthetic pool lacks a modality: change the seed")
    return [add_pixels(s, seed + i) for i, s in enumerate(picked)]


def _row_loss_sum(model, kwargs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
    logits = model(**kwargs, use_cache=False).logits
    return F.cross_entropy(
        logits[0, :-1].float(), labels[0, 1:].to(logits.device), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _alone_runs(samples, device) -> list[tuple[dict, torch.Tensor]]:
    runs = []
    for s in samples:
        kwargs = {k: v.to(device) for k, v in s.items() if k in VISUAL_KEYS}
        kwargs["input_ids"] = s["input_ids"][None].to(device)
        runs.append((kwargs, s["labels"][None]))
    return runs


def _packed_run(samples, device) -> tuple[dict, torch.Tensor]:
    kwargs = forward_kwargs(collate_packed(samples))
    labels = kwargs.pop("labels")
    return {k: v.to(device) for k, v in kwargs.items()}, labels


def _loss_and_grads(model, runs, autocast) -> tuple[float, dict[str, torch.Tensor]]:
    """Sum of token losses over the runs / their label tokens (the trainer's normalisation), and the gradients."""
    model.zero_grad(set_to_none=True)
    n_labels = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels in runs)
    total = 0.0
    for kwargs, labels in runs:
        with autocast:
            loss = _row_loss_sum(model, kwargs, labels) / n_labels
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return total, grads


def _group(name: str) -> str:
    for prefix, group in (
        ("model.vision_model.", "vision"),
        ("model.projector.", "projector"),
        ("model.language_model.", "llm"),
        ("lm_head.", "llm"),
    ):
        if name.startswith(prefix):
            return group
    return "other"


def _grad_compare(grads, ref) -> tuple[dict[str, float], dict[str, float]]:
    """Cosine and relative error ``|g - g_ref| / |g_ref|`` per tower and for the whole model."""
    names = sorted(ref)
    if sorted(grads) != names:
        raise RuntimeError(f"gradient sets differ: {sorted(set(grads) ^ set(names))[:5]}")
    groups: dict[str, list[str]] = {"all": names}
    for n in names:
        groups.setdefault(_group(n), []).append(n)
    cos, err = {}, {}
    for g, members in groups.items():
        a = torch.cat([grads[n].flatten() for n in members]).double()
        b = torch.cat([ref[n].flatten() for n in members]).double()
        cos[g] = float(F.cosine_similarity(a, b, dim=0))
        err[g] = float((a - b).norm() / b.norm().clamp(min=1e-30))
    return cos, err


@contextmanager
def _kernel_hook(backend: str, hook):
    """Route every call of ``backend``'s kernel through ``hook(call, q, k, v, cu, max_len, **kw)``."""
    if backend == attention.VARLEN:
        factory = attention._varlen_kernel

        def hooked_factory():
            call = factory()
            return lambda q, k, v, cu, ml, **kw: hook(call, q, k, v, cu, ml, **kw)

        attention._varlen_kernel = hooked_factory
        try:
            yield
        finally:
            attention._varlen_kernel = factory
    elif backend == attention.VARLEN_REFERENCE:
        kernel = attention.reference_varlen_kernel
        attention.reference_varlen_kernel = lambda q, k, v, cu, ml, **kw: hook(kernel, q, k, v, cu, ml, **kw)
        try:
            yield
        finally:
            attention.reference_varlen_kernel = kernel
    else:  # flash_attention_2: not our kernel, nothing to hook
        yield


def _switch(model, backend: str, device):
    """A copy of the oracle model running ``backend``."""
    if backend == "flash_attention_2":
        from transformers import VideoLlama3ForConditionalGeneration

        cfg = copy.deepcopy(model.config)
        cfg._attn_implementation = "flash_attention_2"
        with torch.device(device):
            other = VideoLlama3ForConditionalGeneration(cfg)
        other.load_state_dict(model.state_dict())
        attention.use_attention(other, "flash_attention_2")  # the text and vision sub-configs too
        return other.float().train()
    other = copy.deepcopy(model)
    attention.use_attention(other, backend)
    return other


def isolation_case(shape_name: str, backend: str, device: torch.device) -> dict[str, Any]:
    shape = ISOLATION_SHAPES[shape_name]
    samples = _isolation_samples(shape.text.vocab_size)
    oracle = _isolation_model(shape, device)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16)
    alone = _alone_runs(samples, device)
    ref_fp32, _ = _loss_and_grads(oracle, alone, nullcontext())
    ref_bf16, ref_grads = _loss_and_grads(oracle, alone, bf16)

    model = _switch(oracle, backend, device)
    packed = _packed_run(samples, device)
    calls: list[tuple[int, bool]] = []
    dtypes: set[tuple[str, str, str, str]] = set()

    def record(call, q, k, v, cu, ml, **kw):
        calls.append((int(cu.numel()) - 1, bool(kw["causal"])))
        tower = "llm" if kw["causal"] else "vision"
        dtypes.add((tower, str(q.dtype)[6:], str(k.dtype)[6:], str(v.dtype)[6:]))
        return call(q, k, v, cu, ml, **kw)

    with _kernel_hook(backend, record):
        loss, grads = _loss_and_grads(model, [packed], bf16)
    cos, err = _grad_compare(grads, ref_grads)

    # negative controls: one segment for the whole row in one tower. A leak must show, in the loss or in the
    # gradient directions, by more than the tolerances (the tiny tower's leak barely moves the loss but turns its
    # gradients)
    leak = {}
    if backend in attention.VARLEN_BACKENDS:
        for tower in ("llm", "vision"):

            def merged(call, q, k, v, cu, ml, _tower=tower, **kw):
                if (_tower == "llm") == bool(kw["causal"]):
                    cu = cu[[0, -1]]
                    ml = int(cu[-1])
                return call(q, k, v, cu, ml, **kw)

            with _kernel_hook(backend, merged):
                leaked, leaked_grads = _loss_and_grads(model, [packed], bf16)
            leak_cos, _ = _grad_compare(leaked_grads, ref_grads)
            leak[tower] = {
                "loss_rel_diff": abs(leaked - ref_bf16) / abs(ref_bf16),
                "grad_cosine_min": min(leak_cos.values()),
            }

    n_img = sum(len(s.get("image_grid_thw", ())) for s in samples)
    has_img = any("image_grid_thw" in s for s in samples)
    has_vid = any("video_grid_thw" in s for s in samples)
    lv, ll = shape.vision.num_hidden_layers, shape.text.num_hidden_layers
    frames = sum(int(s["video_grid_thw"][:, 0].sum()) for s in samples if "video_grid_thw" in s)
    expected = (
        [(n_img, False)] * lv * has_img + [(frames, False)] * lv * has_vid + [(len(samples), True)] * ll
    )
    loss_bf16 = abs(loss - ref_bf16) / abs(ref_bf16)
    loss_fp32 = abs(loss - ref_fp32) / abs(ref_fp32)
    checks = {
        "loss_vs_alone_bf16": loss_bf16 <= TOLERANCE["loss_rtol_bf16"],
        "loss_vs_alone_fp32": loss_fp32 <= TOLERANCE["loss_rtol_fp32_oracle"],
        "grad_cosine": all(c >= TOLERANCE["grad_cosine_min"] for c in cos.values()),
    }
    if backend in attention.VARLEN_BACKENDS:
        checks["kernel_calls"] = calls == expected
        # the CUDA kernel takes fp16 / bf16 only, q, k and v in one dtype: what reaches it under autocast must be so
        checks["kernel_dtypes_half_and_equal"] = all(
            len({q, k, v}) == 1 and q in ("bfloat16", "float16") for _, q, k, v in dtypes
        )
        checks["leak_controls_visible"] = all(
            x["loss_rel_diff"] > TOLERANCE["loss_rtol_bf16"]
            or x["grad_cosine_min"] < TOLERANCE["grad_cosine_min"]
            for x in leak.values()
        )
    del model, oracle
    return {
        "shape": shape_name,
        "backend": backend,
        "precision": "bf16 autocast, fp32 master weights",
        "samples": [
            s["meta"]["modality"] + ("s" if len(s.get("image_grid_thw", ())) > 1 else "") for s in samples
        ],
        "tokens": sum(int(s["input_ids"].numel()) for s in samples),
        "loss_packed": loss,
        "loss_alone_bf16": ref_bf16,
        "loss_alone_fp32": ref_fp32,
        "loss_rel_diff_bf16": loss_bf16,
        "loss_rel_diff_fp32": loss_fp32,
        "grad_cosine": cos,
        "grad_rel_err": err,
        "kernel_calls": len(calls),
        "kernel_calls_expected": len(expected) if backend in attention.VARLEN_BACKENDS else None,
        "kernel_dtypes": sorted("/".join(d) for d in dtypes),
        "leak": leak,
        "checks": checks,
        "pass": all(checks.values()),
    }


def run_isolation(ctx: Check, res: dict[str, Any]) -> None:
    res["tolerance"] = TOLERANCE
    device = ctx.device
    if ctx.dry_run:
        backends = [attention.select_attention("varlen_reference")]
    else:
        backends = [attention.select_attention("varlen")]
        if attention.flash_attn_available():
            backends.append("flash_attention_2")
        else:
            res["flash_attention_2"] = "not run: the flash-attn package is not installed"
    res["cases"] = []
    for backend in backends:
        for shape in ISOLATION_SHAPES:
            try:
                case = isolation_case(shape, backend, device)
            except Exception as e:  # one case failing leaves the others
                case = {"shape": shape, "backend": backend, "pass": False, "error": _err(e)}
            res["cases"].append(case)
            ctx.write()
    res["status"] = "ok" if all(c["pass"] for c in res["cases"]) else "failed"


# ---------------------------------------------------------------------------------------------------------------
# (b) B4
# ---------------------------------------------------------------------------------------------------------------

# (every n-th LLM layer checkpointed, vision tower checkpointed), in the order they are run: the docs/reference.md §5 best
# anchors first, then full checkpointing (the memory-safe default), then the rest; 0 = no checkpointing at all.
DEFAULT_SWEEP = "2:off,4:off,1:on,1:off,2:on,0:off"


def _sweep(spec: str) -> list[tuple[int, bool]]:
    out = []
    for item in spec.split(","):
        every, vision = item.split(":")
        out.append((int(every), {"on": True, "off": False}[vision]))
    return out


def _setting(llm_every: int, vision: bool) -> str:
    llm = "LLM none" if llm_every <= 0 else ("LLM all" if llm_every == 1 else f"LLM 1/{llm_every}")
    return f"{llm}, vision {'on' if vision else 'off'}"


def _mode_row(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("step_s", "tokens_per_s", "mfu", "tokens_per_step", "loss", "peak_bytes", "fwd_bwd_peak_bytes")
    return {k: r[k] for k in keys if k in r} | {"ckpt": r.get("ckpt"), "batch": r.get("batch")}


def run_b4(ctx: Check, res: dict[str, Any]) -> None:
    a = ctx.args
    if ctx.dry_run:
        argv = ["--shape", "tiny", "--device", "cpu", "--attn", "varlen_reference", "--max-tokens", "256",
                "--warmup", "1", "--steps", "2", "--baseline-batches", "2,1"]  # fmt: skip
    else:
        argv = ["--shape", "2b", "--device", "cuda", "--attn", "varlen", "--warmup", str(a.warmup),
                "--steps", str(a.steps), "--baseline-batches", a.baseline_batches]  # fmt: skip
    args = bench_step.configure(argv)
    res.update(shape=args.shape, attn=args.ours_attn, warmup=args.warmup, timed_steps=args.steps)
    res["command_equivalent"] = command_line(argv, "benchmarks/bench_step.py")
    packed_rows, stream, info = bench_step.build_data(
        args, args.vocab, args.n_steps, max(args.baseline_sizes)
    )
    res["data"] = {**info, "max_tokens": args.max_tokens, "max_patches": args.max_patches}
    batches = bench_step.ours_batches(args, packed_rows)
    sweep = _sweep(a.sweep)
    res["ours"] = []
    estimate = 0.0  # seconds of the last setting

    def ours(llm_every: int, vision: bool) -> None:
        nonlocal estimate
        name = _setting(llm_every, vision)
        row: dict[str, Any] = {"setting": name, "llm_every": llm_every, "vision": vision}
        res["ours"].append(row)
        if not ctx.has_time(estimate, f"b4 ours [{name}]"):
            row["status"] = "skipped"
            return
        t = time.perf_counter()
        ctx.now_running = f"b4 ours [{name}]"
        r = bench_step.run_ours(args, batches, (llm_every, vision))
        row["seconds"] = time.perf_counter() - t
        estimate = max(estimate, row["seconds"])
        row.update({"status": "oom"} if r is None else {"status": "ok", **_mode_row(r)})
        ctx.write()

    ours(*sweep[0])
    if ctx.has_time(estimate * 2, "b4 baseline"):
        t = time.perf_counter()
        ctx.now_running = "b4 baseline"
        base = bench_step.run_baseline(args, stream)
        res["baseline"] = {
            "seconds": time.perf_counter() - t,
            "batch_size": base.get("batch_size"),
            "tried": base.get("skipped", []),
            "loss_kind": "native, full-vocab fp32",
            "status": "ok" if "step_s" in base else "none fits",
            **_mode_row(base),
        }
        ctx.write()
    else:
        res["baseline"] = {"status": "skipped"}
    for setting in sweep[1:]:
        ours(*setting)

    done = [r for r in res["ours"] if r["status"] == "ok"]
    if done:
        best = max(done, key=lambda r: r["tokens_per_s"])
        res["best"] = best
        base = res["baseline"]
        if base.get("status") == "ok":
            res["speedup_tokens_per_s"] = best["tokens_per_s"] / base["tokens_per_s"]
            if "peak_bytes" in best and "peak_bytes" in base:
                res["peak_memory_ratio"] = best["peak_bytes"] / base["peak_bytes"]
    batches.clear()
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    if not done:
        res["status"] = "failed"  # no setting of ours ran (out of memory or skipped)
    elif res["baseline"].get("status") in ("ok", "none fits"):
        res["status"] = "ok"
    else:
        res["status"] = "partial"  # the baseline was skipped (budget)


# ---------------------------------------------------------------------------------------------------------------
# (c) B5
# ---------------------------------------------------------------------------------------------------------------


def run_b5(ctx: Check, res: dict[str, Any]) -> None:
    if ctx.dry_run:
        argv = [
            "--tokens",
            "256",
            "--vocab",
            "2048",
            "--hidden",
            "64",
            "--chunk-size",
            "64",
            "--device",
            "cpu",
        ]
    else:
        argv = ["--device", "cuda"]  # 16384 tokens, vocab 151936, hidden 1536
    if not ctx.has_time(30.0 if not ctx.dry_run else 2.0, "b5"):
        res["status"] = "skipped"
        return
    ctx.now_running = "b5"
    out = bench_loss.main(argv)
    args = bench_loss.parse_args(argv)
    res.update(tokens=args.tokens, vocab=args.vocab, hidden=args.hidden, chunk_size=args.chunk_size)
    res["command_equivalent"] = command_line(argv, "benchmarks/bench_loss.py")
    res["full_fp32_logits_bytes"] = args.tokens * args.vocab * 4
    keys = ("method", "label_frac", "labelled", "seconds", "peak_bytes", "loss", "grad_diff")
    res["results"] = [{k: r[k] for k in keys} for r in out["results"]]
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    res["status"] = "ok"


def run_cost(ctx: Check, res: dict[str, Any]) -> None:
    """B11: predicted FLOPs vs measured step time of 24 packed rows (``bench_cost_model``)."""
    import bench_cost_model

    dev = ["--device", "cpu", "--shape", "tiny", "--warmup", "0", "--repeats", "1"] if ctx.dry_run else []
    argv = dev or ["--device", "cuda", "--shape", "small", "--warmup", "2", "--repeats", "5"]
    if not ctx.has_time(60.0 if not ctx.dry_run else 10.0, "cost"):
        res["status"] = "skipped"
        return
    threads = torch.get_num_threads()  # the bench fixes them; the parts after it keep theirs
    try:
        res.update(bench_cost_model.run(bench_cost_model.parse_args(argv)), status="ok")
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def _err(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))[-4000:]


class Check:
    """The result being built, its time budget, and writing it (after every part and every sweep setting)."""

    def __init__(self, args: argparse.Namespace, argv):
        self.args = args
        self.dry_run = args.dry_run
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.now_running = "start"
        self._lock = threading.Lock()
        import accelerate
        import transformers

        self.result: dict[str, Any] = {
            "schema": SCHEMA,
            "mode": "cpu-dry-run" if self.dry_run else "cuda",
            "command": command_line(argv, "benchmarks/device_check.py"),
            "machine": machine_info(self.device),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "transformers": transformers.__version__,
                "accelerate": accelerate.__version__,
            },
            "started_utc": now(),
            "budget_s": args.budget_s,
            "hard_limit_s": args.hard_limit_s,
            "elapsed_s": 0.0,
            "budget_exceeded": False,
            "skipped": [],
            "aborted": None,
            "ok": False,
            "isolation": {"status": "pending"},
            "b4": {"status": "pending"},
            "b5": {"status": "pending"},
            "cost": {"status": "pending"},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - _T0

    def has_time(self, estimate: float, what: str) -> bool:
        """Whether ``what`` (about ``estimate`` seconds) still fits in the budget; records the skip if not."""
        if self.elapsed() + estimate <= self.args.budget_s:
            return True
        self.result["budget_exceeded"] = True
        self.result["skipped"].append(
            f"{what}: {self.elapsed():.0f} s elapsed + ~{estimate:.0f} s > budget {self.args.budget_s:.0f} s"
        )
        return False

    def part(self, name: str, fn) -> None:
        res = self.result[name] = {"status": "running"}
        self.now_running = name
        self.write()
        print(f"device_check: {name} starts at {self.elapsed():.0f} s", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            fn(self, res)
        except Exception as e:  # recorded; the next part still runs
            res["status"] = "error"
            res["error"] = _err(e)
            print(f"device_check: {name} failed:\n{res['error']}", file=sys.stderr)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        res["seconds"] = time.perf_counter() - t
        self.write()
        print(f"device_check: {name} {res['status']} in {res['seconds']:.0f} s", file=sys.stderr, flush=True)

    def write(self) -> None:
        with self._lock:
            self.result["elapsed_s"] = self.elapsed()
            r = self.result
            r["ok"] = (
                r["isolation"].get("status") == "ok"
                and r["b4"].get("status") == "ok"
                and r["b5"].get("status") == "ok"
                and not r["aborted"]
            )
            text = json.dumps(_finite(r), indent=2)
            md = render(r)
            for name, body in (("device_check.json", text), ("device_check.md", md)):
                tmp = self.out / f".{name}.tmp"
                tmp.write_text(body + "\n")
                os.replace(tmp, self.out / name)

    def watchdog(self) -> threading.Timer:
        def fire() -> None:
            self.result["aborted"] = (
                f"hard limit {self.args.hard_limit_s:.0f} s reached while running {self.now_running}"
            )
            try:
                self.write()
            finally:
                print(f"device_check: {self.result['aborted']}", file=sys.stderr, flush=True)
                os._exit(3)

        timer = threading.Timer(max(0.0, self.args.hard_limit_s - self.elapsed()), fire)
        timer.daemon = True
        timer.start()
        return timer


def _finite(x):
    """JSON has no NaN / Infinity: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------


def _f(x, fmt: str = "{:.3g}") -> str:
    return "-" if x is None or isinstance(x, str) or x != x else fmt.format(x)


def render(r: dict[str, Any]) -> str:
    title = "Device check" + (
        " -- CPU DRY RUN (tiny shapes; not performance figures)" if r["mode"] != "cuda" else ""
    )
    lines = [
        f"# {title}",
        "",
        f"- command: `{r['command']}`",
        f"- machine: {r['machine']}",
        f"- started {r['started_utc']}; elapsed {r['elapsed_s']:.0f} s of a {r['budget_s']:.0f} s budget"
        + (" (exceeded: see skipped)" if r["budget_exceeded"] else ""),
        f"- overall: **{'ok' if r['ok'] else 'NOT ok'}**"
        + (f"; ABORTED: {r['aborted']}" if r["aborted"] else ""),
    ]
    if r["skipped"]:
        lines += ["- skipped: " + "; ".join(r["skipped"])]

    iso = r["isolation"]
    lines += ["", f"## (a) isolation: packed == unpacked ({iso.get('status')})", ""]
    if "tolerance" in iso:
        t = iso["tolerance"]
        lines += [
            f"bf16 autocast, fp32 master weights. Pass: loss within {t['loss_rtol_bf16']:g} (relative) of the "
            f"samples run alone through sdpa in bf16 and within {t['loss_rtol_fp32_oracle']:g} of them in fp32; "
            f"gradient cosine >= {t['grad_cosine_min']} per tower; the kernel called once per layer with one segment "
            "per image / frame / sample; q, k, v reaching the kernel in one half dtype (the CUDA kernel takes "
            "nothing else); each negative control (segments merged in one tower) breaking a tolerance (the loss, "
            "or a tower's gradient cosine).",
            "",
        ]
    if iso.get("cases"):
        rows = []
        for c in iso["cases"]:
            if "error" in c:
                rows.append([c["shape"], c["backend"], "ERROR"] + ["-"] * 7)
                continue
            cos = c["grad_cosine"]
            rows.append(
                [
                    c["shape"],
                    c["backend"],
                    "pass" if c["pass"] else "FAIL: " + ", ".join(k for k, v in c["checks"].items() if not v),
                    _f(c["loss_rel_diff_bf16"], "{:.2e}"),
                    _f(c["loss_rel_diff_fp32"], "{:.2e}"),
                    " / ".join(f"{cos.get(g, float('nan')):.5f}" for g in ("vision", "projector", "llm")),
                    f"{c['kernel_calls']} / {c['kernel_calls_expected']}",
                    ", ".join(c["kernel_dtypes"]) or "-",
                    " / ".join(
                        f"{c['leak'][t]['loss_rel_diff']:.2e}, cos {c['leak'][t]['grad_cosine_min']:.3f}"
                        if t in c["leak"]
                        else "-"
                        for t in ("llm", "vision")
                    ),
                    ", ".join(c["samples"]),
                ]
            )
        lines.append(
            markdown_table(
                [
                    "shape",
                    "backend",
                    "result",
                    "loss vs alone bf16",
                    "vs alone fp32",
                    "grad cosine vision / proj / LLM",
                    "kernel calls / expected",
                    "kernel q/k/v dtypes",
                    "leak control LLM / vision",
                    "samples",
                ],  # fmt: skip
                rows,
                align="lllrrrrlrl",
            )
        )
    for c in iso.get("cases", []):
        if "error" in c:
            lines += ["", f"{c['shape']} / {c['backend']} error:", "", "```", c["error"], "```"]
    if iso.get("flash_attention_2"):
        lines += ["", f"flash_attention_2: {iso['flash_attention_2']}"]
    if "error" in iso:
        lines += ["", "```", iso["error"], "```"]

    b4 = r["b4"]
    lines += ["", f"## (b) B4 training step, shape `{b4.get('shape', '?')}` ({b4.get('status')})", ""]
    if "data" in b4:
        d = b4["data"]
        lines += [
            f"Equivalent to `{b4['command_equivalent']}`. {d['pool']} synthetic samples, median {d['median_tokens']} "
            f"tokens; ours: packed rows of <= {d['max_tokens']} tokens (mean fill {d['fill']:.1%}), {b4['attn']}, "
            f"chunked loss; baseline: native model, padded batches, sdpa, full checkpointing, full-vocab loss. "
            f"{b4['warmup']} warm-up steps, median of {b4['timed_steps']} timed steps. MFU against 989.4 TF/s "
            "(docs/reference.md §6 FLOPs).",
            "",
        ]
    rows = []
    base = b4.get("baseline")
    if base:
        rows.append(_b4_row("native baseline", base.get("batch") or base.get("status"), base))
    for o in b4.get("ours", []):
        rows.append(_b4_row("ours", o["setting"], o))
    if rows:
        lines.append(
            markdown_table(
                ["setup", "batch / checkpointing", "status", "step s", "tokens/s", "MFU", "peak memory"],
                rows,
                align="lllrrrr",
            )
        )
    if "speedup_tokens_per_s" in b4:
        lines += [
            "",
            f"best ours ({b4['best']['setting']}) / baseline: {b4['speedup_tokens_per_s']:.2f}x tokens/s"
            + (f", {b4['peak_memory_ratio']:.2f}x peak memory" if "peak_memory_ratio" in b4 else ""),
        ]
    if "error" in b4:
        lines += ["", "```", b4["error"], "```"]

    b5 = r["b5"]
    lines += ["", f"## (c) B5 loss at {b5.get('tokens', '?')} tokens ({b5.get('status')})", ""]
    if b5.get("results"):
        lines += [f"Equivalent to `{b5['command_equivalent']}`; one full fp32 logits tensor = "
                  f"{gib(b5['full_fp32_logits_bytes'])}.", ""]  # fmt: skip
        lines.append(
            markdown_table(
                ["method", "labelled", "seconds", "peak memory", "loss", "max grad diff vs transformers"],
                [
                    [
                        x["method"],
                        f"{x['label_frac']:.0%} ({x['labelled']:,})",
                        f"{x['seconds']:.3f}",
                        gib(x["peak_bytes"]),
                        f"{x['loss']:.5f}",
                        "-" if x["method"] == "transformers" else _f(x["grad_diff"], "{:.2e}"),
                    ]
                    for x in b5["results"]
                ],
                align="llrrrr",
            )
        )
    if "error" in b5:
        lines += ["", "```", b5["error"], "```"]
    cost = r.get("cost", {})
    lines += ["", f"## (d) B11 predicted FLOPs vs measured step time ({cost.get('status')})", ""]
    if cost.get("rows"):
        import bench_cost_model

        lines += [bench_cost_model.render(cost)]
    return "\n".join(lines)


def _b4_row(setup: str, what: str, r: dict[str, Any]) -> list[str]:
    if r.get("status") != "ok":
        return [setup, str(what), str(r.get("status")), "-", "-", "-", "-"]
    return [
        setup,
        str(what),
        "ok",
        f"{r['step_s']:.3f}",
        f"{r['tokens_per_s']:,.0f}",
        f"{100 * r['mfu']:.2f}%" if r["mfu"] >= 1e-3 else f"{100 * r['mfu']:.2g}%",
        gib(r["peak_bytes"]) if "peak_bytes" in r else "-",
    ]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory of device_check.json and device_check.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the reference varlen kernel")
    ap.add_argument(
        "--budget-s", type=float, default=450.0, help="skip what would end past this (from start)"
    )
    ap.add_argument(
        "--hard-limit-s", type=float, default=470.0, help="write the result and exit at this time"
    )
    ap.add_argument("--parts", default="isolation,b5,cost,b4", help="which parts, in this order")
    ap.add_argument("--sweep", default=DEFAULT_SWEEP, help="B4 ours: LLM_EVERY:on|off (vision), in run order")
    ap.add_argument("--warmup", type=int, default=4, help="B4 warm-up steps per setting (CUDA)")
    ap.add_argument("--steps", type=int, default=8, help="B4 timed steps per setting (CUDA)")
    ap.add_argument(
        "--baseline-batches", default="4,3,2,1", help="B4 baseline padded batch sizes, largest first"
    )
    return ap.parse_args(argv)


PARTS = {"isolation": run_isolation, "b4": run_b4, "b5": run_b5, "cost": run_cost}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible: run with --dry-run for the CPU version")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; choose from {sorted(PARTS)}")
    ctx = Check(args, argv)
    for name in PARTS:
        if name not in parts:
            ctx.result[name] = {"status": "skipped"}
            ctx.result["skipped"].append(f"{name}: not in --parts")
    timer = ctx.watchdog()
    for name in parts:
        ctx.part(name, PARTS[name])
    timer.cancel()
    ctx.now_running = "done"
    ctx.write()
    print(render(ctx.result))
    print(f"\nwritten: {ctx.out / 'device_check.json'}, {ctx.out / 'device_check.md'}")
    return 0 if ctx.result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
