"""What the commands run: one stage, the stages chained, the data doctor, a checkpoint export.

Each function takes a validated config (``config.py``) and is the one call of its command:

    train    -> run_stage(cfg)                 pipeline -> run_pipeline(cfg, overrides)
    doctor   -> run_doctor(cfg, overrides)     export   -> export_checkpoint(cfg)
    (prepare -> data.prepare.prepare_data(cfg.data, cfg.encode, ...): it needs no model)

The pipeline and the doctor also take the command line's overrides: they compose every stage's own config from
them (``config.compose_stage``), exactly as ``train stage=<S> <overrides>`` would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import DoctorConfig, ExportConfig, PipelineConfig, RunConfig, compose_stage

log = logging.getLogger("videollama3_train")


# ----------------------------------------------------------------------------------------------------------------
# build_* factories: config -> objects
# ----------------------------------------------------------------------------------------------------------------


def build_tokenizer_for(cfg: RunConfig):
    """The checkpoint's own tokenizer when starting from a directory that has one, else ``model.tokenizer``."""
    from .model.tokenizer import build_tokenizer

    init = cfg.model.init_from
    if init and (Path(init) / "tokenizer_config.json").is_file():
        return build_tokenizer(init)
    return build_tokenizer(cfg.model.tokenizer)


def build_stage_processor(tokenizer, enc):
    """transformers' processor with this stage's merge sizes and budgets (it is saved with every export, so
    inference on the export sees images the way this stage trained on them)."""
    from .model.tokenizer import build_processor

    img_factor = (enc.patch_size * enc.image_merge_size) ** 2
    vid_factor = (enc.patch_size * enc.video_merge_size) ** 2
    return build_processor(
        tokenizer,
        image_merge_size=enc.image_merge_size,
        video_merge_size=enc.video_merge_size,
        image_min_pixels=enc.min_tokens_per_item * img_factor,
        image_max_pixels=min(enc.max_visual_tokens, enc.max_tokens_per_item) * img_factor,
        video_min_pixels=enc.min_tokens_per_item * vid_factor,
        video_max_pixels=enc.max_visual_tokens * vid_factor,
        use_token_compression=enc.use_token_compression,
        fps=enc.fps,
        max_frames=enc.max_frames,
        min_frames=enc.min_frames,
    )


def set_cpu_threads(world_size: int, num_workers: int, *, on_cpu: bool) -> None:
    """On CPU, give each rank its share of the cores, minus its decoding workers.

    OpenMP threads that outnumber the free cores spin against each other: a small matmul measured 15x slower
    with 2 threads than with 1 when the other core was busy. An explicit ``OMP_NUM_THREADS`` wins.
    """
    import torch

    if not on_cpu or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(world_size, 1) - num_workers))


def effective_settings(cfg: RunConfig, world_size: int, plan_stats: dict[str, float]) -> dict[str, Any]:
    """The learning rates and budgets a stage actually trains with (``effective.json`` in the run directory).

    The configured values are in ``resolved_config.json``; these are what they become: each group's peak
    learning rate after ``trainer.lr_scale`` and ``trainer.lr_max`` (None = frozen), the micro-batches, tokens and
    patches of one optimizer step over all ranks, and the first epoch's packing (samples per optimizer step).
    """
    t, d = cfg.trainer, cfg.data
    micro = world_size * t.grad_accum
    steps = int(plan_stats.get("micro_batches_per_rank", 0)) // t.grad_accum
    packed = int(plan_stats.get("samples_packed", 0))
    return {
        "lrs": t.lrs,
        "lr_scale": t.lr_scale,
        "lr_max": t.lr_max,
        "world_size": world_size,
        "grad_accum": t.grad_accum,
        "micro_batches_per_step": micro,
        "max_tokens_per_micro_batch": d.max_tokens,
        "max_patches_per_micro_batch": d.max_patches,
        "max_tokens_per_step": micro * d.max_tokens,
        "max_patches_per_step": micro * d.max_patches,
        "max_visual_tokens_per_sample": cfg.encode.max_visual_tokens,
        "max_length_per_sample": cfg.encode.max_length,
        "optimizer_steps_per_epoch": steps,
        "samples_per_epoch": packed,
        "samples_per_step_mean": packed / steps if steps else None,
        "epochs": t.epochs,
        "max_steps": t.max_steps,
    }


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, default=str))


# ----------------------------------------------------------------------------------------------------------------
# One stage
# ----------------------------------------------------------------------------------------------------------------


