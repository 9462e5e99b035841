"""B7: does the ``tiny`` preset generalise motion? The four-stage pipeline on the motion set, held-out per task.

    nice -n 10 python benchmarks/bench_generalisation.py                  # seed 0, ~7 min on 2 cores
    python benchmarks/bench_generalisation.py --seed 1 --out outputs/b7_seed1
    python benchmarks/bench_generalisation.py -- trainer.epochs=5       # any pipeline override (experiments)

Generates the motion set (``data/generate_motion.py``: a square moving left / right / up / down, mixed with image
and text tasks; held-out clips are new draws, never training clips), runs ``pipeline model=tiny`` on it with no
override besides the data paths (and the held-out size, so every held-out record is scored; no W&B), and prints
the final model's held-out exact-match accuracy per task beside each task's majority-answer baseline (the same metric for
always giving the task's most frequent training answer), the margin, and the wall time. The number this exists
for: ``motion`` accuracy - baseline (the goal is >= 0.4). Results: BENCHMARKS.md (B7).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(out: Path, seed: int, n_train: int, n_heldout: int, overrides: list[str]) -> dict:
    data = out / "data"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "data" / "generate_motion.py"),
            f"--out={data}",
            f"--seed={seed}",
            f"--train={n_train}",
            f"--heldout={n_heldout}",
        ],
        check=True,
    )
    command = [
        sys.executable,
        "-m",
        "videollama3_train.pipeline",
        "model=tiny",
        "data=file",
        f"data.path={data / 'train.jsonl'}",
        f"data.root={data}",
        f"+data.heldout_path={data / 'heldout.jsonl'}",
        f"+data.heldout_root={data}",
        f"data.heldout_max_samples={n_heldout}",
        f"output_dir={out / 'run'}",
        "logger=disabled",
        *overrides,
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
    start = time.perf_counter()
    with (out / "pipeline.log").open("w") as log:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"pipeline failed (exit {proc.returncode}); see {out / 'pipeline.log'}")
    last = sorted((out / "run").glob("[0-9]_*"))[-1]
    result = json.loads((last / "results.json").read_text())["heldout_after"]
    return {"command": command, "wall_s": wall, "stage": last.name, "result": result}


def table(res: dict) -> str:
    r = res["result"]
    lines = ["| task | n | accuracy | baseline | accuracy - baseline |", "|---|---|---|---|---|"]
    for task in sorted(r["accuracy_per_task"], key=lambda t: (t != "motion", t)):
        acc, base = r["accuracy_per_task"][task], r["baseline_per_task"].get(task) or 0.0
        lines.append(f"| {task} | {r['n_per_task'][task]} | {acc:.3f} | {base:.3f} | {acc - base:+.3f} |")
    lines.append(
        f"| all | {r['n']} | {r['accuracy']:.3f} | {r['baseline'] or 0:.3f} | {r['accuracy'] - (r['baseline'] or 0):+.3f} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_generalisation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the motion set")
    parser.add_argument("--train", type=int, default=800, help="training records")
    parser.add_argument("--heldout", type=int, default=100, help="held-out records (all are scored)")
    parser.add_argument("overrides", nargs="*", help="pipeline overrides after `--` (experiments only)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    res = run(args.out, args.seed, args.train, args.heldout, args.overrides)
    shown = " ".join(c for c in res["command"][2:] if not c.startswith(("data.", "+data.", "output_dir")))
    print(
        f"B7 motion generalisation: seed {args.seed}, {args.train} train / {args.heldout} held-out records, "
        f"`{shown}`, final stage {res['stage']}, {res['wall_s'] / 60:.1f} min wall, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), {datetime.date.today()}\n"
    )
    print(table(res))
    (args.out / "b7.json").write_text(json.dumps({**res, "seed": args.seed}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
