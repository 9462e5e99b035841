"""Train one stage.

    vl3-train stage=multitask_sft model=tiny data=sample output_dir=outputs/sft
    vl3-train stage=video_finetune model=videollama3_2b data=file \
        data.path=ANNOTATIONS data.root=MEDIA init_from=outputs/sft/export output_dir=outputs/ft

A leaf: ``cli.main`` composes ``configs/train.yaml`` with the overrides into a
:class:`~videollama3_train.config.RunConfig` and :func:`videollama3_train.run.run_stage` does the rest (checks ->
data -> model -> fit -> checkpoints -> ``<output_dir>/export``). Runs the same under ``torchrun`` / ``deepspeed`` /
``accelerate launch``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from videollama3_train.cli import Command
from videollama3_train.cli import main as _cli_main


def _run(cfg, overrides: list[str]) -> int:
    from videollama3_train.run import train_command

    return train_command(cfg)


COMMAND = Command(
    name="train",
    summary=(
        "Train one stage: check the config, paths, data and run directory; pack the data; train; write checkpoints\n"
        "and a transformers-native <output_dir>/export. Rerun the same command to resume an interrupted run; a\n"
        "finished run says so and changes nothing. Same command under torchrun / deepspeed / accelerate launch."
    ),
    keys="""
output_dir=DIR          the run directory (required); belongs to one stage, model and data (run.json)
stage=NAME              encoder_adaptation | alignment | multitask_sft (default) | video_finetune | finetune
model=NAME              tiny (default: random tiny weights) | videollama3_2b | videollama3_7b;
                        required with init_from / model.init_kind=assemble / stage=finetune
init_from=DIR           start from a checkpoint (a stage's export/, a released native or official directory)
data=NAME               sample (default) | file (with data.path=ANNOTATIONS data.root=MEDIA) | your mixture
trainer.max_steps=N     optimizer steps (-1 = trainer.epochs epochs); trainer.backend=ddp|zero1|zero2|zero3|fsdp2
reschedule=true         resume although the schedule's length changed (rebuilds the lr schedule), or train a
                        finished run on to a raised trainer.max_steps
logger=NAME             offline (default) | online | disabled (W&B)""",
    examples=(
        "vl3-train stage=multitask_sft model=tiny data=sample output_dir=outputs/sft",
        "vl3-train stage=finetune model=videollama3_2b init_from=/ckpt/VideoLLaMA3-2B-HF data=file "
        "data.path=/data/my/train.jsonl data.root=/data/my/media output_dir=outputs/ft",
    ),
    run=_run,
    needs_model_choice=True,
)


def main(argv: Sequence[str] | None = None) -> int:
    return _cli_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
