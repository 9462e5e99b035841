"""Export a training checkpoint to a transformers-native directory.

    python -m videollama3_train.export checkpoint=outputs/sft/checkpoints/step-00001000 output=outputs/sft/hf
    python -m videollama3_train.export checkpoint=outputs/sft output=outputs/sft/hf   # newest complete checkpoint

The result loads offline with ``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor.from_pretrained``.
Every stage already ends with such an export in ``<output_dir>/export``; this command is for intermediate
checkpoints. Weights are read through safetensors only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class ExportConfig:
    checkpoint: str = (
        "???"  # a checkpoint directory (step-XXXXXXXX) or a run directory (its newest complete one)
    )
    output: str = "???"  # target directory (written atomically)
    dtype: str = "bfloat16"  # dtype of the saved weights: bfloat16 | float16 | float32
    max_shard_size: str = "5GB"  # safetensors shard size


def resolve_checkpoint(path: str | Path) -> Path:
    from .trainer.checkpoint import find_latest_checkpoint

    p = Path(path)
    if (p / "COMPLETE").is_file():
        return p
    latest = find_latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(f"{p} is neither a complete checkpoint nor a run directory with one")
    return latest


def export_checkpoint(cfg: ExportConfig) -> Path:
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


def main() -> None:
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="export_schema", node=ExportConfig)
    # an export writes nothing but its output: no Hydra run directory in the working directory
    sys.argv += [
        a
        for a in ("hydra.output_subdir=null", "hydra.run.dir=.")
        if a.split("=")[0] not in " ".join(sys.argv)
    ]

    @hydra.main(version_base="1.3", config_path=None, config_name="export_schema")
    def _main(dcfg) -> None:
        out = export_checkpoint(OmegaConf.to_object(dcfg))
        print(f"exported to {out}")

    _main()


if __name__ == "__main__":
    sys.exit(main())
