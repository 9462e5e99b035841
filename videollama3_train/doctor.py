"""``doctor``: check every record of a data mixture before training, and say what training will make of it.

    python -m videollama3_train.doctor data=my_mix output_dir=outputs/doctor
    python -m videollama3_train.doctor data=file data.path=A.jsonl data.root=MEDIA output_dir=O \
        stage=video_finetune model=videollama3_2b doctor.workers=8 doctor.max_failure_rate=0.01

Takes the train command's overrides (the same ``configs/`` files, composed with Hydra's compose API onto the
structured :class:`DoctorConfig`, so a misspelt key fails at start). For every record of every dataset, in
parallel: the schema and placeholders (``normalize_record``), every media file opened (an image fully decoded, a
video probed and its first sampled frame decoded) and the record's cost (``estimate_cost``) under the encode
settings of each stage. Writes to ``output_dir``:

* ``report.json``: records / failures per dataset, counts by reason with the first examples (dataset, record,
  file, message), token / media statistics, and per stage the packing estimate (micro-batches and optimizer steps
  per epoch, fill ratio) from ``packing.build_epoch_plan`` on the cost table;
* ``report.md``: the same for people, with what to do about each reason (``docs/doctor.md``);
* PNG histograms: tokens and visual tokens per sample, video durations, image and video resolutions.

Exit status 2 when a dataset's share of bad records exceeds ``doctor.max_failure_rate`` (default: training's own
``data.max_bad_fraction``, the rule on which training aborts), with the reason printed; else 0.

What it cannot see: a video damaged after its first sampled frame (only that frame is decoded, as a full decode of
every video would take as long as an epoch); frames dropped by token compression (costs are upper bounds then).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import STAGES, RunConfig
from .data.errors import DataError

log = logging.getLogger("videollama3_train")

EXIT_OK, EXIT_TOO_MANY_BAD = 0, 2

# slug -> (what it means, what to do); docs/doctor.md holds the same table.
REASONS: dict[str, tuple[str, str]] = {
    "missing_file": (
        "a media (or annotation) file does not exist",
        "fix the path or data.root; restore the file",
    ),
    "empty_file": ("a file is 0 bytes", "re-download / re-extract it"),
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


# ================================================================================================================
# Config
# ================================================================================================================


@dataclass
class DoctorOptions:
    max_failure_rate: float | None = None  # exit 2 when a dataset's fraction of bad records exceeds this;
    # None = data.max_bad_fraction (the fraction above which training aborts)
    workers: int = 2  # processes scanning records (0 or 1 = in this process)
    examples: int = 5  # examples kept per failure reason
    decode: bool = True  # decode each image and each video's first sampled frame (False: headers only)
    num_ranks: int = 1  # data-parallel ranks assumed by the packing estimate (steps per epoch)
    chunk_size: int = 32  # records per task sent to a worker
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # stages whose packing is estimated

    def __post_init__(self):
        if self.max_failure_rate is not None and not 0 <= self.max_failure_rate <= 1:
            raise ValueError(f"doctor.max_failure_rate must be in [0, 1], got {self.max_failure_rate}")
        if self.workers < 0 or self.examples < 0 or self.num_ranks < 1 or self.chunk_size < 1:
            raise ValueError("doctor.workers/examples must be >= 0, doctor.num_ranks/chunk_size >= 1")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"doctor.stages: unknown stages {unknown}; choose from {list(STAGES)}")


@dataclass
class DoctorConfig(RunConfig):
    doctor: DoctorOptions = field(default_factory=DoctorOptions)


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    from .config import register_configs

    register_configs()
    ConfigStore.instance().store(name="doctor_schema", node=DoctorConfig)


def compose_doctor(overrides: list[str], stage: str | None = None) -> DoctorConfig:
    """``configs/doctor.yaml`` + ``overrides`` (+ ``stage=<stage>``) as a validated :class:`DoctorConfig`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from .train import CONFIG_DIR

    _register()
    ov = list(overrides)
    if stage is not None:
        ov = [o for o in ov if o.split("=", 1)[0].lstrip("+") != "stage"] + [f"stage={stage}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        dcfg = compose(config_name="doctor", overrides=ov)
    return OmegaConf.to_object(dcfg)


# ================================================================================================================
# Reading annotation files
# ================================================================================================================


def read_annotations(path: str | os.PathLike):
    """Records of an annotation file: the Arrow dataset of ``load_annotations`` when the file loads, else a list
    with one JSON string or ``DataError`` per record (index as training counts it: non-blank lines).

    Training refuses a whole file for one undecodable line; the doctor reports that line (``bad_text`` /
    ``bad_schema`` naming the line) and goes on with the others, so one run lists every problem. A file that
    cannot be read at all raises ``DataError``.
    """
    from .data.annotations import load_annotations

    try:
        return load_annotations(path)
    except DataError as e:
        if e.reason in ("missing_file", "empty_file"):
            raise
    except Exception as e:  # noqa: BLE001 - datasets wraps the reader's errors; the tolerant read names the line
        log.debug("load_annotations(%s) failed (%s); reading it line by line", path, e)
    return _read_tolerant(str(path))


def _read_tolerant(path: str) -> list[str | DataError]:
    data = Path(path).read_bytes()
    if data.lstrip()[:1] == b"[":
        try:
            records = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(
                "bad_text", f"not valid UTF-8 at byte {e.start} ({e.reason})", path=path
            ) from None
        except json.JSONDecodeError as e:
            raise DataError("bad_schema", f"not valid JSON: {e}", path=path) from None
        return [
            json.dumps(r, ensure_ascii=False)
            if isinstance(r, dict)
            else DataError("bad_schema", f"record is a {type(r).__name__}, not an object", index=i, path=path)
            for i, r in enumerate(records)
        ]
    out: list[str | DataError] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        index = len(out)
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            out.append(
                DataError(
                    "bad_text",
                    f"line {lineno} is not valid UTF-8 (byte {e.start}: {e.reason})",
                    index=index,
                    path=path,
                )
            )
            continue
        except json.JSONDecodeError as e:
            out.append(
                DataError("bad_schema", f"line {lineno} is not valid JSON: {e}", index=index, path=path)
            )
            continue
        if not isinstance(rec, dict):
            out.append(DataError("bad_schema", f"line {lineno} is not a JSON object", index=index, path=path))
            continue
        out.append(json.dumps(rec, ensure_ascii=False))
    return out


# ================================================================================================================
# Checking one record (runs in worker processes)
# ================================================================================================================


@dataclass
class _Job:
    """What every worker needs, sent once per worker (the records travel as memory-mapped datasets)."""

    sources: list[Any]  # per dataset: Arrow dataset or list of JSON strings / DataError
    roots: list[str]
    names: list[str]
    paths: list[str]  # annotation files, named by record-level errors
    processor: Any
    main: Any  # EncodeConfig of the stage whose failures and statistics are reported
    cost_configs: list[Any]  # distinct cost-relevant EncodeConfigs over the stages; cost column k = config k
    decode: bool


_JOB: dict[str, _Job] = {}


def _init_worker(job: _Job) -> None:
    _JOB["job"] = job


def _raw_record(job: _Job, d: int, i: int) -> dict[str, Any]:
    from .data.annotations import RECORD_COLUMN

    src = job.sources[d]
    item = src[i]
    if isinstance(item, DataError):
        raise item
    return json.loads(item[RECORD_COLUMN] if isinstance(item, dict) else item)


def _open_media(m, config) -> None:
    """Decode what training would decode first: the whole image, or the first sampled frame of a video."""
    from .data import media

    if m.kind == "image":
        media.load_image(m.paths[0], max_pixels=config.max_image_pixels)
    elif m.frame_indices:  # a video given as a list of frame images
        media.load_image(m.paths[m.frame_indices[0]], max_pixels=config.max_image_pixels)
    else:
        media.decode_video(m.paths[0], m.times[:1], size=m.size, info=m.info)


def _check_record(job: _Job, d: int, i: int) -> dict[str, Any]:
    from .data.encode import _plan, estimate_cost

    out: dict[str, Any] = {"d": d, "i": i, "media": []}
    try:
        raw = _raw_record(job, d, i)
        pad_ids = (int(job.processor.image_token_id), int(job.processor.video_token_id))
        # The plan (header / metadata reads only) gives the per-item sizes behind the cost: resolutions, durations
        # and the text/visual split that estimate_cost's totals do not.
        plan = _plan(raw, job.roots[d], job.processor.tokenizer, job.main, pad_ids)
        for m in plan.media:
            duration = None
            if m.info is not None:
                duration = float(m.info.duration)
            elif m.kind == "video":
                duration = len(m.paths) / job.main.fps
            out["media"].append((m.kind, int(m.width), int(m.height), duration))
            if job.decode:
                try:
                    _open_media(m, job.main)
                except DataError as e:
                    if not e.path:
                        e.path = str(m.paths[0])
                    raise
        out["costs"] = [
            estimate_cost(raw, data_root=job.roots[d], processor=job.processor, config=c)
            for c in job.cost_configs
        ]
        out["tokens"] = estimate_cost(raw, data_root=job.roots[d], processor=job.processor, config=job.main)[
            0
        ]
        out["visual_tokens"] = max(0, out["tokens"] - plan.text_tokens)
    except DataError as e:
        e.locate(dataset=job.names[d], index=i)
        out["error"] = (e.reason, str(e), e.path or job.paths[d])
    return out


def _check_range(d: int, start: int, stop: int) -> list[dict[str, Any]]:
    job = _JOB["job"]
    return [_check_record(job, d, i) for i in range(start, stop)]


# ================================================================================================================
# The scan
# ================================================================================================================


def _cost_key(enc) -> str:
    """Hash of the encode fields a cost depends on (compression only shortens samples; decoding is irrelevant)."""
    from .data.packing import config_hash

    d = dataclasses.asdict(enc)
    for k in ("use_token_compression", "compression_threshold", "decode_scale", "frame_cache_dir"):
        d.pop(k, None)
    return config_hash(d)


def _summary(values: list[float] | np.ndarray) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"count": 0}
    return {
        "count": int(a.size),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "median": float(np.median(a)),
        "p95": float(np.percentile(a, 95)),
        "max": float(a.max()),
    }


