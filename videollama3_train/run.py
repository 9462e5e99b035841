"""What the training commands run: one stage, and the stages chained.

Each function takes a validated config (``config.py``) and is the one call of its command:

    train    -> run_stage(cfg)                 pipeline -> run_pipeline(cfg, overrides)
    (doctor -> offline.run_doctor, export -> offline.export_checkpoint, prepare -> data.prepare.prepare_data;
    the checks before anything is built and the run directory's record: rundir.py)

The pipeline and the doctor also take the command line's overrides: they compose every stage's own config from
them (``config.compose_stage``), exactly as ``train stage=<S> <overrides>`` would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import PipelineConfig, RunConfig, compose_stage
from .console import UserError, log_file
from .contract import ParallelDims
from .rundir import (
    RunRecord,
    check_data_paths,
    check_run_dir,
    check_weights,
    confirm_schedule,
    data_fingerprint,
    device_line,
    read_run_record,
    reschedule_error,
    schedule_change,
)

log = logging.getLogger("videollama3_train")


# ----------------------------------------------------------------------------------------------------------------
# build_* factories: config -> objects
# ----------------------------------------------------------------------------------------------------------------


def build_tokenizer_for(cfg: RunConfig):
    """The checkpoint's own tokenizer when starting from a directory that has one, else ``model.tokenizer``; its
    chat template must render prompts as training does (``data/template_check.py``)."""
    from .data.template_check import template_mismatch
    from .model.tokenizer import build_tokenizer

    init = cfg.model.init_from
    use_init = init and (Path(init) / "tokenizer_config.json").is_file()
    tokenizer = build_tokenizer(init if use_init else cfg.model.tokenizer)
    if why := template_mismatch(tokenizer):
        raise UserError(why)
    return tokenizer


def build_stage_processor(tokenizer, enc):
    """transformers' processor with this stage's merge sizes, budgets and frame sampling (it is saved with every
    export, so inference on the export sees images and videos the way this stage trained on them)."""
    from .data.encode import processor_settings
    from .model.tokenizer import build_processor

    return build_processor(tokenizer, **processor_settings(enc))


def build_cost_model(cfg: RunConfig):
    """The packer's FLOPs model of a stage (``data.cost_model``): the model preset's dimensions and which towers
    train (a frozen one costs less). Training and the doctor deal rows by it alike."""
    from .data.cost_model import FlopsShape, SampleCostModel
    from .model.api import preset_flops_dimensions

    lrs = cfg.trainer.lrs
    return SampleCostModel(
        FlopsShape(**preset_flops_dimensions(cfg.model.preset)),
        llm_trains=lrs["llm"] is not None,
        vision_trains=lrs["vision"] is not None,
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


def effective_settings(
    cfg: RunConfig, world_size: int, plan_stats: dict[str, float], grad_accum: int | None = None
) -> dict[str, Any]:
    """The learning rates and budgets a stage actually trains with (``effective.json`` in the run directory).

    The configured values are in ``resolved_config.json``; these are what they become: each group's peak
    learning rate after ``trainer.lr_scale`` and ``trainer.lr_max`` (None = frozen), the micro-batches, tokens and
    patches of one optimizer step over all ranks, and the first epoch's packing (samples per optimizer step).
    """
    t, d = cfg.trainer, cfg.data
    ga = grad_accum or t.grad_accum  # the loader's, when a global batch in samples decided it
    micro = world_size * ga
    steps = int(plan_stats.get("micro_batches_per_rank", 0)) // ga
    packed = int(plan_stats.get("samples_packed", 0))
    return {
        "lrs": t.lrs,
        "lr_scale": t.lr_scale,
        "lr_max": t.lr_max,
        "world_size": world_size,
        "grad_accum": ga,
        "global_batch_samples": t.global_batch_samples,
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


def run_stage(cfg: RunConfig, *, announce: bool = True) -> dict[str, Any]:
    """Train one stage as ``cfg`` says; returns the final metrics plus held-out results.

    First, before any model is built: the data paths, the starting weights, and the run directory (``run.json``:
    another stage, model or data there is an error; a finished run is reported and left untouched; a changed
    schedule length needs ``reschedule=true``). Then this rank's loader (the annotations are read and every record
    costed, so bad data stops here too), then the model (LoRA-wrapped when ``lora.enabled``), handed to
    :func:`~videollama3_train.trainer.fit.fit`; at the end a transformers-native export in ``<output_dir>/export``.
    Runs the same under ``torchrun`` / ``deepspeed`` / ``accelerate launch``. A finished run returns its
    ``results.json`` with ``already_complete`` set (``announce``: say so on the console).
    """
    out_dir = Path(cfg.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output_dir={cfg.output_dir} is a file, not a directory")
    check_data_paths(cfg.data)  # a missing file fails now, before any model is built
    check_weights(cfg)
    data_fp = data_fingerprint(cfg.data)
    record = read_run_record(out_dir)
    check_run_dir(cfg, record, data_fp)
    has_checkpoints = any((out_dir / "checkpoints").glob("step-*"))
    change = schedule_change(record, cfg, None)
    if is_complete(out_dir, record):
        if change is None:
            return _report_complete(cfg, record) if announce else _complete_results(out_dir)
        if not cfg.reschedule:
            raise reschedule_error(cfg, change, record)
    elif change is not None and has_checkpoints and not cfg.reschedule:
        raise reschedule_error(cfg, change, record)

    from .trainer import build_accelerator

    accelerator = build_accelerator(cfg.trainer)
    is_main = accelerator.is_main_process
    try:  # how the ranks divide the work, decided once for the data and the loop
        dims = ParallelDims(
            accelerator.num_processes, accelerator.process_index, cfg.trainer.sequence_parallel
        )
    except ValueError as e:
        raise UserError(str(e)) from e
    set_cpu_threads(accelerator.num_processes, cfg.data.num_workers, on_cpu=accelerator.device.type == "cpu")
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    from .trainer.liveness import guard

    # a collective that fails because a rank was lost says which one (trainer/liveness.py)
    with log_file(out_dir / "train.log", enabled=is_main) as log_path, guard(f"stage {cfg.stage}"):
        return _train(cfg, accelerator, dims, record, data_fp, log_path, resuming=has_checkpoints)


def is_complete(out_dir: Path, record: dict[str, Any] | None) -> bool:
    """The run finished: its record says so and its export and results are there (a crash between the last
    checkpoint and the export leaves a run to resume, which then only exports)."""
    return (
        record is not None
        and record.get("status") == "complete"
        and (out_dir / "export" / "config.json").is_file()
        and (out_dir / "results.json").is_file()
    )


def _complete_results(out_dir: Path) -> dict[str, Any]:
    return {**json.loads((out_dir / "results.json").read_text()), "already_complete": True}


def _report_complete(cfg: RunConfig, record: dict[str, Any]) -> dict[str, Any]:
    out_dir = Path(cfg.output_dir)
    results_file = out_dir / "results.json"
    if int(os.environ.get("RANK", "0")) != 0:  # under a launcher every rank sees the record; one reports it
        return _complete_results(out_dir)
    print(
        f"[{cfg.stage}] output_dir={out_dir} holds this run, complete at step {record.get('step', '?')}: nothing to "
        f"do (export: {out_dir / 'export'}; results: {results_file}).\n"
        f"[{cfg.stage}] To train on, raise trainer.max_steps and add reschedule=true; for a new run use another "
        "output_dir.",
        flush=True,
    )
    return _complete_results(out_dir)


def _train(
    cfg: RunConfig,
    accelerator,
    dims: ParallelDims,
    record: dict[str, Any] | None,
    data_fp: dict[str, Any],
    log_path: Path | None,
    *,
    resuming: bool,
) -> dict[str, Any]:
    from .evaluator import build_evaluator
    from .model.core import build_model
    from .model.export import export_hf
    from .model.lora import apply_lora
    from .reports import done_story, stage_story
    from .trainer import build_backend, fit
    from .trainer.liveness import main_only
    from .trainer.optim import plan_steps
    from .trainer.sharded_init import place, wants_meta

    out_dir, is_main = Path(cfg.output_dir), accelerator.is_main_process
    tokenizer = build_tokenizer_for(cfg)
    processor = build_stage_processor(tokenizer, cfg.encode)
    # The data first: annotations read, every record costed and packed -- bad data stops the run before a model
    # (minutes to load at full size) is built.
    data = build_stage_data(cfg, processor, dims, is_main=is_main)
    trainer_cfg = dataclasses.replace(cfg.trainer, grad_accum=data.grad_accum)
    _check_global_batch(out_dir, data.rows_per_step, accelerator.num_processes, resuming=resuming)
    backend = build_backend(trainer_cfg, accelerator)
    total_steps, steps_per_epoch = plan_steps(trainer_cfg, data.loader)
    confirm_schedule(cfg, record, total_steps, resuming=resuming, is_main=is_main)
    run_record = RunRecord(cfg, record, data_fp, enabled=is_main)
    effective = effective_settings(cfg, accelerator.num_processes, data.plan_stats, data.grad_accum)
    writer = _build_writer(cfg, effective, enabled=is_main)
    results: dict[str, Any] = {"stage": cfg.stage, "plan": data.plan_stats, "bad_records": data.failures}
    try:
        evaluator = build_evaluator(cfg, data, processor, tokenizer=tokenizer, backend=backend, writer=writer)
        if is_main:  # the run directory's record and config, then the console story
            run_record.running(total_steps)
            _write_json(out_dir / "resolved_config.json", dataclasses.asdict(cfg))
            _write_json(out_dir / "effective.json", effective)
            story = stage_story(
                cfg,
                device=device_line(accelerator, cfg),
                data=data,
                dims=dims,
                heldout=len(evaluator.heldout),
                schedule=(total_steps, steps_per_epoch),
                resuming=resuming,
            )
            _tell(story, log_path)
        defer = (
            wants_meta(cfg.trainer, accelerator) and not cfg.lora.enabled
        )  # sharded: no whole copy per rank
        model = place(build_model(cfg.model, tokenizer, defer_weights=defer), cfg.trainer, accelerator)
        if cfg.lora.enabled:
            model = apply_lora(model, cfg.lora)
        whole_before = (lambda: build_model(cfg.model, tokenizer)) if defer else None  # rank 0's whole copy
        evaluator.before(model, results, resuming=resuming, whole=whole_before)
        final = fit(
            model,
            data.loader,
            cfg.trainer,
            out_dir=out_dir,
            accelerator=accelerator,
            backend=backend,
            parallel=dims,
            processor=processor,
            evaluator=evaluator,
            writer=writer,
        )
        results["final"] = final
        if final.get("interrupted"):
            return results
        accelerator.wait_for_everyone()
        step = final.get("step", _latest_step(out_dir))  # no row: resumed at the last step, export only
        with backend.whole_model(model) as whole:  # every rank enters: a sharding backend gathers the weights
            with main_only("export") as main:  # rank 0 alone; the others wait outside any collective
                if main:
                    results["export"] = str(export_hf(whole, processor, out_dir / "export"))
                    writer.summary({"export": results["export"]})
            evaluator.after(whole, results, step or 0)
            with main_only("results") as main:
                if main:
                    _write_json(out_dir / "results.json", results)
                    run_record.complete(step)
                    print(done_story(cfg, step, results, log_path), flush=True)
    finally:
        writer.finish()  # the process group stays: the next stage of a pipeline reuses it
    return results


def _build_writer(cfg: RunConfig, effective: dict[str, Any], *, enabled: bool):
    """The stage's metrics writer (``metrics.jsonl``, W&B with the config and the effective settings)."""
    from .trainer.metrics import MetricsWriter

    out_dir = Path(cfg.output_dir)
    return MetricsWriter(
        out_dir,
        project=cfg.logger.project,
        run_name=cfg.logger.run_name or f"{cfg.stage}-{out_dir.name}",
        wandb_mode=cfg.logger.wandb,
        config={**dataclasses.asdict(cfg), "effective": effective},
        enabled=enabled,
        group=cfg.logger.group,
        job_type=cfg.stage,
    )


