"""Decode every video of a data mixture once and fill the frame cache that training then reads.

    python -m videollama3_train.prepare data=file data.path=A.jsonl data.root=MEDIA encode.frame_cache_dir=/fast/cache
    python -m videollama3_train.prepare data=my_mix stage=video_finetune model=videollama3_2b \
        encode.frame_cache_dir=/fast/cache prepare.workers=8

A leaf: Hydra composes ``configs/prepare.yaml`` -- the train config, so the frames sampled and their sizes match what
the stage will ask the cache for -- and :func:`videollama3_train.data.prepare.prepare_data` fills
``encode.frame_cache_dir`` (pass the same key to training). Prints the counts as JSON.
"""

from __future__ import annotations

import json
import logging
import sys

import hydra
from omegaconf import OmegaConf

from videollama3_train.config import CONFIG_DIR, register_configs
from videollama3_train.data.prepare import prepare_data

register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
def main(dcfg) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = OmegaConf.to_object(dcfg)
    opts = cfg.prepare
    counts = prepare_data(
        cfg.data, cfg.encode, workers=opts.workers, max_pixels_per_frame=opts.max_pixels_per_frame
    )
    print(json.dumps(counts, indent=2, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
