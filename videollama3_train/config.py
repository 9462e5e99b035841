"""The run configuration: one dataclass per component, composed here and registered with Hydra's ConfigStore.

Configs flow one way: YAML (``configs/``) -> these dataclasses (validated in ``__post_init__``) -> ``build_*``
factories -> objects. Every field documents its unit and meaning where it is defined; ``docs/config.md`` lists them
all. Because the schema is structured, a misspelt key or a wrong type stops the command at start with the key's
name; so does ``+key=`` for a key the schema lacks (:func:`check_overrides`), and a required value (``???``) left
unset: a YAML ``???`` is never filled in by a schema default.

Every command composes its config the same way, through :func:`compose`: ``configs/<command>.yaml`` plus the
command line's overrides (``cli.py`` for the commands; the pipeline composing each stage, the doctor composing each
stage's packing and the tests call it directly).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .console import ConfigError
from .contract import STAGES
from .data.config import DataConfig, EncodeConfig
from .data.scan import ScanConfig
from .model.core import ModelConfig
from .model.lora import LoraConfig
from .paths import CONFIG_DIR as _CONFIG_DIR
from .trainer.config import TrainConfig

# The Hydra config folder every command reads (train.yaml, pipeline.yaml, doctor.yaml, prepare.yaml, export.yaml,
# report.yaml): the repository's configs/, or the copy an installed wheel ships (``paths.py``).
CONFIG_DIR = str(_CONFIG_DIR)

# Named recipes outside the four-stage chain: fine-tuning a released checkpoint on one's own data.
EXTRA_STAGES = ("finetune",)

__all__ = [
    "CONFIG_DIR",
    "BenchmarkConfig",
    "STAGES",
    "ConfigError",
    "DoctorConfig",
    "EvalConfig",
    "ExportConfig",
    "LoggerConfig",
    "LoraConfig",
    "PipelineConfig",
    "PrepareConfig",
    "PrepareOptions",
    "ReportConfig",
    "RunConfig",
    "ScanConfig",
    "check_overrides",
    "compose",
    "compose_node",
    "compose_stage",
    "register_configs",
    "schema_keys",
    "search_dirs",
]


@dataclass
class LoggerConfig:
    wandb: str = "offline"  # W&B mode: "online" | "offline" (files under output_dir/wandb) | "disabled"
    project: str = "videollama3-train"  # W&B project name
    run_name: str | None = None  # W&B run name; None = "<stage>-<output_dir folder name>"
    # W&B group the run joins (its job type is the stage); None = none for a train command, the pipeline's
    # "pipeline-<output_dir folder name>" for each of its stages, so the four stages sit together on the dashboard
    group: str | None = None

    def __post_init__(self):
        if self.wandb not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.wandb must be online, offline or disabled, got {self.wandb!r}")


@dataclass
class BenchmarkConfig:
    """One multiple-choice benchmark of ``eval.benchmarks`` (the file layouts read: docs/benchmarks.md)."""

    path: str = "???"  # JSON list or JSONL of questions (video/image, question, options, answer letter)
    root: str | None = (
        None  # media root the question's video / image paths are relative to; None = the file's folder
    )
    max_samples: int | None = None  # questions scored at most (the first ones); None = all

    def __post_init__(self):
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"eval.benchmarks: max_samples must be >= 1, got {self.max_samples}")


@dataclass
class EvalConfig:
    # optimizer steps between held-out evaluations during training; 0 = only before and after the stage (under
    # ZeRO-3 / FSDP2 each one gathers the whole model: on every rank for ZeRO-3, on rank 0 for FSDP2)
    every: int = 0
    max_new_tokens: int = 8  # tokens generated per held-out record for the exact-match accuracy
    log_generations: int = 4  # generations (with their references) printed per evaluation
    before: bool = True  # evaluate before the first step too (the starting accuracy; skipped when resuming)
    # multiple-choice benchmarks scored by the generated option letter before the stage, every eval.every steps and
    # after it (name -> file): +eval.benchmarks={mvbench:{path:mvbench.json,root:videos}}; docs/benchmarks.md
    benchmarks: dict[str, BenchmarkConfig] = field(default_factory=dict)
    # accuracy (a fraction, 0-1) a benchmark may fall below the stage's starting checkpoint before the run warns
    # naming it (0.05 = five points)
    max_regression: float = 0.05
    # a regression past eval.max_regression ends the stage with exit status 3, after its export is written
    fail_on_regression: bool = False

    def __post_init__(self):
        if self.every < 0 or self.max_new_tokens < 1 or self.log_generations < 0:
            raise ValueError("eval.every and eval.log_generations must be >= 0, eval.max_new_tokens >= 1")
        if not 0 <= self.max_regression <= 1:
            raise ValueError(
                f"eval.max_regression is a fraction of questions (0-1), got {self.max_regression}"
            )


@dataclass
class RunConfig:
    """One stage of training (``configs/train.yaml``); the other commands' schemas extend it."""

    # recipe name: one of the four stages or "finetune" (stage 4 on a released checkpoint); set by stage=<name>
    stage: str = "multitask_sft"
    # run directory of one stage: run.json (its stage, model, data and schedule), checkpoints/, export/,
    # metrics.jsonl, resolved_config.json, effective.json, results.json, train.log; a directory belongs to one run
    output_dir: str = "???"
    # shorthand for model.init_from (a native / official checkpoint directory, e.g. the previous stage's export/);
    # needs an explicit model= (the preset that fits the weights)
    init_from: str | None = None
    # resume a run whose schedule length changed (trainer.max_steps, trainer.epochs, or the batch / packing
    # settings that set the steps per epoch): the lr schedule is rebuilt for the new length from the newest
    # checkpoint; also how a finished run trains on (with a raised trainer.max_steps). False: such a change stops
    reschedule: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    # the data group (data=sample | file | <your mixture>) fills this; data=file needs data.path
    data: DataConfig = field(default_factory=lambda: DataConfig(path="???"))
    trainer: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        if self.stage not in (*STAGES, *EXTRA_STAGES, "custom"):
            raise ValueError(f"stage must be one of {[*STAGES, *EXTRA_STAGES]}, got {self.stage!r}")
        if self.init_from is not None:
            self.model.init_from = self.init_from
        # every planner and encoder takes the encode config; the data key is the one a user sets
        self.encode.follow_symlinks = self.data.follow_symlinks
        # a sample the encode settings allow must fit a micro-batch (of a sequence-parallel group's row)
        self.data.validate_against(self.encode, self.trainer.sequence_parallel)


