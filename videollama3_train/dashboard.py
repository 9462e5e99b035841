"""What the W&B dashboard shows beyond scalars: prediction tables with media thumbnails, built from the evaluation
results (``evaluate.evaluate_heldout``, ``benchmark.score_benchmark``) for ``MetricsWriter.log_table``.

A thumbnail is an RGB array: an image scaled to :data:`THUMB_HEIGHT` pixels high, a video as a strip of
:data:`THUMB_FRAMES` frames evenly spaced over its clip (``start``/``end``), several images of one record side by
side. A medium that cannot be read gets no thumbnail (the row stays: a table never loses a prediction).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

THUMB_HEIGHT = 96  # pixels: enough to see what the question is about, small in the run's files
THUMB_FRAMES = 4  # frames of a video in its strip

HELDOUT_COLUMNS = ["media", "task", "modality", "prompt", "reference", "prediction", "correct"]
BENCHMARK_COLUMNS = ["media", "task", "prompt", "reference", "prediction", "letter", "correct"]


def _scaled(frame: np.ndarray, height: int = THUMB_HEIGHT) -> np.ndarray:
    from PIL import Image

    h, w = frame.shape[:2]
    width = max(1, round(w * height / h))
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BILINEAR))


def thumbnail(root: str | Path, items: list[dict[str, Any]]) -> np.ndarray | None:
    """One RGB strip for a record's media ``items`` (``{"type", "path", "start", "end"}``) under ``root``."""
    from .data import media
    from .data.errors import DataError

    parts = []
    try:
        for it in items:
            paths = it["path"] if isinstance(it["path"], list) else [it["path"]]
            if it["type"] == "image" or len(paths) > 1:  # an image, or a video given frame by frame
                for rel in paths[:THUMB_FRAMES]:
                    img = media.load_image(media.resolve_media_path(root, rel))
                    parts.append(_scaled(np.asarray(img)))
                continue
            p = media.resolve_media_path(root, paths[0])
            info = media.probe_video(p)
            start = it.get("start") or 0.0
            end = it.get("end") if it.get("end") is not None else info.duration
            times = [start + (end - start) * (i + 0.5) / THUMB_FRAMES for i in range(THUMB_FRAMES)]
            frames, _ = media.decode_video(p, times, info=info)
            parts += [_scaled(f) for f in frames]
    except (DataError, OSError, ValueError) as e:
        log.warning("no thumbnail for %s: %s", [it.get("path") for it in items], e)
        return None
    return np.concatenate(parts, axis=1) if parts else None


def heldout_rows(res: dict[str, Any], root: str | Path) -> list[list[Any]]:
    """Rows of :data:`HELDOUT_COLUMNS`, one per held-out prediction."""
    return [
        [
            thumbnail(root, p["media"]) if p["media"] else None,
            p["task"],
            p["modality"],
            p["prompt"],
            p["reference"],
            p["generated"],
            p["correct"],
        ]
        for p in res.get("predictions", [])
    ]


def benchmark_rows(res: dict[str, Any], root: str | Path) -> list[list[Any]]:
    """Rows of :data:`BENCHMARK_COLUMNS`, one per benchmark question."""
    rows = []
    for p in res.get("predictions", []):
        items = [{"type": p["kind"], "path": p["media"], "start": p.get("start"), "end": p.get("end")}]
        rows.append(
            [
                thumbnail(root, items) if p["media"] else None,
                p["task"],
                p["prompt"],
                p["reference"],
                p["generated"],
                p["letter"],
                p["correct"],
            ]
        )
    return rows


def log_heldout(writer, res: dict[str, Any], data_cfg, step: int) -> None:
    """One held-out evaluation on the dashboard: accuracy per task against the step, and (with W&B on) the table
    of every prediction with its media thumbnail (media under ``data.heldout_root``, else the file's folder)."""
    writer.log(step, {f"eval/heldout_accuracy/task/{t}": a for t, a in res["accuracy_per_task"].items()})
    if writer.wandb_run is not None:
        root = data_cfg.heldout_root or str(Path(data_cfg.heldout_path).parent)
        writer.log_table("eval/predictions", HELDOUT_COLUMNS, heldout_rows(res, root), step)


def benchmark_scalars(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``bench/<name>/accuracy`` (and per task) for metrics.jsonl and W&B."""
    out = {}
    for name, r in results.items():
        if r["accuracy"] is not None:
            out[f"bench/{name}/accuracy"] = r["accuracy"]
        out.update({f"bench/{name}/accuracy/{t}": a for t, a in r["accuracy_per_task"].items()})
    return out


def log_benchmarks(writer, results: dict[str, dict[str, Any]], roots: dict[str, str], step: int) -> None:
    """One benchmark evaluation: ``bench/<name>/accuracy`` (and per task) against the step; with W&B on, a
    predictions table per benchmark."""
    writer.log(step, benchmark_scalars(results))
    if writer.wandb_run is not None:
        for name, res in results.items():
            writer.log_table(
                f"bench/{name}/predictions", BENCHMARK_COLUMNS, benchmark_rows(res, roots[name]), step
            )


__all__ = [
    "benchmark_scalars",
    "BENCHMARK_COLUMNS",
    "HELDOUT_COLUMNS",
    "THUMB_FRAMES",
    "THUMB_HEIGHT",
    "benchmark_rows",
    "heldout_rows",
    "log_benchmarks",
    "log_heldout",
    "thumbnail",
]
