"""Write ``summary.md`` and ``loss.png`` for a chain of stage runs (the pipeline writes them itself).

    vl3-report root=outputs/2b                                  # root/<stage>, or the pipeline's root/<n>_<stage>
    vl3-report root=outputs/2b stages=[alignment,multitask_sft]

A leaf: ``cli.main`` composes ``configs/report.yaml`` and :func:`videollama3_train.reports.write_summary` reads
the run directories.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from videollama3_train.cli import Command
from videollama3_train.cli import main as _cli_main


def _run(cfg, overrides: list[str]) -> int:
    from videollama3_train.offline import report_command

    return report_command(cfg)


COMMAND = Command(
    name="report",
    summary=(
        "Write summary.md (steps, losses, held-out accuracy per stage) and loss.png (every stage's loss on one\n"
        "timeline) for a chain of stage run directories; the pipeline and launch/run_stages.sh write them too."
    ),
    keys="""
root=DIR                folder holding one run directory per stage (required); the report goes here
stages=[a,b,...]        run directories under root, in order (default: the four stage names, else the
                        pipeline's <n>_<stage> folders)""",
    examples=(
        "vl3-report root=outputs/2b",
        "vl3-report root=outputs/2b stages=[alignment,multitask_sft]",
    ),
    run=_run,
    path_key="root",
)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and not any("=" in a or a.startswith("-") for a in args):
        # the older positional form ROOT [RUN_DIR ...]: the same as root=ROOT stages=[RUN_DIR,...]
        args = [f"root={args[0]}"] + ([f"stages=[{','.join(args[1:])}]"] if args[1:] else [])
    return _cli_main(COMMAND, args)


if __name__ == "__main__":
    sys.exit(main())