def _check_global_batch(out_dir: Path, rows_per_step: int, world_size: int, *, resuming: bool) -> None:
    """A resume with another global batch is a user error, refused before the model is built."""
    from .trainer.checkpoint import global_batch_mismatch

    why = global_batch_mismatch(out_dir, rows_per_step, world_size) if resuming else None
    if why:
        raise UserError(why)


def activation_budget(cfg: RunConfig, world_size: int, sp: int = 1):
    """``(ActivationModel | None, GB)``: the packer's model of a row's activation memory
    (``data.cost_model.ActivationModel``, from the model's dimensions and ``trainer.gradient_checkpointing``,
    ``checkpoint_every_n_layers``, ``loss_chunk_size``, ``precision`` and ``model.attn_implementation``) and the bound
    per row: ``data.max_activation_gb``, or when None ``cost_model.default_activation_gb`` (an 80 GB device less
    10% and one rank's model states under ``trainer.backend`` over ``world_size`` ranks). A sequence-parallel group
    of ``sp`` ranks shares a row (each holds about 1/sp of its activations): the bound is ``sp`` times one rank's.
    GB is 0 when the bound is off (``data.max_activation_gb=0``, or a default that leaves nothing); the model is
    returned all the same (the doctor reports each row's predicted peak)."""
    from .data.cost_model import ActivationModel, FlopsShape, default_activation_gb
    from .model.api import flops_dimensions, memory_dimensions
    from .model.core import model_config_for
    from .trainer.backend import sharded_states

    gb = cfg.data.max_activation_gb
    config = model_config_for(cfg.model)
    shape, mem, t = FlopsShape(**flops_dimensions(config)), memory_dimensions(config), cfg.trainer
    attn = cfg.model.attn_implementation
    model = ActivationModel(
        shape,
        mem["vision_heads"],
        llm_checkpointed=t.gradient_checkpointing in ("llm", "both"),
        vision_checkpointed=t.gradient_checkpointing in ("vision", "both"),
        every_n_layers=t.checkpoint_every_n_layers,
        loss_chunk=t.loss_chunk_size,
        # auto picks a varlen / flash kernel on a GPU, the device the bound is about
        attention=attn if attn in ("sdpa", "eager") else "flash",
        act_bytes=4 if t.precision == "fp32" else 2,
        max_tokens=cfg.data.max_tokens * sp,
        merge=cfg.encode.image_merge_size,
    )
    if gb is None:
        gb = default_activation_gb(
            shape, tied=mem["tied"], sharded=sharded_states(t.backend), world_size=world_size
        )
        if gb <= 0:
            log.warning(
                "the model states of one rank alone exceed the 80 GB device data.max_activation_gb assumes by default "
                "(trainer.backend=%s over %d ranks): no activation bound; shard more or set data.max_activation_gb",
                t.backend,
                world_size,
            )
            return model, 0.0
    return model, sp * gb


