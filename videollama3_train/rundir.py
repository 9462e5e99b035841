"""The checks a run makes before anything is built, and the record a run directory keeps of itself.

A user's mistakes must fail in seconds, not after a 7B model is built on 8 ranks: data paths, the weights' shape
against the model preset, and the run directory. A run directory records its stage, model, data fingerprint and
schedule in ``run.json``; another stage or other data in the same directory is an error naming both, a finished
run rerun does nothing, and a changed schedule length needs ``reschedule=true``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .config import RunConfig
from .console import UserError, relative_hint

log = logging.getLogger("videollama3_train")

# ----------------------------------------------------------------------------------------------------------------
# Checks before anything is built: paths, weights, the run directory
# ----------------------------------------------------------------------------------------------------------------

# a run directory's record: its stage, model, data and schedule, and whether it finished
RUN_FILE = "run.json"


def check_data_paths(data) -> None:
    """``DataConfig.check_paths`` as a :class:`UserError` (relative paths: where they resolve), and the first
    record of every annotation file read (a file that is not JSON / JSONL raises ``DataError`` now, not after
    minutes of loading)."""
    from .data.annotations import iter_records

    try:
        data.check_paths()
    except FileNotFoundError as e:
        path = str(e).rsplit(": ", 1)[-1]
        raise UserError(f"{e}{relative_hint(path)}") from e
    for d in data.resolved_datasets().values():
        for _ in iter_records(d.path):
            break


def _checkpoint_shape(path: Path) -> tuple[int, int] | None:
    """``(hidden size, layers)`` of the LLM of a native / official checkpoint directory (or a Qwen2 one)."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = raw.get("text_config") or raw
    if "hidden_size" not in text:
        return None
    return int(text["hidden_size"]), int(text.get("num_hidden_layers", 0))


def check_weights(cfg: RunConfig) -> None:
    """The starting weights exist, have a config and safetensors, and fit the preset's recipe.

    The tiny preset (``model=tiny``, the default) scales learning rates by 300 and runs 10 epochs: meant for random
    tiny weights, it is refused for any checkpoint that is not tiny-shaped.
    """
    from .model.core import detect_init_kind
    from .model.presets import PRESETS

    m = cfg.model
    if cfg.stage == "finetune" and not m.init_from:
        raise UserError(
            "stage=finetune fine-tunes a released checkpoint: add init_from=DIR (a transformers-native or "
            "official VideoLLaMA3 directory) and its model= preset"
        )
    dirs = []
    if m.init_from:
        dirs.append(("init_from", Path(m.init_from)))
    if m.init_kind == "assemble":
        dirs += [("model.vision_from", Path(m.vision_from)), ("model.llm_from", Path(m.llm_from))]
    for key, path in dirs:
        if not path.is_dir():
            raise UserError(f"{key}={path}: no such directory{relative_hint(path)}")
        if not (path / "config.json").is_file():
            raise UserError(
                f"{key}={path} is not a checkpoint directory (no config.json): give a transformers-native "
                "directory (e.g. a stage's export/) or an official VideoLLaMA3 one"
            )
        if not any(path.glob("*.safetensors")):
            raise UserError(f"{key}={path} holds no *.safetensors weights (.bin / .pt are not loaded)")
    if m.init_from and m.init_kind == "auto":
        try:
            detect_init_kind(m.init_from)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from e
    weights = Path(m.init_from) if m.init_from else Path(m.llm_from) if m.init_kind == "assemble" else None
    shape = _checkpoint_shape(weights) if weights is not None else None
    tiny = PRESETS["tiny"].text
    if m.preset == "tiny" and shape is not None and shape != (tiny.hidden_size, tiny.num_hidden_layers):
        fits = [
            name
            for name, p in PRESETS.items()
            if (p.text.hidden_size, p.text.num_hidden_layers) == shape and name != "tiny"
        ]
        raise UserError(
            f"{weights} holds a {shape[0]}-wide, {shape[1]}-layer LLM but model=tiny: the tiny preset's "
            f"lr_scale={cfg.trainer.lr_scale:g}, lr_max={cfg.trainer.lr_max} and {cfg.trainer.epochs} epochs are for "
            f"random tiny weights.\nAdd model={fits[0] if fits else 'videollama3_2b'} (the preset of these weights)"
        )
    check_backend(cfg)


