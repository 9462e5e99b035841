"""Decode every video of a data mixture once and fill the frame cache that training then reads.

    vl3-prepare data=file data.path=A.jsonl data.root=MEDIA encode.frame_cache_dir=/fast/cache
    vl3-prepare data=my_mix stage=video_finetune model=videollama3_2b \
        encode.frame_cache_dir=/fast/cache prepare.workers=8

A leaf: ``cli.main`` composes ``configs/prepare.yaml`` -- the train config, so the frames sampled and their sizes
match what the stage will ask the cache for -- and :func:`videollama3_train.data.prepare.prepare_data` fills
``encode.frame_cache_dir`` (pass the same key to training). Prints the counts as JSON; logs to ``prepare.log`` in
``output_dir`` (default: the cache folder).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from videollama3_train.cli import Command
from videollama3_train.cli import main as _cli_main


def _run(cfg, overrides: list[str]) -> int:
    from videollama3_train.offline import prepare_command

    return prepare_command(cfg)


COMMAND = Command(
    name="prepare",
    summary=(
        "Decode every video of a data mixture once, at the frames and sizes the stage will sample, into a frame\n"
        "cache that training then reads instead of decoding (pass the same encode.frame_cache_dir to training).\n"
        "Prints the counts as JSON; logs to prepare.log in output_dir (default: the cache folder)."
    ),
    keys="""
encode.frame_cache_dir=DIR   the cache (required)
data=NAME                    sample (default) | file (with data.path=... data.root=...) | your mixture
stage=NAME model=NAME        the stage and preset the cache is for (their fps, frame caps and budgets)
prepare.workers=N            decoding processes; prepare.max_pixels_per_frame=P caps every stored frame""",
    examples=(
        "vl3-prepare data=file data.path=/data/my/train.jsonl data.root=/data/my/media encode.frame_cache_dir=/fast/c",
        "vl3-prepare data=my_mix stage=video_finetune model=videollama3_2b encode.frame_cache_dir=/fast/c "
        "prepare.workers=8",
    ),
    run=_run,
    needs_model_choice=True,
)


def main(argv: Sequence[str] | None = None) -> int:
    return _cli_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
