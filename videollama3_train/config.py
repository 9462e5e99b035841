"""The run configuration: one dataclass per component, composed here and registered with Hydra's ConfigStore.

Configs flow one way: YAML (``configs/``) -> these dataclasses (validated in ``__post_init__``) -> ``build_*``
factories -> objects. Every field documents its unit and meaning where it is defined; ``docs/config.md`` lists them
all. Because the schema is structured, a misspelt key or a wrong type stops Hydra at start with the key's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .contract import STAGES
from .data.config import DataConfig, EncodeConfig
from .model.core import ModelConfig
from .trainer.config import TrainConfig

# Named recipes outside the four-stage chain: fine-tuning a released checkpoint on one's own data.
EXTRA_STAGES = ("finetune",)


@dataclass
class LoggerConfig:
    wandb: str = "offline"  # W&B mode: online | offline | disabled
    project: str = "videollama3-train"  # W&B project
    run_name: str | None = None  # W&B run name; None = <stage>-<output_dir name>

    def __post_init__(self):
        if self.wandb not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.wandb must be online, offline or disabled, got {self.wandb!r}")


@dataclass
class EvalConfig:
    every: int = 0  # optimizer steps between held-out evaluations (0 = only before and after the stage)
    max_new_tokens: int = 8  # generation length for held-out accuracy
    log_generations: int = 4  # generations written to the log per evaluation
    before: bool = True  # evaluate before training starts (baseline accuracy)


@dataclass
class LoraConfig:
    enabled: bool = False  # train LoRA adapters instead of full weights (merged on export)
    r: int = 16  # adapter rank
    alpha: int = 32  # adapter scale numerator (scale = alpha / r)
    dropout: float = 0.05  # adapter dropout probability
    vision: bool = False  # also put adapters on the vision tower's linear layers


@dataclass
class RunConfig:
    stage: str = "multitask_sft"  # one of the four stage names, or 'custom'
    output_dir: str = "???"  # run directory (checkpoints, export/, metrics, resolved config)
    init_from: str | None = None  # shorthand for model.init_from (e.g. the previous stage's export/)
    lr_scale: float = 1.0  # multiplies every group's learning rate (presets for random weights raise it)
    lr_max: float | None = None  # upper bound on every scaled learning rate (None = no bound)
    model: ModelConfig = field(default_factory=ModelConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(path="data/sample/train.jsonl"))
    trainer: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        if self.stage not in (*STAGES, *EXTRA_STAGES, "custom"):
            raise ValueError(
                f"stage must be one of {[*STAGES, *EXTRA_STAGES]} or 'custom', got {self.stage!r}"
            )
        if not self.lr_scale > 0:
            raise ValueError(f"lr_scale must be positive, got {self.lr_scale}")

    @property
    def lrs(self) -> dict[str, float | None]:
        """Learning rate per group after ``lr_scale`` and ``lr_max``."""
        out = {}
        for g, lr in self.trainer.lrs.items():
            if lr is not None:
                lr = lr * self.lr_scale
                if self.lr_max is not None:
                    lr = min(lr, self.lr_max)
            out[g] = lr
        return out


@dataclass
class PipelineConfig(RunConfig):
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # stages to chain, in order


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(name="pipeline_schema", node=PipelineConfig)