def check_backend(cfg: RunConfig) -> None:
    """The backend's own checks on the config (a DeepSpeed backend's ZeRO JSON exists), as a :class:`UserError`."""
    from .trainer.backend import check_backend_config

    try:
        check_backend_config(cfg.trainer)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e


def _file_digest(path: Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file (of its first and last 16 MiB and its size when it is larger than 64 MiB)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= 4 * chunk:
            h.update(f.read())
        else:
            h.update(f.read(chunk))
            f.seek(size - chunk)
            h.update(f.read(chunk))
            h.update(str(size).encode())
    return h.hexdigest()


def data_fingerprint(data) -> dict[str, Any]:
    """What a run directory records of its data: every dataset's annotation file (path, bytes, content digest),
    media root and sampling, and one ``id`` over the contents and the sampling (paths left out: a moved dataset is
    the same data)."""
    datasets = {}
    for name, d in data.resolved_datasets().items():
        p = Path(d.path)
        datasets[name] = {
            "path": str(p.resolve()),
            "root": str(Path(d.root).resolve()),
            "bytes": p.stat().st_size,
            "sha256": _file_digest(p),
            "weight": d.weight,
            "repeat": d.repeat,
            "max_samples": d.max_samples,
        }
    ident = {n: {k: v for k, v in e.items() if k not in ("path", "root")} for n, e in datasets.items()}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return {"id": digest, "datasets": datasets}


def model_record(cfg: RunConfig) -> dict[str, Any]:
    m = cfg.model

    def absolute(p):
        return str(Path(p).resolve()) if p else None

    return {
        "preset": m.preset,
        "init_from": absolute(m.init_from),
        "init_kind": m.init_kind,
        "vision_from": absolute(m.vision_from),
        "llm_from": absolute(m.llm_from),
        "lora": cfg.lora.enabled,
    }


def _describe_data(fp: dict[str, Any]) -> str:
    return ", ".join(f"{n}: {e['path']}" for n, e in fp["datasets"].items()) + f" [data id {fp['id']}]"


def read_run_record(out_dir: Path) -> dict[str, Any] | None:
    """The run directory's ``run.json``; for a directory written before it existed, what ``resolved_config.json``
    and ``results.json`` tell (stage, model; complete when it has an export and results); None for a new one."""
    f = out_dir / RUN_FILE
    if f.is_file():
        return json.loads(f.read_text())
    legacy = out_dir / "resolved_config.json"
    if not legacy.is_file():
        return None
    old = json.loads(legacy.read_text())
    complete = (out_dir / "results.json").is_file() and (out_dir / "export" / "config.json").is_file()
    model = old.get("model", {})
    return {
        "stage": old.get("stage"),
        "model": {"preset": model.get("preset"), "init_from": model.get("init_from")},
        "data": None,
        "schedule": None,
        "status": "complete" if complete else "running",
    }


def check_run_dir(cfg: RunConfig, record: dict[str, Any] | None, data_fp: dict[str, Any]) -> None:
    """Raise :class:`UserError` when ``cfg`` is not the run that ``record`` (the directory's ``run.json``) holds:
    another stage, other starting weights or preset, or other data. Nothing is read or written but the record."""
    if record is None:
        return
    out = cfg.output_dir
    if record.get("stage") and record["stage"] != cfg.stage:
        raise UserError(
            f"output_dir={out} holds a run of stage {record['stage']!r}; this is stage {cfg.stage!r}: a run "
            "directory belongs to one stage (resuming would load the other stage's checkpoint).\n"
            "Use another output_dir (or the same stage=)"
        )
    old_model, new_model = dict(record.get("model") or {}), model_record(cfg)
    if old_model.get("init_from"):  # an older record may hold the path as it was given
        old_model["init_from"] = str(Path(old_model["init_from"]).resolve())
    strict = "init_kind" in old_model  # a run.json record: None (random weights) is a value too
    for key in ("preset", "init_from", "lora"):
        if key in old_model and (strict or old_model[key] is not None) and old_model[key] != new_model[key]:
            name = {"preset": "model=", "init_from": "init_from=", "lora": "lora.enabled="}[key]
            raise UserError(
                f"output_dir={out} holds a run with {name}{old_model[key]}; this one has {name}{new_model[key]}.\n"
                "Use another output_dir (or the run's own setting)"
            )
    old_data = record.get("data")
    if old_data and old_data.get("id") != data_fp["id"]:
        raise UserError(
            f"output_dir={out} holds a run on other data ({_describe_data(old_data)}); this one has "
            f"{_describe_data(data_fp)}.\nUse another output_dir for other data"
        )
    if not cfg.trainer.resume and any((Path(out) / "checkpoints").glob("step-*")):
        raise UserError(
            f"trainer.resume=false would start over in output_dir={out}, which holds checkpoints of this run: use "
            "another output_dir (or delete this one)"
        )


def schedule_change(record: dict[str, Any] | None, cfg: RunConfig, total_steps: int | None) -> str | None:
    """What changed in the schedule's length since the run directory's record, or None."""
    old = (record or {}).get("schedule")
    if not old:
        return None
    t = cfg.trainer
    changed = [
        f"trainer.{k} {old[k]} -> {getattr(t, k)}"
        for k in ("max_steps", "epochs")
        if old.get(k) != getattr(t, k)
    ]
    if total_steps is not None and old.get("total_steps") not in (None, total_steps):
        changed.append(f"total optimizer steps {old['total_steps']} -> {total_steps}")
        if len(changed) == 1:
            changed[0] += " (the batch or packing settings or the world size changed)"
    return "; ".join(changed) or None


def confirm_schedule(
    cfg: RunConfig, record: dict[str, Any] | None, total_steps: int, *, resuming: bool, is_main: bool
) -> None:
    """A resumed run whose schedule length changed to ``total_steps`` goes on only with ``reschedule=true`` (then
    the lr schedule is rebuilt for the new length, and a warning says so)."""
    change = schedule_change(record, cfg, total_steps)
    if change is None or not resuming:
        return
    if not cfg.reschedule:
        raise reschedule_error(cfg, change, record or {})
    if is_main:
        log.warning("reschedule=true: %s; the lr schedule is rebuilt for %d steps", change, total_steps)


def reschedule_error(cfg: RunConfig, change: str, record: dict[str, Any]) -> UserError:
    where = (
        f"finished at step {record.get('step')}" if record.get("status") == "complete" else "has checkpoints"
    )
    return UserError(
        f"the schedule's length changed ({change}) in output_dir={cfg.output_dir}, whose run {where}: resuming "
        "would rebuild the learning-rate schedule mid-run.\nRestore the run's settings, add reschedule=true to "
        "rebuild it for the new length from the newest checkpoint, or use another output_dir"
    )


def write_run_record(out_dir: Path, record: dict[str, Any]) -> None:
    tmp = out_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out_dir / RUN_FILE)


