"""Export a training checkpoint to a transformers-native directory.

    vl3-export checkpoint=outputs/sft/checkpoints/step-00001000 output=outputs/sft/hf
    vl3-export checkpoint=outputs/sft output=outputs/sft/hf   # newest complete checkpoint

A leaf: ``cli.main`` composes ``configs/export.yaml`` and :func:`videollama3_train.offline.export_checkpoint` writes
the directory, which loads offline with ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained``. Every
stage already ends with such an export in ``<output_dir>/export``; this command is for intermediate checkpoints.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from videollama3_train.cli import Command
from videollama3_train.cli import main as _cli_main


def _run(cfg, overrides: list[str]) -> int:
    from videollama3_train.offline import export_command

    return export_command(cfg)


COMMAND = Command(
    name="export",
    summary=(
        "Export a training checkpoint (intermediate or final) to a transformers-native directory that loads\n"
        "offline with AutoModelForImageTextToText / AutoProcessor. Weights are float32 like a stage's own export/\n"
        "unless dtype= says otherwise. Logs to export.log in the checkpoint's run directory."
    ),
    keys="""
checkpoint=DIR          a run directory (its newest complete checkpoint) or its checkpoints/step-XXXXXXXX
output=DIR              the directory to write (atomically)
dtype=NAME              float32 (default) | bfloat16 | float16
max_shard_size=SIZE     largest safetensors file (5GB)""",
    examples=(
        "vl3-export checkpoint=outputs/sft output=outputs/sft/hf",
        "vl3-export checkpoint=outputs/sft/checkpoints/step-00001000 output=/models/sft-1000 dtype=bfloat16",
    ),
    run=_run,
    path_key="checkpoint",
)


def main(argv: Sequence[str] | None = None) -> int:
    return _cli_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
