"""Chain the stages, each stage's export initialising the next.

    vl3-pipeline model=tiny data=sample output_dir=outputs/pipeline
    vl3-pipeline model=videollama3_2b data=my_mix output_dir=O stages=[multitask_sft,video_finetune]

A leaf: ``cli.main`` composes ``configs/pipeline.yaml`` (the train config plus ``stages``) and
:func:`videollama3_train.run.run_pipeline` runs every stage exactly as ``train stage=S <your overrides>
output_dir=O/<n>_<S> init_from=<previous export>`` would. Rerun the same command after a crash to resume.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from videollama3_train.cli import Command
from videollama3_train.cli import main as _cli_main


def _run(cfg, overrides: list[str]) -> int:
    from videollama3_train.run import pipeline_command

    return pipeline_command(cfg, overrides)


COMMAND = Command(
    name="pipeline",
    summary=(
        "Run stages in order in one process, each initialised from the previous stage's export/, in run\n"
        "directories output_dir/<n>_<stage>; every stage is composed (and checked) before the first one trains.\n"
        "Finished stages are skipped, an interrupted one resumes. Writes output_dir/summary.md and loss.png."
    ),
    keys="""
output_dir=DIR          root of the stage run directories (required)
stages=[a,b,...]        stages to chain (default: encoder_adaptation, alignment, multitask_sft, video_finetune)
model=NAME              tiny (default) | videollama3_2b | videollama3_7b; required with init_from / assemble
data=NAME               sample (default) | file (with data.path=... data.root=...) | your mixture
any train key           applied to every stage (trainer.epochs=1, logger=disabled, ...); stage= is refused""",
    examples=(
        "vl3-pipeline model=tiny data=sample output_dir=outputs/pipeline",
        "vl3-pipeline model=videollama3_2b data=my_mix init_from=/ckpt/s2/export output_dir=outputs/2b "
        "stages=[multitask_sft,video_finetune]",
    ),
    run=_run,
    needs_model_choice=True,
)


def main(argv: Sequence[str] | None = None) -> int:
    return _cli_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