class RunRecord:
    """The life of a run directory's ``run.json``: ``running`` when training starts (its stage, model, data and
    schedule; the creation time of an earlier record kept), ``complete`` with the last step once the export and
    the results are written. Rank 0 writes it (``enabled``)."""

    def __init__(
        self,
        cfg: RunConfig,
        previous: dict[str, Any] | None,
        data_fp: dict[str, Any],
        *,
        enabled: bool = True,
    ):
        self.out_dir, self.enabled = Path(cfg.output_dir), enabled
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.record = {
            "stage": cfg.stage,
            "model": model_record(cfg),
            "data": data_fp,
            "schedule": {
                "max_steps": cfg.trainer.max_steps,
                "epochs": cfg.trainer.epochs,
                "total_steps": None,
            },
            "status": "running",
            "step": (previous or {}).get("step"),
            "created": (previous or {}).get("created", now),
            "updated": now,
        }

    def running(self, total_steps: int) -> None:
        """Record the run as started with a schedule of ``total_steps`` optimizer steps."""
        self.record["schedule"]["total_steps"] = total_steps
        self._write()

    def complete(self, step: int | None) -> None:
        """Record the run as finished at ``step`` (its export and results are written)."""
        self.record.update(status="complete", step=step, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self._write()

    def _write(self) -> None:
        if self.enabled:
            write_run_record(self.out_dir, self.record)


def device_line(accelerator, cfg: RunConfig) -> str:
    import torch
    import torch.distributed as dist

    from .trainer.config import resolve_precision

    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    world = accelerator.num_processes
    comm = dist.get_backend() if dist.is_available() and dist.is_initialized() else "single process"
    return (
        f"{world} process{'es' if world > 1 else ''} on {name} ({comm}), backend {cfg.trainer.backend}, precision "
        f"{resolve_precision(cfg.trainer)}"
    )
