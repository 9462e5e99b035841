"""Export a training checkpoint to a transformers-native directory.

    python -m videollama3_train.export checkpoint=outputs/sft/checkpoints/step-00001000 output=outputs/sft/hf
    python -m videollama3_train.export checkpoint=outputs/sft output=outputs/sft/hf   # newest complete checkpoint

A leaf: Hydra composes ``configs/export.yaml`` and :func:`videollama3_train.run.export_checkpoint` writes the
directory, which loads offline with ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained``. Every stage
already ends with such an export in ``<output_dir>/export``; this command is for intermediate checkpoints.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import OmegaConf

from videollama3_train.config import CONFIG_DIR, register_configs
from videollama3_train.run import export_checkpoint

register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(dcfg) -> None:
    print(f"exported to {export_checkpoint(OmegaConf.to_object(dcfg))}")


if __name__ == "__main__":
    sys.exit(main())
