"""Train one stage.

    python -m videollama3_train.train stage=multitask_sft model=tiny data=sample output_dir=outputs/sft
    python -m videollama3_train.train stage=video_finetune model=videollama3_2b data=file \
        data.path=ANNOTATIONS data.root=MEDIA init_from=outputs/sft/export output_dir=outputs/ft

A leaf: Hydra composes ``configs/train.yaml`` with the overrides into a :class:`~videollama3_train.config.RunConfig`
and :func:`videollama3_train.run.run_stage` does the rest (data -> fit -> checkpoints -> ``<output_dir>/export``).
Runs the same under ``torchrun`` / ``deepspeed`` / ``accelerate launch``.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import OmegaConf

from videollama3_train.config import CONFIG_DIR, register_configs
from videollama3_train.run import run_stage

register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(dcfg) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_stage(OmegaConf.to_object(dcfg))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