def build_stage_data(cfg: RunConfig, processor, dims: ParallelDims, *, is_main: bool):
    """This rank's training data (``data.build.build_train_data``) for the ranks as ``dims`` divides them: a
    sequence-parallel group of N ranks shares its rows, so the loader deals rows to the groups, each N times the
    per-rank budgets. Data that cannot train as a whole (too many unusable records, no optimizer step) is the
    user's to fix: a one-line :class:`UserError`."""
    from .data.build import build_train_data
    from .data.errors import UnusableDataError

    n = dims.sp_size
    activation, gb = activation_budget(cfg, dims.dp_size * n, n)
    data_cfg = dataclasses.replace(
        cfg.data,
        max_tokens=cfg.data.max_tokens * n,
        max_patches=cfg.data.max_patches * n,
        max_activation_gb=gb,
    )
    try:
        return build_train_data(
            data_cfg,
            cfg.encode,
            processor,
            grad_accum=cfg.trainer.grad_accum,
            rank=dims.dp_rank,
            world_size=dims.dp_size,
            is_main=is_main,
            global_batch_samples=cfg.trainer.global_batch_samples,
            activation=activation,
            cost_model=build_cost_model(cfg),
        )
    except UnusableDataError as e:
        raise UserError(str(e)) from e


def _tell(story: str, log_path: Path | None) -> None:
    """Print ``story``; the run's log keeps it too (the console is not kept)."""
    print(story, flush=True)
    if log_path is not None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(story + "\n")


