"""The bodies of the commands that do not train: the data doctor's scan and report, the export of a training
checkpoint (whose layout its writer, ``trainer/checkpoint.py``, reads for it), the frame cache's preparation and the
summary of a chain of stage runs. The command modules (``doctor.py``, ``export.py``, ``prepare.py``, ``report.py``)
only declare the command and call one of these."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import DoctorConfig, ExportConfig, compose_stage
from .console import UserError, log_file, relative_hint
from .run import activation_budget, build_cost_model, build_stage_processor, build_tokenizer_for

log = logging.getLogger("videollama3_train")

# ----------------------------------------------------------------------------------------------------------------
# The data doctor
# ----------------------------------------------------------------------------------------------------------------

EXIT_OK, EXIT_TOO_MANY_BAD = 0, 2


def run_doctor(cfg: DoctorConfig, overrides: Sequence[str], *, progress: bool = True) -> int:
    """Scan ``cfg.data`` (``data.scan.scan_data``), write the report to ``cfg.output_dir``; returns the exit status:
    0, or 2 when a dataset's share of bad records exceeds ``doctor.max_failure_rate`` (default: training's own
    ``data.max_bad_fraction``, the rule on which training aborts). The log goes to ``doctor.log`` there.

    Each stage of ``doctor.stages`` is composed with the same ``overrides``, exactly as the pipeline would run it,
    for its packing estimate.
    """
    from .data.scan import StagePlan, scan_data
    from .reports import write_report

    out_dir = Path(cfg.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output_dir={cfg.output_dir} is a file, not a directory")
    stages = {}
    for s in cfg.doctor.stages:
        scfg = compose_stage(s, overrides, config_name="doctor")
        t = scfg.trainer  # the packing rule and global batch training runs (data.build.plan_training)
        # the activation model and the bound per row training plans with (0: no bound; the predicted peak of
        # every row is reported all the same)
        activation, gb = activation_budget(scfg, cfg.doctor.num_ranks, t.sequence_parallel)
        data = dataclasses.replace(scfg.data, max_activation_gb=gb)
        stages[s] = StagePlan(
            scfg.encode, data, t.grad_accum, t.global_batch_samples, t.sequence_parallel, activation,
            build_cost_model(scfg),
        )  # fmt: skip
    with log_file(out_dir / "doctor.log"):
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
    if cfg.logger.wandb != "disabled":
        _doctor_artifact(cfg, out_dir, report)
    print(f"[doctor] {report['verdict']}", file=sys.stdout if report["passed"] else sys.stderr, flush=True)
    return EXIT_OK if report["passed"] else EXIT_TOO_MANY_BAD


def _doctor_artifact(cfg: DoctorConfig, out_dir: Path, report: dict) -> None:
    """The report and its plots as one W&B artifact (type ``doctor``) in a run of job type ``doctor``, beside the
    training runs of the same project and group; the totals in its summary."""
    from .trainer.metrics import MetricsWriter

    files = [out_dir / "report.md", out_dir / "report.json", *(out_dir / p for p in report.get("plots", []))]
    with MetricsWriter(
        out_dir,
        project=cfg.logger.project,
        run_name=cfg.logger.run_name or f"doctor-{out_dir.name}",
        wandb_mode=cfg.logger.wandb,
        group=cfg.logger.group,
        job_type="doctor",
    ) as writer:
        writer.log_artifact(f"doctor-{out_dir.name}", "doctor", [f for f in files if f.is_file()])
        writer.summary({f"doctor/{k}": v for k, v in report["totals"].items() if isinstance(v, int | float)})


# ----------------------------------------------------------------------------------------------------------------
# Export of a training checkpoint
# ----------------------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` when it is a complete checkpoint, else the newest complete checkpoint of the run directory."""
    from .trainer.checkpoint import find_latest_checkpoint, is_checkpoint

    p = Path(path)
    if is_checkpoint(p):
        return p
    if not p.is_dir():
        raise UserError(f"checkpoint={path}: no such directory{relative_hint(p)}")
    latest = find_latest_checkpoint(p)
    if latest is None:
        raise UserError(
            f"checkpoint={path} is neither a complete checkpoint (a COMPLETE file) nor a run directory with one "
            "under checkpoints/: give a run directory or its checkpoints/step-XXXXXXXX"
        )
    return latest


