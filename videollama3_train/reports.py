"""What a run leaves for people to read: the console story of a stage, the doctor's data report and the pipeline's
training summary.

* :func:`stage_story` -- what a stage is about to do (model, devices, data, global batch, schedule), printed and kept
  in ``train.log``; :func:`heldout_story` -- one held-out evaluation; :func:`done_story` -- where the results went.

* :func:`write_report` -- the doctor's ``report.json``, ``report.md`` (with what to do about each failure reason,
  :data:`REASONS`) and PNG histograms, from the report dict of ``data.scan.scan_data``.
* :func:`write_summary` -- the pipeline's ``summary.md`` (a table per stage) and ``loss.png`` (every stage on one
  timeline), from each stage's ``metrics.jsonl``: one JSON object per optimizer step with ``step`` and scalar metrics
  (``loss``, ``grad_norm``, ``tokens_per_s``, ``mfu``, ``loss/modality/<text|image|video>``,
  ``loss/dataset/<name>``, ``lr/<group>`` ...). Any key may be missing on a given step (a modality absent from a step
  has no loss there).

Figures are drawn with matplotlib's Agg canvas directly, never through ``pyplot``, so a report neither needs a
display nor changes the caller's backend.
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

# ================================================================================================================
# The console story of one stage
# ================================================================================================================


def stage_story(
    cfg, *, device: str, data, dims, heldout: int, schedule: tuple[int, list[int]], resuming: bool
) -> str:
    """The lines a stage prints before it trains: ``cfg`` the stage's ``RunConfig``, ``device`` its
    ``rundir.device_line``, ``data`` the ``DataBundle`` built for it, ``dims`` its ``ParallelDims``, ``heldout``
    the held-out records, ``schedule`` ``(total optimizer steps, steps per epoch)``."""
    say, out_dir, t = f"[{cfg.stage}]", Path(cfg.output_dir), cfg.trainer
    st, rows, n = data.plan_stats, data.rows_per_step, dims.sp_size
    total_steps, steps_per_epoch = schedule
    records = {name: len(r) for name, r in zip(data.names, data.records)}
    unusable = sum(sum(v.values()) for v in data.failures.values())
    weights = cfg.model.init_from or (
        f"assembled from {cfg.model.vision_from} + {cfg.model.llm_from}"
        if cfg.model.init_kind == "assemble"
        else "random weights"
    )
    replicas = "rank(s)" if n == 1 else f"sequence-parallel group(s) of {n} ranks"
    cap = f", capped by trainer.max_steps={t.max_steps}" if t.max_steps > 0 else ""
    lines = [
        f"model {cfg.model.preset} ({weights}) -> output_dir {out_dir.resolve()}",
        device,
        f"data: {sum(records.values())} records ({', '.join(f'{k} {v}' for k, v in records.items())}), "
        f"{unusable} unusable; epoch 0 packs {int(st.get('samples_packed', 0))} samples into "
        f"{int(st.get('optimizer_steps', 0)) * rows} rows"
        + (f"; held-out {heldout} records" if heldout else ""),
        f"global batch: {rows} packed rows per optimizer step (~{rows * st.get('samples_per_row', 0):.1f} samples, "
        f"<= {rows * cfg.data.max_tokens * n} tokens) = {dims.dp_size} {replicas} x grad_accum {data.grad_accum}",
        f"schedule: {total_steps} optimizer steps ({t.epochs} epochs of {steps_per_epoch[0]}{cap}), {t.lr_schedule} "
        f"lr with {t.warmup_ratio:.0%} warmup; "
        + ("resuming from the newest checkpoint" if resuming else "starting at step 0"),
    ]
    return "\n".join(f"{say} {line}" for line in lines)


def heldout_story(stage: str, tag: str, res: Mapping[str, Any]) -> str:
    """One held-out evaluation (``evaluate.evaluate_heldout``'s result) for the console: accuracy against the
    majority baseline, per task, and the logged generations."""
    lines = [
        f"[{stage}] held-out {tag}: accuracy {res['accuracy']:.3f} (baseline {res['baseline'] or 0:.3f}: each task's "
        f"most frequent training answer) on {res['n']} records ({res['bad_records']} unreadable), loss "
        f"{res['loss']:.3f}"
    ]
    for task, acc in sorted(res["accuracy_per_task"].items()):
        base = res["baseline_per_task"].get(task)
        lines.append(
            f"    {task:<16} accuracy {acc:.3f}  baseline {0 if base is None else base:.3f}  "
            f"n={res['n_per_task'][task]}"
        )
    for g in res["generations"]:
        lines.append(
            f"    [{g['task']}] generated {g['generated']!r}  reference {g['reference']!r}  "
            f"{'correct' if g['correct'] else 'wrong'}"
        )
    return "\n".join(lines)


def done_story(cfg, step: int | None, results: Mapping[str, Any], log_path: Path | None) -> str:
    """The last line of a finished stage: where its export, results, metrics and log are."""
    out_dir = Path(cfg.output_dir)
    return (
        f"[{cfg.stage}] done at step {step}: export {results['export']} ({cfg.model.dtype} weights, loads with "
        f"AutoModelForImageTextToText); results {out_dir / 'results.json'}; metrics {out_dir / 'metrics.jsonl'}"
        + (f"; log {log_path}" if log_path else "")
    )


# ================================================================================================================
# The pipeline's training summary
# ================================================================================================================

MODALITY_PREFIX = "loss/modality/"
DATASET_PREFIX = "loss/dataset/"
TAIL_STEPS = 10  # the "final loss" is the mean over this many last steps: one step's loss is noisy
ACCURACY_KEYS = ("accuracy_before", "accuracy_after", "baseline_accuracy")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl``, sorted by step; a step logged twice (resume replay) keeps its last row.

    An evaluation row (``step`` and ``eval/<name>`` keys only, written after its step's training row) joins that
    step's row instead of replacing it.
    """
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
            step = int(row["step"])
            if step in rows and all(k.startswith("eval/") for k in row if k != "step"):
                rows[step].update(row)
            else:
                rows[step] = row
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
            # Accuracies the run recorded itself (MetricsWriter.summary); values given by the caller win.
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
        "Accuracy = exact match on the held-out set; baseline = the same for always giving each task's most frequent "
        "training answer.",
        "",
        "| stage | steps | first loss | final loss | mean tokens/s | median MFU | accuracy before | "
        "accuracy after | baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summaries = [stage_summary(rows) for rows in per_stage]
    for stage, s in zip(stages, summaries):
        mfu = s["mfu_median"]
        lines.append(
            f"| {stage['name']} | {s['steps']} | {_fmt(s['first_loss'], '.4f')} | {_fmt(s['final_loss'], '.4f')} "
            f"| {_fmt(s['tokens_per_s_mean'], ',.0f')} | {_fmt(None if mfu is None else 100 * mfu, '.1f')}"
            f"{'%' if mfu is not None else ''} | {_fmt(stage.get('accuracy_before'), '.3f')} "
            f"| {_fmt(stage.get('accuracy_after'), '.3f')} | {_fmt(stage.get('baseline_accuracy'), '.3f')} |"
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
    lines += _benchmark_lines(stages)
    return "\n".join(lines) + "\n"


def _benchmark_lines(stages: Sequence[Mapping[str, Any]]) -> list[str]:
    """eval.benchmarks: accuracy per benchmark at each stage's start and end (a stage's optional
    ``benchmarks_before`` / ``benchmarks_after``: name -> {accuracy, chance}); a regression past
    eval.max_regression is marked."""
    names = sorted(
        {n for st in stages for k in ("benchmarks_before", "benchmarks_after") for n in st.get(k) or {}}
    )
    if not names:
        return []
    out = [
        "",
        "## Benchmarks (multiple choice, accuracy by the generated option letter)",
        "",
        "| stage | " + " | ".join(f"{n} start | {n} end" for n in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    for st in stages:
        regressed = {r["benchmark"] for r in st.get("benchmark_regressions") or []}
        cells = []
        for n in names:
            before = (st.get("benchmarks_before") or {}).get(n, {}).get("accuracy")
            after = (st.get("benchmarks_after") or {}).get(n, {}).get("accuracy")
            cells += [_fmt(before, ".3f"), _fmt(after, ".3f") + (" REGRESSION" if n in regressed else "")]
        out.append(f"| {st['name']} | " + " | ".join(cells) + " |")
    chance = {n: r.get("chance") for st in stages for n, r in (st.get("benchmarks_before") or {}).items()}
    out += ["", "Chance: " + ", ".join(f"{n} {_fmt(c, '.3f')}" for n, c in sorted(chance.items()))]
    return out


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
    ``accuracy_before`` / ``accuracy_after`` (held-out exact match in [0, 1]) and ``baseline_accuracy`` (the same
    metric for always answering each task's majority training answer). Missing
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


# ================================================================================================================
# The doctor's data report
# ================================================================================================================

# slug -> (what it means, what to do); docs/doctor.md holds the same table.
REASONS: dict[str, tuple[str, str]] = {
    "missing_file": (
        "a media (or annotation) file does not exist",
        "fix the path or data.root; restore the file",
    ),
    "empty_file": ("a file is 0 bytes", "re-download / re-extract it"),
    "unsupported_streaming": (
        "a streaming record of the official code (stream, conversation, start_time/end_time keys)",
        "not supported: give the clip as a video with start/end and the turns as conversations",
    ),
    "unsupported_image_folder": (
        "a folder given under image (one image per file is read)",
        "list the folder's files under image, or give the folder under video (frame folders)",
    ),
    "corrupt_image": ("an image's header or pixel data cannot be decoded (e.g. truncated)", "re-download it"),
    "corrupt_video": ("a video container cannot be opened or decoded (e.g. truncated mp4)", "re-download it"),
    "no_video_stream": (
        "a 'video' holds no video stream (audio only)",
        "drop the record or point to the video",
    ),
    "no_frames": (
        "a video, frame folder or clip range yields no decodable frame",
        "check start/end and the file",
    ),
    "image_too_large": (
        "an image is over encode.max_image_pixels (decompression-bomb guard)",
        "downscale it",
    ),
    "bad_aspect_ratio": ("an image is more than 200:1, which the model cannot take", "crop / pad or drop it"),
    "path_escapes_root": ("a path resolves outside the dataset's media root", "fix the path or data.root"),
    "placeholder_mismatch": ("`<image>`/`<video>` tags do not match the media listed", "fix the annotation"),
    "empty_assistant": ("an assistant turn is blank, or there is none", "fix or drop the record"),
    "unknown_role": ("a turn's speaker/role is not human/gpt/system (user/assistant/system)", "map the role"),
    "bad_text": ("text is not a string, not valid UTF-8, or holds a reserved token", "clean the text"),
    "bad_schema": (
        "the record has neither 'conversations' nor 'messages', or invalid JSON",
        "fix the record",
    ),
    "too_long": ("over encode.max_length under encode.length_policy", "raise max_length or lower the budget"),
}


def write_report(report: dict[str, Any], series: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """The doctor's ``report.json``, ``report.md`` and PNG plots into ``out_dir``; returns the paths written.

    ``report`` and ``series`` (the values behind the histograms) are what ``data.scan.scan_data`` returns.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(series, out)
    report["plots"] = [p.name for p in plots]
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(_markdown(report))
    return [out / "report.json", out / "report.md", *plots]


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _plots(series: dict[str, Any], out: Path) -> list[Path]:
    written = []

    def hist(name: str, values, title: str, xlabel: str) -> None:
        fig, ax = _figure((6, 4))
        if len(values):
            ax.hist(values, bins=min(50, max(1, len(set(values)))))
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=title, xlabel=xlabel, ylabel="count")
        fig.tight_layout()
        fig.savefig(out / name, dpi=80)
        written.append(out / name)

    def scatter(name: str, points, title: str) -> None:
        fig, ax = _figure((5, 5))
        if points:
            w, h = zip(*points, strict=True)
            ax.scatter(w, h, s=6, alpha=0.4, rasterized=True)
            ax.set_xscale("log")
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=title, xlabel="width (px)", ylabel="height (px)")
        fig.tight_layout()
        fig.savefig(out / name, dpi=80)
        written.append(out / name)

    hist("tokens_per_sample.png", series["tokens"], "LLM tokens per sample", "tokens (text + visual)")
    hist("visual_tokens_per_sample.png", series["visual"], "visual tokens per sample", "visual tokens")
    hist("video_durations.png", series["durations"], "video durations", "seconds")
    scatter("image_resolutions.png", series["res_image"], "image resolutions")
    scatter("video_resolutions.png", series["res_video"], "video resolutions (display)")
    return written


def _num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if math.isfinite(x) else str(x)
    return str(x)


def _markdown(r: dict[str, Any]) -> str:
    t = r["totals"]
    lines = [
        "# Data doctor report",
        "",
        f"**{r['verdict']}**",
        "",
        f"Stage `{r['stage']}`, model `{r['model']}`: {t['records']} records in {t['datasets']} dataset(s), "
        f"{t['failed']} bad ({t['failure_rate']:.2%}); {t['images']} images, {t['videos']} videos "
        f"({t['video_seconds'] / 3600:.2f} h).",
        "",
        "## Datasets",
        "",
        "| dataset | records | bad | bad share | reasons |",
        "|---|---|---|---|---|",
    ]
    for name, d in r["datasets"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in d["reasons"].items()) or "-"
        lines.append(f"| {name} | {d['records']} | {d['failed']} | {d['failure_rate']:.2%} | {reasons} |")
    if r["reasons"]:
        lines += [
            "",
            "## Bad records by reason",
            "",
            "| reason | count | meaning | what to do |",
            "|---|---|---|---|",
        ]
        for reason, e in r["reasons"].items():
            meaning, fix = REASONS.get(reason, ("", ""))
            lines.append(f"| `{reason}` | {e['count']} | {meaning} | {fix} |")
        lines.append("")
        for reason, e in r["reasons"].items():
            lines.append(f"### `{reason}`")
            lines.append("")
            for ex in e["examples"]:
                where = "" if ex["file"] and ex["file"] in ex["message"] else f" (file `{ex['file']}`)"
                lines.append(f"- `{ex['message']}`{where}")
            lines.append("")
    lines += ["", "## Samples", "", "| | count | mean | median | p95 | max |", "|---|---|---|---|---|---|"]
    for name, s in r["stats"].items():
        lines.append(
            f"| {name} | {s['count']} | "
            + " | ".join(_num(s.get(k, "-")) for k in ("mean", "median", "p95", "max"))
            + " |"
        )
    lines += [
        "",
        "## Packing per stage",
        "",
        "| stage | merge img/vid | compression | budget tokens/patches | micro-batches/rank | optimizer steps/epoch "
        "| fill | oversized |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s, e in r["stages"].items():
        enc = e["encode"]
        lines.append(
            f"| {s} | {enc['image_merge_size']}/{enc['video_merge_size']} | {enc['use_token_compression']} "
            f"| {e['max_tokens']}/{e['max_patches']} | {e.get('micro_batches_per_rank', '-')} "
            f"| {e.get('optimizer_steps_per_epoch', '-')} | {_num(e.get('fill_ratio', '-'))} "
            f"| {e.get('samples_oversized', '-')} |"
        )
    lines += memory_lines(r["stages"])
    lines += [
        "",
        f"Steps assume {next(iter(r['stages'].values()), {}).get('num_ranks', 1)} data-parallel rank(s) "
        "(doctor.num_ranks) and each stage's global batch, as training plans them; with token compression on, tokens "
        "are upper bounds.",
        "",
        "## Plots",
        "",
        *[f"![{p}]({p})" for p in r.get("plots", [])],
        "",
    ]
    return "\n".join(lines)


def memory_lines(stages: Mapping[str, Any]) -> list[str]:
    """The predicted activation peak per packed row of each stage (``data.scan.memory_report``): distribution,
    bound, the worst row and the samples that drive it."""
    rows = [(s, e["memory"]) for s, e in stages.items() if "memory" in e]
    if not rows:
        return []
    lines = [
        "",
        "## Activation memory per row (predicted, GB)",
        "",
        "| stage | bound | median | p95 | worst row | samples over the bound |",
        "|---|---|---|---|---|---|",
    ]
    for s, m in rows:
        p = m["row_peak_gb"]
        bound = _num(m["bound_gb"]) if m["bound_gb"] else "none"
        lines.append(
            f"| {s} | {bound} | {_num(p.get('median', '-'))} | {_num(p.get('p95', '-'))} | {_num(p.get('max', '-'))} "
            f"| {m['samples_over_memory']} |"
        )
    for s, m in rows:
        w = m.get("worst_row")
        if not w:
            continue
        lines += [
            "",
            f"Worst row of {s}: {_num(w['peak_gb'])} GB, {w['samples']} samples; the largest shares:",
            "",
        ]
        for d in w["top"]:
            lines.append(
                f"- {d['dataset']} record {d['record']}: {d['tokens']} tokens, {d['patches']} patches, "
                f"{_num(d['add_gb'])} GB (+ {_num(d['peak_gb'])} GB attention workspace)"
            )
    return lines


__all__ = [
    "REASONS",
    "plot_losses",
    "memory_lines",
    "read_metrics",
    "render_markdown",
    "stage_summary",
    "write_report",
    "write_summary",
]