@dataclass
class PipelineConfig(RunConfig):
    """The stages chained (``configs/pipeline.yaml``): every other key is applied to each stage's train config."""

    # stages to run in order, each initialised from the previous one's export/ (run dir output_dir/<n>_<stage>)
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    # refused for the pipeline (stages=[...] chooses the stages; each stage's own recipe is composed per stage)
    stage: str = "custom"

    def __post_init__(self):
        super().__post_init__()
        if self.stage != "custom":
            raise ValueError(
                "pipeline: use stages=[...] to choose stages (stage= belongs to the train command)"
            )
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"pipeline: unknown stages {unknown}; choose from {list(STAGES)}")
        if not self.stages:
            raise ValueError("pipeline: stages=[] is empty")


@dataclass
class DoctorConfig(RunConfig):
    """The data doctor (``configs/doctor.yaml``): the train config plus ``doctor.*``; output_dir gets the report."""

    doctor: ScanConfig = field(default_factory=ScanConfig)


@dataclass
class PrepareOptions:
    # processes decoding videos (0 or 1 = in this process); None = data.cost_workers
    workers: int | None = None
    # fixed cap on the pixels (width x height) of every stored frame; None = the largest frame the stage's
    # encode budget can ask for (a video alone in its sample), so training never upsamples a cached frame
    max_pixels_per_frame: int | None = None
    # also run training's cost pre-pass into its shared cost table (data.cost_cache_dir, else beside the
    # annotations), so the first training run after prepare starts with every record costed
    cost_table: bool = True

    def __post_init__(self):
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"prepare.workers must be >= 0, got {self.workers}")
        if self.max_pixels_per_frame is not None and self.max_pixels_per_frame < 1:
            raise ValueError(f"prepare.max_pixels_per_frame must be >= 1, got {self.max_pixels_per_frame}")


@dataclass
class PrepareConfig(RunConfig):
    """The frame-cache preparation (``configs/prepare.yaml``): the train config, so the cache matches the stage's
    sampling; writes to ``encode.frame_cache_dir`` (required)."""

    # folder of prepare.log; None = encode.frame_cache_dir (the cache itself goes to encode.frame_cache_dir)
    output_dir: str | None = None
    prepare: PrepareOptions = field(default_factory=PrepareOptions)

    def __post_init__(self):
        super().__post_init__()
        if self.encode.frame_cache_dir is None:
            raise ValueError("prepare: set encode.frame_cache_dir=DIR (and pass the same key to training)")