def _latest_step(out_dir: Path) -> int | None:
    from .trainer.checkpoint import find_latest_checkpoint

    latest = find_latest_checkpoint(out_dir)
    return int(latest.name.split("-")[1]) if latest is not None else None


# ----------------------------------------------------------------------------------------------------------------
# The stages chained
# ----------------------------------------------------------------------------------------------------------------


def failed_on_regression(cfg: RunConfig, results: dict[str, Any]) -> bool:
    """A stage that ends with a benchmark regression under ``eval.fail_on_regression=true`` (its export is
    written): the command ends with :data:`EXIT_REGRESSION`."""
    return bool(cfg.eval.fail_on_regression and results.get("benchmark_regressions"))


# exit status of a stage (or pipeline) that ended with a benchmark regression under eval.fail_on_regression
EXIT_REGRESSION = 3


def train_command(cfg: RunConfig) -> int:
    """The ``train`` command's body: one stage; exit status 3 when ``eval.fail_on_regression`` trips."""
    return EXIT_REGRESSION if failed_on_regression(cfg, run_stage(cfg)) else 0


def pipeline_command(cfg: PipelineConfig, overrides: Sequence[str]) -> int:
    """The ``pipeline`` command's body: the stages in order; exit status 3 when a stage's alarm trips."""
    results = run_pipeline(cfg, overrides)
    return EXIT_REGRESSION if any(failed_on_regression(cfg, r) for r in results.values()) else 0


