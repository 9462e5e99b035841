"""Write ``summary.md`` and ``loss.png`` for a chain of stage runs (the pipeline writes them itself).

    python -m videollama3_train.report outputs/2b                                  # ROOT/<stage> for the four stages
    python -m videollama3_train.report outputs/2b alignment multitask_sft

A leaf: it reads run directories and calls :func:`videollama3_train.reports.write_summary`. It takes no run config,
only folder names, so it has plain positional arguments instead of Hydra overrides.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .contract import STAGES
from .reports import write_summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write summary.md and loss.png for a chain of stage runs.")
    parser.add_argument(
        "root", type=Path, help="folder holding one run directory per stage; the report goes here"
    )
    parser.add_argument(
        "stages", nargs="*", default=list(STAGES), help=f"stage folder names (default: {STAGES})"
    )
    args = parser.parse_args(argv)
    md, png = write_summary(args.root, [{"name": s, "output_dir": str(args.root / s)} for s in args.stages])
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