def run_stage(cfg: RunConfig) -> dict[str, Any]:
    """Train one stage as ``cfg`` says; returns the final metrics plus held-out results.

    Builds the tokenizer, processor, model (LoRA-wrapped when ``lora.enabled``) and this rank's loader, hands them
    to :func:`~videollama3_train.trainer.fit.fit`, and at the end exports a transformers-native directory to
    ``<output_dir>/export``. Runs the same under ``torchrun`` / ``deepspeed`` / ``accelerate launch``.
    """
    from .data.annotations import record_at
    from .data.build import build_train_data, load_heldout
    from .evaluate import evaluate_heldout, majority_answers
    from .model.core import build_model
    from .model.export import export_hf
    from .model.lora import apply_lora
    from .trainer import build_accelerator, fit
    from .trainer.backend import whole_model
    from .trainer.metrics import MetricsWriter

    cfg.data.check_paths()  # a missing file fails now, before any model is built
    out_dir = Path(cfg.output_dir)
    accelerator = build_accelerator(cfg.trainer)
    is_main = accelerator.is_main_process
    set_cpu_threads(accelerator.num_processes, cfg.data.num_workers, on_cpu=accelerator.device.type == "cpu")
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(out_dir / "resolved_config.json", dataclasses.asdict(cfg))

    tokenizer = build_tokenizer_for(cfg)
    processor = build_stage_processor(tokenizer, cfg.encode)
    model = build_model(cfg.model, tokenizer)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    data = build_train_data(
        cfg.data,
        cfg.encode,
        processor,
        grad_accum=cfg.trainer.grad_accum,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        is_main=is_main,
    )
    heldout, heldout_bad = load_heldout(cfg.data, cfg.encode, processor) if is_main else ([], 0)
    results: dict[str, Any] = {"stage": cfg.stage, "plan": data.plan_stats, "bad_records": data.failures}
    effective = effective_settings(cfg, accelerator.num_processes, data.plan_stats)
    if is_main:
        _write_json(out_dir / "effective.json", effective)

    writer = MetricsWriter(
        out_dir,
        project=cfg.logger.project,
        run_name=cfg.logger.run_name or f"{cfg.stage}-{out_dir.name}",
        wandb_mode=cfg.logger.wandb,
        config={**dataclasses.asdict(cfg), "effective": effective},
        enabled=is_main,
    )

    # The level held-out accuracy must beat: each task's most frequent training answer (one pass over the
    # training records, on rank 0, only when there is a held-out set).
    baseline_answers = None
    if heldout:
        baseline_answers = majority_answers(record_at(ds, i) for ds in data.records for i in range(len(ds)))

    def evaluate(tag: str, m=model) -> dict[str, Any] | None:
        if not heldout:
            return None
        m.to(accelerator.device)
        res = evaluate_heldout(
            m,
            heldout,
            tokenizer=tokenizer,
            device=accelerator.device,
            max_new_tokens=cfg.eval.max_new_tokens,
            num_generations=cfg.eval.log_generations,
            baseline_answers=baseline_answers,
            bad_records=heldout_bad,
        )
        print(
            f"[{cfg.stage}] held-out {tag}: accuracy {res['accuracy']:.3f} (baseline {res['baseline'] or 0:.3f}: "
            f"each task's most frequent training answer) on {res['n']} records ({res['bad_records']} unreadable), "
            f"loss {res['loss']:.3f}",
            flush=True,
        )
        for task, acc in sorted(res["accuracy_per_task"].items()):
            base = res["baseline_per_task"].get(task)
            print(
                f"    {task:<16} accuracy {acc:.3f}  baseline {0 if base is None else base:.3f}  "
                f"n={res['n_per_task'][task]}",
                flush=True,
            )
        if res["unfinished"]:
            log.warning(
                "%d held-out generations did not end their turn within eval.max_new_tokens", res["unfinished"]
            )
        for g in res["generations"]:
            print(
                f"    [{g['task']}] generated {g['generated']!r}  reference {g['reference']!r}  "
                f"{'correct' if g['correct'] else 'wrong'}",
                flush=True,
            )
        return res

    resuming = out_dir.exists() and any((out_dir / "checkpoints").glob("step-*"))
    if is_main and cfg.eval.before and heldout and not resuming:
        res = evaluate("before")
        results["heldout_before"] = res
        writer.summary({**_heldout_summary(res, "before"), "baseline_accuracy": res["baseline"]})

    # ZeRO-3 and FSDP2 keep each parameter partitioned over the ranks: generation needs them whole, so no
    # evaluation inside the loop (rank 0 alone would wait for the others' shards).
    sharded = cfg.trainer.backend in ("zero3", "fsdp2") and accelerator.num_processes > 1
    eval_every = cfg.eval.every
    if eval_every > 0 and sharded:
        if is_main:
            log.warning(
                "eval.every is ignored under trainer.backend=%s (parameters are sharded); held-out runs at the end",
                cfg.trainer.backend,
            )
        eval_every = 0

    def eval_fn(m, step):  # noqa: ARG001 - fit passes the (possibly wrapped) model
        if not is_main or not heldout:
            return {}
        r = evaluate(f"step {step}")
        return {  # logged as eval/<name>
            "heldout_loss": r["loss"],
            "heldout_accuracy": r["accuracy"],
            "heldout_baseline": r["baseline"],
            **{f"heldout_accuracy/{k}": v for k, v in r["accuracy_per_modality"].items()},
        }

    try:
        final = fit(
            model,
            data.loader,
            cfg.trainer,
            out_dir=out_dir,
            accelerator=accelerator,
            processor=processor,
            eval_fn=eval_fn if eval_every > 0 else None,
            eval_every=eval_every,
            writer=writer,
        )
        results["final"] = final
        if final.get("interrupted"):
            return results
        accelerator.wait_for_everyone()
        # every rank enters: under ZeRO-3 / FSDP2 the export needs the sharded weights gathered
        with whole_model(model, accelerator) as whole:
            if is_main:
                results["export"] = str(export_hf(whole, processor, out_dir / "export"))
                res = evaluate("after", whole)
                if res is not None:
                    results["heldout_after"] = res
                    writer.summary(_heldout_summary(res, "after"))
                _write_json(out_dir / "results.json", results)
            accelerator.wait_for_everyone()
    finally:
        writer.finish()  # the process group stays: the next stage of a pipeline reuses it
    return results


