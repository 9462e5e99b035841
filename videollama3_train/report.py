"""End-of-pipeline report: ``summary.md`` (a table per stage) and ``loss.png`` (every stage on one timeline).

Inputs are each stage's ``metrics.jsonl`` as written by ``trainer.metrics.RunLogger``: one JSON object per
optimizer step with ``step`` and scalar metrics (``loss``, ``grad_norm``, ``tokens_per_s``, ``mfu``,
``loss/modality/<text|image|video>``, ``loss/dataset/<name>``, ``lr/<group>`` ...). Any key may be missing on a
given step (a modality absent from a step has no loss there). Figures are drawn with matplotlib's Agg canvas
directly, never through ``pyplot``, so the report neither needs a display nor changes the caller's backend.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODALITY_PREFIX = "loss/modality/"
DATASET_PREFIX = "loss/dataset/"
TAIL_STEPS = 10  # the "final loss" is the mean over this many last steps: one step's loss is noisy
ACCURACY_KEYS = ("accuracy_before", "accuracy_after", "chance_accuracy")
STAGES = ("encoder_adaptation", "alignment", "multitask_sft", "video_finetune")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl``, sorted by step; a step logged twice (resume replay) keeps its last row."""
    rows: dict[int, dict[str, Any]] = {}
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from e
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError(f"{path}:{lineno}: every line needs a 'step' key, got {line.strip()[:80]!r}")
            rows[int(row["step"])] = row
    return [rows[step] for step in sorted(rows)]


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the rows that have a finite number under ``key``."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(int(row["step"]))
            values.append(float(value))
    return steps, values


def _tail_mean(values: Sequence[float], n: int = TAIL_STEPS) -> float | None:
    return statistics.fmean(values[-n:]) if values else None