@dataclass
class ExportConfig:
    """Exporting a training checkpoint (``configs/export.yaml``)."""

    # a checkpoint directory (step-XXXXXXXX) or a run directory (then its newest complete checkpoint)
    checkpoint: str = "???"
    output: str = "???"  # target directory of the transformers-native model (written atomically)
    # dtype of the saved weights: "float32" (what a stage's own export/ holds) | "bfloat16" | "float16"
    dtype: str = "float32"
    max_shard_size: str = "5GB"  # largest safetensors shard, in transformers' size syntax ("500MB", "5GB")

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")


@dataclass
class ReportConfig:
    """``summary.md`` and ``loss.png`` over stage run directories (``configs/report.yaml``)."""

    # folder holding one run directory per stage; summary.md, loss.png and report.log go here
    root: str = "???"
    # run directories under root, in order; None = the four stage names (launch/run_stages.sh), else the
    # pipeline's <n>_<stage> folders, whichever exist
    stages: list[str] | None = None


# name -> schema, as the YAML files name them in their defaults lists
SCHEMAS = {
    "run_schema": RunConfig,
    "pipeline_schema": PipelineConfig,
    "doctor_schema": DoctorConfig,
    "prepare_schema": PrepareConfig,
    "export_schema": ExportConfig,
    "report_schema": ReportConfig,
}
# command config (configs/<name>.yaml) -> its schema
COMMAND_SCHEMAS = {
    "train": RunConfig,
    "pipeline": PipelineConfig,
    "doctor": DoctorConfig,
    "prepare": PrepareConfig,
    "export": ExportConfig,
    "report": ReportConfig,
}


def register_configs() -> None:
    """Register every schema with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=name, node=node)


def compose(config_name: str, overrides: Sequence[str] = ()) -> Any:
    """``configs/<config_name>.yaml`` + ``overrides`` as the validated dataclass, exactly as the command would.

    ``+key=`` for a key the schema lacks raises :class:`ConfigError` (Hydra would add it, unused). Errors of
    Hydra's own (unknown key, wrong type, unknown group option) are raised as Hydra raises them; ``cli.py`` turns
    every one into a line or two for the console. Works inside a running Hydra app too: Hydra's global state is
    restored afterwards. A ``hydra.searchpath=[DIR, ...]`` override adds a user's config folders (their ``data/``,
    ``stage/``, ``model/`` options) after the shipped ones, as Hydra's ``--config-dir`` does.
    """
    from omegaconf import OmegaConf

    return OmegaConf.to_object(compose_node(config_name, overrides))


def compose_node(config_name: str, overrides: Sequence[str] = (), *, hydra_config: bool = False) -> Any:
    """The composed ``DictConfig`` behind :func:`compose` (interpolations unresolved; with ``hydra_config`` the
    ``hydra`` node too): what ``--cfg`` prints."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf import OmegaConf, open_dict

    check_overrides(config_name, overrides)
    register_configs()
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            dcfg = hydra_compose(
                config_name=config_name, overrides=list(overrides), return_hydra_config=hydra_config
            )
    finally:
        restore_gh_from_backup(backup)
    # A mixture gives data.datasets and no data.path: its path stays unset (None), not missing. A data config
    # with neither (data=file alone) keeps data.path missing and fails below, naming the key.
    data = dcfg.get("data") if "data" in dcfg else None
    if data is not None and OmegaConf.is_missing(data, "path") and data.get("datasets"):
        with open_dict(data):
            data.path = None
    return dcfg


def search_dirs(overrides: Sequence[str]) -> list[Path]:
    """The config folders a ``hydra.searchpath=[...]`` override adds (``file://`` entries and plain paths; a
    ``pkg://`` entry names an installed package's configs and is left to Hydra)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for ov in overrides:
        if ov.split("=", 1)[0].lstrip("+") == "hydra.searchpath":
            value = OverridesParser.create().parse_override(ov.lstrip("+")).value()
            entries = value if isinstance(value, list) else [value]
            return [
                Path(str(e).removeprefix("file://"))
                for e in entries
                if "://" not in str(e) or str(e).startswith("file://")
            ]
    return []


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _unwrap(t: Any) -> Any:
    """``X | None`` -> ``X``."""
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return t


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a schema (``data.datasets.<name>.path`` style for dict values)."""
    out = []
    for name, t in typing.get_type_hints(cls).items():
        t = _unwrap(t)
        key = f"{prefix}{name}"
        out.append(key)
        if dataclasses.is_dataclass(t):
            out += schema_keys(t, key + ".")
        elif typing.get_origin(t) is dict and dataclasses.is_dataclass(typing.get_args(t)[1]):
            out += schema_keys(typing.get_args(t)[1], key + ".<name>.")
    return out