def diagnose(cfg: DoctorConfig, stage_configs: dict[str, RunConfig] | None = None, *, progress: bool = True):
    """Scan every record of ``cfg.data``'s datasets; returns the report dict (see the module docstring).

    ``stage_configs``: the composed config of each stage whose packing is estimated (``run`` composes them with
    the same overrides); None: only ``cfg``'s own stage.
    """
    from .data.build import dataset_spec
    from .data.packing import build_epoch_plan
    from .train import build_stage_processor, build_tokenizer_for

    opts = cfg.doctor
    threshold = opts.max_failure_rate if opts.max_failure_rate is not None else cfg.data.max_bad_fraction
    stage_configs = stage_configs or {cfg.stage: cfg}
    tokenizer = build_tokenizer_for(cfg)
    processor = build_stage_processor(tokenizer, cfg.encode)

    # One cost column per distinct cost-relevant encode config: stages 1-3 share one, stage 4 merges images.
    keys: list[str] = []
    cost_configs = []
    stage_col: dict[str, int] = {}
    for s, scfg in stage_configs.items():
        k = _cost_key(scfg.encode)
        if k not in keys:
            keys.append(k)
            cost_configs.append(scfg.encode)
        stage_col[s] = keys.index(k)

    # ---- read the annotation files --------------------------------------------------------------------------------
    names, sources, roots, paths, specs, file_errors = [], [], [], [], [], {}
    for name, dset in cfg.data.dataset_dict().items():
        path = Path(dset.path)
        root = str(dset.root if dset.root is not None else path.parent)
        try:
            if not Path(root).is_dir():
                raise DataError("missing_file", "media root is not a directory", dataset=name, path=root)
            src = read_annotations(path)
        except DataError as e:
            file_errors[name] = e.locate(dataset=name)
            continue
        names.append(name)
        sources.append(src)
        roots.append(root)
        paths.append(str(path))
        specs.append(dataset_spec(name, dset, root))

    # ---- check every record ------------------------------------------------------------------------------------
    job = _Job(sources, roots, names, paths, processor, cfg.encode, cost_configs, opts.decode)
    sizes = [len(s) for s in sources]
    tasks = [
        (d, s, min(s + opts.chunk_size, n)) for d, n in enumerate(sizes) for s in range(0, n, opts.chunk_size)
    ]
    results: list[dict[str, Any]] = []
    bar = _progress(sum(sizes), progress)
    try:
        if opts.workers > 1 and len(tasks) > 1:
            with ProcessPoolExecutor(opts.workers, initializer=_init_worker, initargs=(job,)) as pool:
                futures = [pool.submit(_check_range, *t) for t in tasks]
                for f in as_completed(futures):
                    rows = f.result()
                    results.extend(rows)
                    bar.update(len(rows))
        else:
            _init_worker(job)
            for t in tasks:
                rows = _check_range(*t)
                results.extend(rows)
                bar.update(len(rows))
    finally:
        bar.close()
        _JOB.clear()
    results.sort(key=lambda r: (r["d"], r["i"]))

    # ---- tally ------------------------------------------------------------------------------------------------
    costs = [np.full((n, len(keys), 2), -1, dtype=np.int64) for n in sizes]
    reasons: dict[str, dict[str, Any]] = {}
    per_dataset: dict[str, dict[str, Any]] = {}
    tokens, visual, durations = [], [], []
    res_image: list[tuple[int, int]] = []
    res_video: list[tuple[int, int]] = []

    def add_failure(reason: str, dataset: str, index: int | None, file: str | None, message: str) -> None:
        entry = reasons.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < opts.examples:
            entry["examples"].append({"dataset": dataset, "record": index, "file": file, "message": message})

    for d, name in enumerate(names):
        per_dataset[name] = {
            "path": paths[d],
            "root": roots[d],
            "records": sizes[d],
            "failed": 0,
            "reasons": {},
        }
    for r in results:
        name = names[r["d"]]
        for kind, w, h, dur in r["media"]:
            (res_image if kind == "image" else res_video).append((w, h))
            if kind == "video" and dur is not None:
                durations.append(dur)
        if "error" in r:
            reason, message, file = r["error"]
            add_failure(reason, name, r["i"], file, message)
            entry = per_dataset[name]
            entry["failed"] += 1
            entry["reasons"][reason] = entry["reasons"].get(reason, 0) + 1
            continue
        costs[r["d"]][r["i"]] = np.asarray(r["costs"], dtype=np.int64)
        tokens.append(r["tokens"])
        visual.append(r["visual_tokens"])
    for name, e in file_errors.items():
        add_failure(e.reason, name, None, e.path, str(e))
        d = cfg.data.dataset_dict()[name]
        per_dataset[name] = {
            "path": d.path,
            "root": d.root,
            "records": 0,
            "failed": 0,
            "reasons": {e.reason: 1},
            "file_error": str(e),
        }
    for entry in per_dataset.values():
        n = entry["records"]
        entry["failure_rate"] = 1.0 if "file_error" in entry else (entry["failed"] / n if n else 0.0)

    # ---- packing estimate per stage -----------------------------------------------------------------------------
    stages: dict[str, Any] = {}
    for s, scfg in stage_configs.items():
        col = stage_col[s]
        table = [c[:, col, :] for c in costs]
        entry: dict[str, Any] = {
            "encode": {
                k: getattr(scfg.encode, k)
                for k in ("image_merge_size", "video_merge_size", "use_token_compression")
            },
            "max_tokens": scfg.data.max_tokens,
            "max_patches": scfg.data.max_patches,
            "grad_accum": scfg.trainer.grad_accum,
            "num_ranks": opts.num_ranks,
            "tokens_total": int(sum(int(t[t[:, 0] >= 0, 0].sum()) for t in table)),
            "patches_total": int(sum(int(t[t[:, 1] >= 0, 1].sum()) for t in table)),
        }
        if specs and sum(sizes):
            plan = build_epoch_plan(
                specs,
                table,
                seed=scfg.data.seed,
                epoch=0,
                max_tokens=scfg.data.max_tokens,
                max_patches=scfg.data.max_patches,
                buffer_size=scfg.data.buffer_size,
                num_ranks=opts.num_ranks,
                grad_accum=scfg.trainer.grad_accum,
            )
            st = plan.stats()
            entry.update(
                micro_batches_per_rank=plan.steps,
                optimizer_steps_per_epoch=plan.steps // scfg.trainer.grad_accum,
                fill_ratio=st["fill_ratio"],
                samples_packed=st["samples_packed"],
                samples_failed=st["samples_failed"],
                samples_oversized=st["samples_oversized"],
                samples_leftover=st["samples_leftover"],
            )
        stages[s] = entry

    total = sum(sizes)
    failed = sum(e["failed"] for e in per_dataset.values())
    over = {n: e["failure_rate"] for n, e in per_dataset.items() if e["failure_rate"] > threshold}
    report = {
        "stage": cfg.stage,
        "model": cfg.model.preset,
        "threshold": threshold,
        "passed": not over,
        "verdict": _verdict(over, threshold),
        "totals": {
            "datasets": len(per_dataset),
            "records": total,
            "ok": total - failed,
            "failed": failed + len(file_errors),
            "failure_rate": failed / total if total else (1.0 if file_errors else 0.0),
            "images": len(res_image),
            "videos": len(res_video),
            "video_seconds": float(sum(durations)),
        },
        "datasets": per_dataset,
        "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1]["count"])),
        "stats": {
            "tokens_per_sample": _summary(tokens),
            "visual_tokens_per_sample": _summary(visual),
            "video_seconds": _summary(durations),
            "image_pixels": _summary([w * h for w, h in res_image]),
            "video_pixels": _summary([w * h for w, h in res_video]),
        },
        "stages": stages,
    }
    series = {
        "tokens": tokens,
        "visual": visual,
        "durations": durations,
        "res_image": res_image,
        "res_video": res_video,
    }
    return report, series