def stage_dir(root: str | Path, i: int, stage: str) -> Path:
    """Run directory of the ``i``-th (0-based) stage of a pipeline: ``<root>/<i+1>_<stage>``."""
    return Path(root) / f"{i + 1}_{stage}"


def run_pipeline(cfg: PipelineConfig, overrides: Sequence[str]) -> dict[str, Any]:
    """Run ``cfg.stages`` in order, each stage's export initialising the next; returns each stage's results.

    Every stage is exactly ``train stage=S <overrides> output_dir=<cfg.output_dir>/<n>_<S> init_from=<previous
    export>``. A finished stage is skipped; an unfinished stage resumes from its newest checkpoint -- so rerunning
    the same command after a crash continues at the stage and step where it stopped. Before the first stage trains,
    every stage is composed (a bad value fails now, not hours later at stage 3) and every existing stage directory
    is checked against its stage's config (other data or model there stops the pipeline). At the end
    ``summary.md`` and ``loss.png`` are written to ``cfg.output_dir``; the log goes to ``pipeline.log`` there.
    """
    from .reports import write_summary

    stages, root = list(cfg.stages), Path(cfg.output_dir)
    overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "stages"]
    if cfg.logger.group is None:  # the stages side by side on the W&B dashboard, each its stage as job type
        overrides.append(f"logger.group=pipeline-{root.resolve().name}")
    configs = []
    for i, s in enumerate(stages):
        prev = None if i == 0 else str(stage_dir(root, i - 1, stages[i - 1]) / "export")
        configs.append(compose_stage(s, overrides, stage_dir(root, i, s), prev))
    check_data_paths(configs[0].data)
    data_fp = data_fingerprint(configs[0].data)
    for scfg in configs:
        check_run_dir(scfg, read_run_record(Path(scfg.output_dir)), data_fp)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
    summary: list[dict[str, Any]] = []
    prev_export: str | None = None
    results: dict[str, Any] = {}
    with log_file(root / "pipeline.log", enabled=is_main):
        for i, (s, scfg) in enumerate(zip(stages, configs)):
            d = Path(scfg.output_dir)
            if is_complete(d, read_run_record(d)) and schedule_change(read_run_record(d), scfg, None) is None:
                print(f"[pipeline] {s}: complete in {d}, skipping", flush=True)
                results[s] = _complete_results(d)
            else:
                print(f"[pipeline] stage {i + 1}/{len(stages)}: {s} -> {d}", flush=True)
                results[s] = run_stage(scfg)
                _reset_accelerate()
                if results[s].get("final", {}).get("interrupted"):
                    print("[pipeline] interrupted; rerun the same command to resume", flush=True)
                    return results
                if failed_on_regression(scfg, results[s]):
                    print(
                        f"[pipeline] {s}: benchmark regression (eval.fail_on_regression); stopping",
                        flush=True,
                    )
                    return results
            prev_export = str(d / "export")
            entry = {"name": s, "output_dir": str(d)}
            for key in ("benchmarks_before", "benchmarks_after", "benchmark_regressions"):
                if results[s].get(key):
                    entry[key] = results[s][key]
            for key, tag in (("heldout_before", "accuracy_before"), ("heldout_after", "accuracy_after")):
                r = results[s].get(key)
                if r:
                    entry[tag] = r["accuracy"]
                    entry["baseline_accuracy"] = r.get("baseline")
            summary.append(entry)
        if is_main:
            md, png = write_summary(root, summary)
            first = results[stages[0]].get("heldout_before")
            last = results[stages[-1]].get("heldout_after")
            if first and last:
                print(
                    f"[pipeline] held-out accuracy: before {first['accuracy']:.3f} -> after "
                    f"{last['accuracy']:.3f} (majority-answer baseline {last.get('baseline') or 0:.3f})",
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
