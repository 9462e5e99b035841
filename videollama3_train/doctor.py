"""Check every record of a data mixture before training, and say what training will make of it (docs/doctor.md).

    python -m videollama3_train.doctor data=my_mix output_dir=outputs/doctor
    python -m videollama3_train.doctor data=file data.path=A.jsonl data.root=MEDIA output_dir=O \
        stage=video_finetune model=videollama3_2b doctor.workers=8 doctor.max_failure_rate=0.01

A leaf: Hydra composes ``configs/doctor.yaml`` (the train config plus ``doctor.*``) and
:func:`videollama3_train.run.run_doctor` scans every record, writes ``report.json``, ``report.md`` and PNG
histograms to ``output_dir``. Exit status 2 when a dataset's share of bad records exceeds
``doctor.max_failure_rate`` (default: training's own ``data.max_bad_fraction``), else 0.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from videollama3_train.config import CONFIG_DIR, register_configs
from videollama3_train.run import run_doctor

register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="doctor")
def main(dcfg) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run_doctor(OmegaConf.to_object(dcfg), list(HydraConfig.get().overrides.task)))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