def _schema_has(cls: type, parts: list[str]) -> bool:
    t: Any = cls
    for part in parts:
        t = _unwrap(t)
        if dataclasses.is_dataclass(t):
            hints = typing.get_type_hints(t)
            if part not in hints:
                return False
            t = hints[part]
        elif typing.get_origin(t) is dict:
            t = typing.get_args(t)[1]  # any name: a new dataset of data.datasets
        else:
            return t is Any  # a leaf value has no keys below it
    return True


def check_overrides(config_name: str, overrides: Sequence[str]) -> None:
    """Raise :class:`ConfigError` for ``+key=`` / ``++key=`` naming a key that ``config_name``'s schema lacks.

    Hydra adds such a key to the config, where nothing reads it: ``+trainer.lr_lmm=1e-5`` would train at the
    default learning rate. The schema's only open keys are the dataset names of ``data.datasets``.
    """
    schema = COMMAND_SCHEMAS.get(config_name)
    if schema is None:
        return
    folders = [Path(CONFIG_DIR), *(d for d in search_dirs(overrides) if d.is_dir())]
    groups = {p.name for folder in folders for p in folder.iterdir() if p.is_dir()}
    for ov in overrides:
        if not ov.startswith("+") or "=" not in ov or ov.lstrip("+").startswith("hydra"):
            continue
        key = ov.split("=", 1)[0].lstrip("+")
        if "@" in key or "/" in key or key in groups:
            continue  # a config group (+group=option), not a key
        if _schema_has(schema, key.split(".")):
            continue
        known = [k for k in schema_keys(schema) if "<name>" not in k]
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}=...? " if close else ""
        raise ConfigError(
            f"{ov.split('=', 1)[0]}: no such key in the {config_name} config ({hint}a key the schema lacks would "
            f"be added and never read; docs/config.md lists every key). Set existing keys without '+'"
        )


def compose_stage(
    stage: str,
    overrides: Sequence[str],
    output_dir: Any = None,
    init_from: str | None = None,
    *,
    config_name: str = "train",
) -> Any:
    """``configs/<config_name>.yaml`` for ``stage`` with ``overrides`` (a ``stage=`` among them is replaced), in
    run directory ``output_dir`` when given and, when given, initialised from ``init_from`` (which then replaces
    any ``init_from`` / ``model.init_kind`` override): the config the pipeline runs for each stage."""
    drop = ("stage",) if output_dir is None else ("stage", "output_dir")
    ov = [o for o in overrides if _key(o) not in drop] + [f"stage={stage}"]
    if output_dir is not None:
        ov.append(f"output_dir={output_dir}")
    if init_from is not None:
        ov = [o for o in ov if _key(o) not in ("init_from", "model.init_kind", "model.init_from")]
        ov += [f"init_from={init_from}", "model.init_kind=auto"]
    return compose(config_name, ov)


# ----------------------------------------------------------------------------------------------------------------
# Which weights meet which preset
# ----------------------------------------------------------------------------------------------------------------

# Overrides that bring weights (not a preset's random init); each needs the preset that fits them.
_WEIGHT_KEYS = ("init_from", "model.init_from", "model.vision_from", "model.llm_from")


def missing_model_choice(overrides: Sequence[str]) -> str | None:
    """The override that brings weights (or ``stage=finetune``) when the command line names no ``model=``; None when
    a ``model=`` is given or nothing needs one.

    Without ``model=`` the tiny preset applies, whose learning-rate scaling (``trainer.lr_scale=300``,
    ``lr_max=0.01``), 10 epochs and small budgets are for random tiny weights, never for a real checkpoint.
    """
    keys = {_key(o): o for o in overrides if "=" in o}
    if "model" in keys:
        return None
    for k in _WEIGHT_KEYS:
        if k in keys and keys[k].split("=", 1)[1] not in ("", "null"):
            return keys[k]
    if keys.get("model.init_kind", "=auto").split("=", 1)[1] in ("assemble", "native", "official"):
        return keys["model.init_kind"]
    if "stage" in keys and keys["stage"].split("=", 1)[1] == "finetune":
        return keys["stage"]
    return None