def _verdict(over: dict[str, float], threshold: float) -> str:
    if not over:
        return f"OK: no dataset has more than {threshold:.2%} bad records"
    parts = ", ".join(f"{n!r} {r:.2%}" for n, r in over.items())
    return (
        f"TOO MANY BAD RECORDS: {parts} above the threshold {threshold:.2%} (training would abort on these datasets "
        "at data.max_bad_fraction); see the reasons below"
    )


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="doctor", unit="rec", mininterval=1.0, disable=not enabled)


# ================================================================================================================
# Writing the report
# ================================================================================================================


def write_report(report: dict[str, Any], series: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """``report.json``, ``report.md`` and the PNG plots into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(series, out)
    report["plots"] = [p.name for p in plots]
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(_markdown(report))
    return [out / "report.json", out / "report.md", *plots]


def _plots(series: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, and no display on a cluster node
    import matplotlib.pyplot as plt

    written = []

    def hist(name: str, values, title: str, xlabel: str) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        if len(values):
            ax.hist(values, bins=min(50, max(1, len(set(values)))))
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=title, xlabel=xlabel, ylabel="count")
        fig.tight_layout()
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        written.append(out / name)

    def scatter(name: str, points, title: str) -> None:
        fig, ax = plt.subplots(figsize=(5, 5))
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
        plt.close(fig)
        written.append(out / name)

    hist("tokens_per_sample.png", series["tokens"], "LLM tokens per sample", "tokens (text + visual)")
    hist("visual_tokens_per_sample.png", series["visual"], "visual tokens per sample", "visual tokens")
    hist("video_durations.png", series["durations"], "video durations", "seconds")
    scatter("image_resolutions.png", series["res_image"], "image resolutions")
    scatter("video_resolutions.png", series["res_video"], "video resolutions (display)")
    return written


def _fmt(x: Any) -> str:
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
            + " | ".join(_fmt(s.get(k, "-")) for k in ("mean", "median", "p95", "max"))
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
            f"| {e.get('optimizer_steps_per_epoch', '-')} | {_fmt(e.get('fill_ratio', '-'))} "
            f"| {e.get('samples_oversized', '-')} |"
        )
    lines += [
        "",
        f"Steps assume {next(iter(r['stages'].values()), {}).get('num_ranks', 1)} data-parallel rank(s) "
        "(doctor.num_ranks) and each stage's trainer.grad_accum; with token compression on, tokens are upper bounds.",
        "",
        "## Plots",
        "",
        *[f"![{p}]({p})" for p in r.get("plots", [])],
        "",
    ]
    return "\n".join(lines)


# ================================================================================================================
# Entry point
# ================================================================================================================


def run(overrides: list[str], *, progress: bool = True) -> int:
    """Compose the config from ``overrides``, scan, write the report; returns the exit status (0 or 2)."""
    cfg = compose_doctor(overrides)
    # Every stage is composed with the same overrides, exactly as the pipeline would run it.
    stage_configs = {s: compose_doctor(overrides, stage=s) for s in cfg.doctor.stages}
    report, series = diagnose(cfg, stage_configs, progress=progress)
    written = write_report(report, series, cfg.output_dir)
    t = report["totals"]
    print(
        f"[doctor] {t['records']} records, {t['failed']} bad ({t['failure_rate']:.2%}): "
        + (", ".join(f"{k} {v['count']}" for k, v in report["reasons"].items()) or "no failures"),
        flush=True,
    )
    for s, e in report["stages"].items():
        if "optimizer_steps_per_epoch" in e:
            print(
                f"[doctor] {s}: {e['optimizer_steps_per_epoch']} optimizer steps per epoch, fill {e['fill_ratio']:.1%}",
                flush=True,
            )
    print(f"[doctor] wrote {written[0]} and {written[1]}", flush=True)
    print(f"[doctor] {report['verdict']}", file=sys.stdout if report["passed"] else sys.stderr, flush=True)
    return EXIT_OK if report["passed"] else EXIT_TOO_MANY_BAD


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