def export_checkpoint(cfg: ExportConfig) -> Path:
    """A training checkpoint -> a transformers-native directory ``cfg.output`` (safetensors only); returns it.

    The result loads offline with ``AutoModelForImageTextToText.from_pretrained`` and
    ``AutoProcessor.from_pretrained``. Weights are ``cfg.dtype`` (float32 by default, as in a stage's own
    ``export/``). The log goes to ``export.log`` in the checkpoint's run directory.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoProcessor, VideoLlama3Config, VideoLlama3ForConditionalGeneration

    from .model.export import export_hf
    from .trainer.checkpoint import MODEL_CONFIG, PROCESSOR, model_weights, native_state_dict

    ckpt = resolve_checkpoint(cfg.checkpoint)
    weights = model_weights(ckpt)
    if weights is None:
        raise UserError(
            f"{ckpt} holds no model.safetensors (a DeepSpeed ZeRO / FSDP2 checkpoint keeps sharded states): export "
            "the stage's final export/ directory instead, or consolidate with DeepSpeed's zero_to_fp32 first"
        )
    out = Path(cfg.output)
    if out.resolve() in (ckpt.resolve(), *ckpt.resolve().parents):
        raise UserError(
            f"output={cfg.output} would replace the checkpoint it reads: choose another directory"
        )
    with log_file(ckpt.parent.parent / "export.log"):
        config = VideoLlama3Config.from_pretrained(ckpt / MODEL_CONFIG)
        model = VideoLlama3ForConditionalGeneration(config)
        state = native_state_dict(load_file(str(weights)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise UserError(
                f"checkpoint {ckpt} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        if config.tie_word_embeddings:
            model.tie_weights()
        processor = AutoProcessor.from_pretrained(ckpt / PROCESSOR, local_files_only=True)
        path = export_hf(
            model, processor, cfg.output, max_shard_size=cfg.max_shard_size, dtype=getattr(torch, cfg.dtype)
        )
        log.info("exported %s to %s (%s)", ckpt, path, cfg.dtype)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Export, prepare, report: the command bodies
# ----------------------------------------------------------------------------------------------------------------


def export_command(cfg: ExportConfig) -> int:
    print(f"exported to {export_checkpoint(cfg)}", flush=True)
    return 0


def prepare_command(cfg) -> int:
    """Fill the frame cache for ``cfg`` (the train config plus ``prepare.*``); prints the counts as JSON."""
    from .data.prepare import prepare_data
    from .rundir import check_data_paths

    check_data_paths(cfg.data)
    log_dir = Path(cfg.output_dir or cfg.encode.frame_cache_dir)
    with log_file(log_dir / "prepare.log"):
        opts = cfg.prepare
        counts = prepare_data(
            cfg.data, cfg.encode, workers=opts.workers, max_pixels_per_frame=opts.max_pixels_per_frame
        )
        if opts.cost_table:
            counts.update(_cost_table(cfg))
    print(json.dumps(counts, indent=2, sort_keys=True))
    return 0


def _cost_table(cfg) -> dict[str, int]:
    """Training's cost pre-pass (``data.build.load_costed``: the same tables, keys and shared cache), run by
    ``prepare`` so that training finds it done; counts of the records costed and of those that failed."""
    from .data.build import load_costed
    from .data.errors import UnusableDataError

    processor = build_stage_processor(build_tokenizer_for(cfg), cfg.encode)
    try:
        _, records, _, failures = load_costed(cfg.data, cfg.encode, processor, is_main=True)
    except UnusableDataError as e:  # the table is written; training will stop on it, prepare says so and ends
        log.warning("prepare: %s", e)
        return {"cost_table_unusable": 1}
    return {
        "cost_table_records": sum(len(r) for r in records),
        "cost_table_failed": sum(n for reasons in failures.values() for n in reasons.values()),
    }


def stage_folders(root: Path, stages: list[str] | None) -> list[str]:
    """``stages``, else the four stage folders of ``launch/run_stages.sh``, else the pipeline's ``<n>_<stage>``."""
    from .contract import STAGES

    if stages:
        return list(stages)
    named = [s for s in STAGES if (root / s).is_dir()]
    if named:
        return named
    numbered = [p.name for p in root.iterdir() if p.is_dir() and re.fullmatch(r"\d+_\w+", p.name)]
    return sorted(numbered, key=lambda n: int(n.split("_", 1)[0])) or list(STAGES)


def report_command(cfg) -> int:
    """``summary.md`` + ``loss.png`` over the stage run directories under ``cfg.root``."""
    from .reports import write_summary

    root = Path(cfg.root)
    if not root.is_dir():
        raise UserError(f"root={cfg.root}: no such directory{relative_hint(root)}")
    with log_file(root / "report.log"):
        runs = [{"name": s, "output_dir": str(root / s)} for s in stage_folders(root, cfg.stages)]
        md, png = write_summary(root, runs)
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md} and {png}")
    return 0