def _heldout_summary(res: dict[str, Any], tag: str) -> dict[str, float]:
    """What W&B's run summary keeps of one held-out evaluation: accuracy, loss, per modality and per task."""
    out = {f"accuracy_{tag}": res["accuracy"], f"heldout_loss_{tag}": res["loss"]}
    out.update({f"accuracy_{tag}/modality/{k}": v for k, v in res["accuracy_per_modality"].items()})
    out.update({f"accuracy_{tag}/task/{k}": v for k, v in res["accuracy_per_task"].items()})
    return out


# ----------------------------------------------------------------------------------------------------------------
# The stages chained
# ----------------------------------------------------------------------------------------------------------------


def stage_dir(root: str | Path, i: int, stage: str) -> Path:
    """Run directory of the ``i``-th (0-based) stage of a pipeline: ``<root>/<i+1>_<stage>``."""
    return Path(root) / f"{i + 1}_{stage}"


def run_pipeline(cfg: PipelineConfig, overrides: Sequence[str]) -> dict[str, Any]:
    """Run ``cfg.stages`` in order, each stage's export initialising the next; returns each stage's results.

    Every stage is exactly ``train stage=S <overrides> output_dir=<cfg.output_dir>/<n>_<S> init_from=<previous
    export>``. A stage whose export exists is skipped; an unfinished stage resumes from its newest checkpoint -- so
    rerunning the same command after a crash continues at the stage and step where it stopped. At the end
    ``summary.md`` and ``loss.png`` are written to ``cfg.output_dir``.
    """
    from .reports import write_summary

    stages, root = list(cfg.stages), Path(cfg.output_dir)
    overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "stages"]
    # Compose every stage first: a misspelt key or a bad value fails now, not hours later at stage 3.
    for i, s in enumerate(stages):
        compose_stage(s, overrides, stage_dir(root, i, s), None if i == 0 else "PLACEHOLDER")
    summary: list[dict[str, Any]] = []
    prev_export: str | None = None
    results: dict[str, Any] = {}
    for i, s in enumerate(stages):
        d = stage_dir(root, i, s)
        export = d / "export"
        if (export / "config.json").is_file() and (d / "results.json").is_file():
            print(f"[pipeline] {s}: export exists in {export}, skipping", flush=True)
            results[s] = json.loads((d / "results.json").read_text())
        else:
            print(f"[pipeline] stage {i + 1}/{len(stages)}: {s} -> {d}", flush=True)
            results[s] = run_stage(compose_stage(s, overrides, d, prev_export))
            _reset_accelerate()
            if results[s].get("final", {}).get("interrupted"):
                print("[pipeline] interrupted; rerun the same command to resume", flush=True)
                return results
        prev_export = str(export)
        entry = {"name": s, "output_dir": str(d)}
        for key, tag in (("heldout_before", "accuracy_before"), ("heldout_after", "accuracy_after")):
            r = results[s].get(key)
            if r:
                entry[tag] = r["accuracy"]
                entry["baseline_accuracy"] = r.get("baseline")
        summary.append(entry)
    if int(os.environ.get("RANK", "0")) == 0:
        md, png = write_summary(root, summary)
        first = results[stages[0]].get("heldout_before")
        last = results[stages[-1]].get("heldout_after")
        if first and last:
            print(
                f"[pipeline] held-out accuracy: before {first['accuracy']:.3f} -> after {last['accuracy']:.3f} "
                f"(majority-answer baseline {last.get('baseline') or 0:.3f})",
                flush=True,
            )
        print(f"[pipeline] wrote {md} and {png}; final model: {prev_export}", flush=True)
    return results