def stage_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Numbers of one stage: steps, first / final loss, speed (first step excluded as warm-up), per-modality loss."""
    _, loss = _series(rows, "loss")
    _, tps = _series(rows, "tokens_per_s")
    _, util = _series(rows, "mfu")
    # The first step pays for compilation, allocator warm-up and the first prefetch: not a steady-state speed.
    tps_steady = tps[1:] if len(tps) > 1 else tps
    util_steady = util[1:] if len(util) > 1 else util
    keys = sorted({k for row in rows for k in row if k.startswith(MODALITY_PREFIX)})
    return {
        "steps": len(rows),
        "last_step": int(rows[-1]["step"]) if rows else None,
        "first_loss": loss[0] if loss else None,
        "final_loss": _tail_mean(loss),
        "tokens_per_s_mean": statistics.fmean(tps_steady) if tps_steady else None,
        "mfu_median": statistics.median(util_steady) if util_steady else None,
        "modality_loss": {k[len(MODALITY_PREFIX) :]: _tail_mean(_series(rows, k)[1]) for k in keys},
    }


def _fmt(value: float | int | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _stage_rows(stages: Sequence[Mapping[str, Any]]) -> list[tuple[Mapping[str, Any], list[dict[str, Any]]]]:
    out = []
    for stage in stages:
        if "name" not in stage:
            raise ValueError(f"each stage needs a 'name', got keys {sorted(stage)}")
        if "output_dir" not in stage and "metrics_path" not in stage:
            raise ValueError(f"stage {stage['name']}: give 'output_dir' or 'metrics_path'")
        stage = dict(stage)
        summary_path = Path(stage.get("output_dir", "")) / "summary.json"
        if "output_dir" in stage and summary_path.exists():
            # Accuracies the run recorded itself (RunLogger.summary); values given by the caller win.
            recorded = json.loads(summary_path.read_text(encoding="utf-8"))
            for key in ACCURACY_KEYS:
                if stage.get(key) is None and isinstance(recorded.get(key), (int, float)):
                    stage[key] = recorded[key]
        path = Path(stage.get("metrics_path") or Path(stage["output_dir"]) / "metrics.jsonl")
        if path.exists():
            out.append((stage, read_metrics(path)))
        else:
            # A stage that has not run (or crashed before its first step) is still listed, without numbers.
            log.warning("stage %s: no metrics file at %s", stage["name"], path)
            out.append((stage, []))
    return out


def render_markdown(stages: Sequence[Mapping[str, Any]], per_stage: Sequence[list[dict[str, Any]]]) -> str:
    """The text of ``summary.md`` for ``stages`` and their metric rows."""
    lines = [
        "# Training summary",
        "",
        f"Final loss = mean of the last {TAIL_STEPS} steps. Speed excludes the first step (warm-up). "
        "Accuracy = exact match on the held-out set.",
        "",
        "| stage | steps | first loss | final loss | mean tokens/s | median MFU | accuracy before | "
        "accuracy after | chance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summaries = [stage_summary(rows) for rows in per_stage]
    for stage, s in zip(stages, summaries):
        mfu = s["mfu_median"]
        lines.append(
            f"| {stage['name']} | {s['steps']} | {_fmt(s['first_loss'], '.4f')} | {_fmt(s['final_loss'], '.4f')} "
            f"| {_fmt(s['tokens_per_s_mean'], ',.0f')} | {_fmt(None if mfu is None else 100 * mfu, '.1f')}"
            f"{'%' if mfu is not None else ''} | {_fmt(stage.get('accuracy_before'), '.3f')} "
            f"| {_fmt(stage.get('accuracy_after'), '.3f')} | {_fmt(stage.get('chance_accuracy'), '.3f')} |"
        )
    modalities = sorted({m for s in summaries for m in s["modality_loss"]})
    if modalities:
        lines += [
            "",
            "## Final loss per modality",
            "",
            "| stage | " + " | ".join(modalities) + " |",
            "|---|" + "---|" * len(modalities),
        ]
        for stage, s in zip(stages, summaries):
            cells = [_fmt(s["modality_loss"].get(m), ".4f") for m in modalities]
            lines.append(f"| {stage['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_losses(
    stages: Sequence[Mapping[str, Any]], per_stage: Sequence[list[dict[str, Any]]], path: str | os.PathLike
) -> Path:
    """Draw ``loss.png``: total loss (top) and per-modality losses (bottom), stages one after another in x."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.5), dpi=110)
    FigureCanvasAgg(fig)
    ax_total, ax_mod = fig.subplots(2, 1, sharex=True)
    modalities = sorted(
        {k for rows in per_stage for row in rows for k in row if k.startswith(MODALITY_PREFIX)}
    )
    mod_colours = {k: f"C{i}" for i, k in enumerate(modalities)}
    offset = 0
    labelled: set[str] = set()
    for i, (stage, rows) in enumerate(zip(stages, per_stage)):
        if not rows:
            continue
        # Each stage restarts its step counter; shift it so stages follow each other on one timeline.
        first = int(rows[0]["step"])
        steps, loss = _series(rows, "loss")
        ax_total.plot([offset + s - first for s in steps], loss, color=f"C{i}", lw=1.2, label=stage["name"])
        for key in modalities:
            steps, values = _series(rows, key)
            if steps:
                label = key[len(MODALITY_PREFIX) :] if key not in labelled else None
                labelled.add(key)
                x = [offset + s - first for s in steps]
                ax_mod.plot(x, values, color=mod_colours[key], lw=1.0, label=label)
        end = offset + int(rows[-1]["step"]) - first + 1
        for ax in (ax_total, ax_mod):
            ax.axvline(end - 0.5, color="0.6", ls="--", lw=0.8)
        offset = end
    ax_total.set_ylabel("loss")
    ax_total.set_title("Training loss per stage")
    ax_mod.set_ylabel("loss per modality")
    ax_mod.set_xlabel("optimizer step (stages concatenated)")
    for ax in (ax_total, ax_mod):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def write_summary(output_dir: str | os.PathLike, stages: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Write ``<output_dir>/summary.md`` and ``<output_dir>/loss.png`` for ``stages`` in pipeline order.

    Each stage dict has ``name`` and ``output_dir`` (holding ``metrics.jsonl``) or ``metrics_path``; optional
    ``accuracy_before`` / ``accuracy_after`` (held-out exact match in [0, 1]) and ``chance_accuracy``. Missing
    accuracies are read from ``<output_dir>/summary.json`` (same keys) when the run wrote one. Returns
    ``(summary_md_path, loss_png_path)``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = _stage_rows(stages)
    stage_dicts = [stage for stage, _ in loaded]
    per_stage = [rows for _, rows in loaded]
    md_path = out / "summary.md"
    md_path.write_text(render_markdown(stage_dicts, per_stage), encoding="utf-8")
    png_path = plot_losses(stage_dicts, per_stage, out / "loss.png")
    return md_path, png_path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m videollama3_train.report ROOT [STAGE ...]``: report on ``ROOT/<stage>`` run directories."""
    import argparse

    parser = argparse.ArgumentParser(description="Write summary.md and loss.png for a chain of stage runs.")
    parser.add_argument(
        "root", type=Path, help="folder holding one run directory per stage; the report goes here"
    )
    parser.add_argument(
        "stages", nargs="*", default=list(STAGES), help=f"stage folder names (default: {STAGES})"
    )
    args = parser.parse_args(argv)
    stages = [{"name": name, "output_dir": str(args.root / name)} for name in args.stages]
    md, png = write_summary(args.root, stages)
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md} and {png}")
    return 0


__all__ = ["main", "plot_losses", "read_metrics", "render_markdown", "stage_summary", "write_summary"]


if __name__ == "__main__":
    raise SystemExit(main())
