"""Chain the stages, each stage's export initialising the next.

    python -m videollama3_train.pipeline model=tiny data=sample output_dir=outputs/pipeline
    python -m videollama3_train.pipeline model=videollama3_2b data=my_mix output_dir=O stages=[multitask_sft,video_finetune]

A leaf: Hydra composes ``configs/pipeline.yaml`` (the train config plus ``stages``) and
:func:`videollama3_train.run.run_pipeline` runs every stage exactly as ``train stage=S <your overrides>
output_dir=O/<n>_<S> init_from=<previous export>`` would. Rerun the same command after a crash to resume.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from videollama3_train.config import CONFIG_DIR, register_configs
from videollama3_train.run import run_pipeline

register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="pipeline")
def main(dcfg) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_pipeline(OmegaConf.to_object(dcfg), list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