def _reset_accelerate() -> None:
    """Let the next stage build its own Accelerator (another DeepSpeed config) in this process."""
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
    except Exception as e:  # noqa: BLE001 - a failed reset only matters if the next stage differs; say so
        log.warning("could not reset accelerate state between stages: %s", e)


# ----------------------------------------------------------------------------------------------------------------
# The data doctor
# ----------------------------------------------------------------------------------------------------------------

EXIT_OK, EXIT_TOO_MANY_BAD = 0, 2


def run_doctor(cfg: DoctorConfig, overrides: Sequence[str], *, progress: bool = True) -> int:
    """Scan ``cfg.data`` (``data.scan.scan_data``), write the report to ``cfg.output_dir``; returns the exit status:
    0, or 2 when a dataset's share of bad records exceeds ``doctor.max_failure_rate`` (default: training's own
    ``data.max_bad_fraction``, the rule on which training aborts).

    Each stage of ``doctor.stages`` is composed with the same ``overrides``, exactly as the pipeline would run it,
    for its packing estimate.
    """
    from .data.scan import StagePlan, scan_data
    from .reports import write_report

    stages = {}
    for s in cfg.doctor.stages:
        scfg = compose_stage(s, overrides, config_name="doctor")
        stages[s] = StagePlan(scfg.encode, scfg.data, scfg.trainer.grad_accum)
    processor = build_stage_processor(build_tokenizer_for(cfg), cfg.encode)
    scan, series = scan_data(cfg.data, cfg.encode, processor, cfg.doctor, stages, progress=progress)
    report = {"stage": cfg.stage, "model": cfg.model.preset, **scan}
    written = write_report(report, series, cfg.output_dir)
    t = report["totals"]
    print(
        f"[doctor] {t['records']} records, {t['failed']} bad ({t['failure_rate']:.2%}): "
        + (", ".join(f"{k} {v['count']}" for k, v in report["reasons"].items()) or "no failures"),
        flush=True,
    )
    for s, e in report["stages"].items():
        if "optimizer_steps_per_epoch" in e:
            steps, fill = e["optimizer_steps_per_epoch"], e["fill_ratio"]
            print(f"[doctor] {s}: {steps} optimizer steps per epoch, fill {fill:.1%}", flush=True)
    print(f"[doctor] wrote {written[0]} and {written[1]}", flush=True)
    print(f"[doctor] {report['verdict']}", file=sys.stdout if report["passed"] else sys.stderr, flush=True)
    return EXIT_OK if report["passed"] else EXIT_TOO_MANY_BAD


# ----------------------------------------------------------------------------------------------------------------
# Export of a training checkpoint
# ----------------------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` when it is a complete checkpoint, else the newest complete checkpoint of the run directory."""
    from .trainer.checkpoint import find_latest_checkpoint

    p = Path(path)
    if (p / "COMPLETE").is_file():
        return p
    latest = find_latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(f"{p} is neither a complete checkpoint nor a run directory with one")
    return latest


def export_checkpoint(cfg: ExportConfig) -> Path:
    """A training checkpoint -> a transformers-native directory ``cfg.output`` (safetensors only); returns it.

    The result loads offline with ``AutoModelForImageTextToText.from_pretrained`` and
    ``AutoProcessor.from_pretrained``.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoProcessor, VideoLlama3Config, VideoLlama3ForConditionalGeneration

    from .model.export import export_hf

    ckpt = resolve_checkpoint(cfg.checkpoint)
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{ckpt} holds no model.safetensors (a DeepSpeed ZeRO checkpoint keeps sharded states): export the "
            "stage's final `export/` directory instead, or consolidate with DeepSpeed's zero_to_fp32 first"
        )
    config = VideoLlama3Config.from_pretrained(ckpt / "model_config")
    model = VideoLlama3ForConditionalGeneration(config)
    state = load_file(str(weights))
    # the trainer wraps the model once (``LossModule.model``): strip that prefix
    state = {
        k[len("model.") :] if k.startswith("model.model.") or k == "model.lm_head.weight" else k: v
        for k, v in state.items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    processor = AutoProcessor.from_pretrained(ckpt / "processor", local_files_only=True)
    return export_hf(
        model, processor, cfg.output, max_shard_size=cfg.max_shard_size, dtype=getattr(torch, cfg.dtype)
    )
