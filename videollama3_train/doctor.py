"""Check every record of a data mixture before training, and say what training will make of it (docs/doctor.md).

    vl3-doctor data=my_mix output_dir=outputs/doctor
    vl3-doctor data=file data.path=A.jsonl data.root=MEDIA output_dir=O \
        stage=video_finetune model=videollama3_2b doctor.workers=8 doctor.max_failure_rate=0.01

A leaf: ``cli.main`` composes ``configs/doctor.yaml`` (the train config plus ``doctor.*``) and
:func:`videollama3_train.offline.run_doctor` scans every record, writes ``report.json``, ``report.md``, PNG histograms
and ``doctor.log`` to ``output_dir``. Exit status 2 when a dataset's share of bad records exceeds
``doctor.max_failure_rate`` (default: training's own ``data.max_bad_fraction``), else 0.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from videollama3_train.cli import Command
from videollama3_train.cli import main as _cli_main


def _run(cfg, overrides: list[str]) -> int:
    from videollama3_train.offline import run_doctor

    return run_doctor(cfg, overrides)


COMMAND = Command(
    name="doctor",
    summary=(
        "Check every record of a data mixture before training: schema, media files (opened and decoded), the\n"
        "tokens and patches of each stage; report per failure reason and the packing estimate (steps per epoch).\n"
        "Writes report.json, report.md, histograms and doctor.log to output_dir. Exit status 2 when a dataset's\n"
        "share of bad records exceeds doctor.max_failure_rate (default: data.max_bad_fraction), 1 on a mistake."
    ),
    keys="""
output_dir=DIR          where the report goes (required)
data=NAME               sample (default) | file (with data.path=ANNOTATIONS data.root=MEDIA) | your mixture
stage=NAME model=NAME   the encode settings and budgets to check against (as for train)
doctor.workers=N        scanning processes; doctor.max_failure_rate=F; doctor.stages=[...] (packing estimate)""",
    examples=(
        "vl3-doctor data=file data.path=/data/my/train.jsonl data.root=/data/my/media output_dir=outputs/doctor",
        "vl3-doctor data=my_mix stage=video_finetune model=videollama3_2b doctor.workers=8 output_dir=outputs/doc",
    ),
    run=_run,
    needs_model_choice=True,
)


def main(argv: Sequence[str] | None = None) -> int:
    return _cli_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
