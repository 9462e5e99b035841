"""The doctor's scan: check every record of a data mixture before training, and say what training will make of it.

For every record of every dataset, in parallel: the schema and placeholders (``normalize_record``), every media file
opened (an image fully decoded, a video probed and its first sampled frame decoded) and the record's cost
(``estimate_cost``) under the encode settings of each stage; then per stage the packing estimate (micro-batches and
optimizer steps per epoch, fill ratio) from the packing rule training runs (``data.build.plan_training``) on the cost
table.

What it cannot see: a video damaged after its first sampled frame (only that frame is decoded, as a full decode of
every video would take as long as an epoch); frames dropped by token compression (costs are upper bounds then).

Like the rest of ``data/`` it imports neither the model nor the trainer: the processor is passed in, and each stage
is described by its encode settings, its data budgets and its global batch (:class:`StagePlan`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import STAGES
from .config import DataConfig, EncodeConfig
from .cost_model import SampleCostModel
from .costs import COST_COLUMNS
from .errors import DataError

log = logging.getLogger("videollama3_train")

__all__ = ["ScanConfig", "StagePlan", "memory_report", "read_annotations", "scan_data"]


@dataclass
class ScanConfig:
    """The doctor's options (``doctor.*`` on the command line)."""

    # exit 2 when a dataset's fraction of bad records exceeds this, in [0, 1];
    # None = data.max_bad_fraction (the fraction above which training aborts)
    max_failure_rate: float | None = None
    workers: int = 2  # processes scanning records (0 or 1 = in this process)
    examples: int = 5  # examples (dataset, record, file, message) kept per failure reason
    decode: bool = True  # decode each image and each video's first sampled frame (False: headers only)
    num_ranks: int = 1  # data-parallel ranks assumed by the packing estimate (optimizer steps per epoch)
    chunk_size: int = 32  # records per task sent to a worker process
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
class StagePlan:
    """What the packing estimate of one stage needs: how records are encoded and how samples are packed."""

    encode: EncodeConfig
    data: DataConfig
    grad_accum: int  # trainer.grad_accum: rows per rank per step when global_batch_samples is None
    global_batch_samples: int | None = None  # trainer.global_batch_samples: the recipe's global batch
    sequence_parallel: int = 1  # trainer.sequence_parallel: ranks sharing each row (budgets x N, ranks / N)
    # the model's activation-memory model (run.activation_budget); ``data.max_activation_gb`` is then the resolved
    # bound per row (x N already), 0 = none: the predicted peak of every row is reported either way
    activation: Any = None
    cost_model: SampleCostModel | None = None  # what training deals rows by (run.build_cost_model)


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
    from .annotations import iter_records, load_annotations

    try:
        return load_annotations(path)
    except DataError as e:
        if e.reason in ("missing_file", "empty_file"):
            raise
    except Exception as e:  # noqa: BLE001 - datasets wraps the reader's errors; the tolerant read names the line
        log.debug("load_annotations(%s) failed (%s); reading it record by record", path, e)
    return [
        r if isinstance(r, DataError) else json.dumps(r, ensure_ascii=False)
        for _, r in iter_records(path, strict=False)
    ]


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
    specs: list[Any] = field(default_factory=list)  # per dataset: its DatasetConfig (for its media clocks)
    # per dataset, per cost config: whether training's shared cost table holds it already (not costed again);
    # None for a dataset training would not load (no table is read or written for it)
    cached: list[list[bool] | None] = field(default_factory=list)


_JOB: dict[str, _Job] = {}


def _init_worker(job: _Job) -> None:
    _JOB["job"] = job


def _raw_record(job: _Job, d: int, i: int) -> dict[str, Any]:
    from .annotations import RECORD_COLUMN

    item = job.sources[d][i]
    if isinstance(item, DataError):
        raise item
    return json.loads(item[RECORD_COLUMN] if isinstance(item, dict) else item)


def _open_media(m, config) -> None:
    """Decode what training would decode first: the whole image, or the first sampled frame of a video."""
    from . import media

    if m.kind == "image":
        media.load_image(m.paths[0], max_pixels=config.max_image_pixels)
    elif m.frame_indices:  # a video given as a list of frame images
        media.load_image(m.paths[m.frame_indices[0]], max_pixels=config.max_image_pixels)
    else:
        media.decode_video(m.paths[0], m.times[:1], size=m.size, info=m.info)


def _table_rows(job: _Job, d: int, raw: dict[str, Any]) -> list[Any]:
    """Per cost config, the record's row of training's cost table as training's pass makes it (``data.build``):
    the cost row, or the failure ``(reason, message, error)``; None where the shared table holds it already."""
    from .encode import estimate_cost_row

    rows: list[Any] = []
    for c, cached in zip(job.cost_configs, job.cached[d]):
        if cached:
            rows.append(None)
            continue
        config = job.specs[d].encode_config(c)
        try:
            rows.append(
                tuple(
                    estimate_cost_row(
                        raw,
                        data_root=job.roots[d],
                        processor=job.processor,
                        config=config,
                        dataset=job.names[d],
                    )
                )
            )
        except DataError as e:
            rows.append((e.reason, str(e), e))
    return rows


def _check_record(job: _Job, d: int, i: int) -> dict[str, Any]:
    from .encode import estimate_cost_row, plan_record

    out: dict[str, Any] = {"d": d, "i": i, "media": []}
    try:
        raw = _raw_record(job, d, i)
        table = _table_rows(job, d, raw) if job.cached and job.cached[d] is not None else None
        if table is not None:
            out["table"] = [r if r is None or not isinstance(r[0], str) else r[:2] for r in table]
        # The plan (header / metadata reads only) gives the per-item sizes behind the cost: resolutions, durations
        # and the text/visual split that the cost's totals do not.
        spec = job.specs[d] if job.specs else None
        main = spec.encode_config(job.main) if spec is not None else job.main  # the dataset's media clocks
        plan = plan_record(raw, data_root=job.roots[d], processor=job.processor, config=main)
        for m in plan.media:
            duration = None
            if m.info is not None:
                duration = float(m.info.duration)
            elif m.kind == "video":
                duration = len(m.paths) / main.fps
            out["media"].append((m.kind, int(m.width), int(m.height), duration))
            if job.decode:
                try:
                    _open_media(m, main)
                except DataError as e:
                    if not e.path:
                        e.path = str(m.paths[0])
                    raise
        if table is not None:  # the rows training's cost pass gives (data.build), so both plan alike
            for r in table:
                if r is not None and isinstance(r[0], str):
                    raise r[2]
            out["costs"] = table  # None: in the shared table (scan_data fills it in)
        else:
            out["costs"] = [
                estimate_cost_row(
                    raw,
                    data_root=job.roots[d],
                    processor=job.processor,
                    config=spec.encode_config(c) if spec is not None else c,
                )
                for c in job.cost_configs
            ]
        out["tokens"] = plan.cost[0]
        out["visual_tokens"] = max(0, out["tokens"] - plan.text_tokens)
    except DataError as e:
        e.locate(dataset=job.names[d], index=i)
        out["error"] = (e.reason, str(e), e.path or job.paths[d])
    return out


def _check_range(span: tuple[int, int, int]) -> list[dict[str, Any]]:
    d, start, stop = span
    job = _JOB["job"]
    return [_check_record(job, d, i) for i in range(start, stop)]


# ================================================================================================================
# The scan
# ================================================================================================================


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


def scan_data(
    data: DataConfig,
    encode: EncodeConfig,
    processor,
    opts: ScanConfig,
    stages: dict[str, StagePlan],
    *,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scan every record of ``data``'s datasets; returns ``(report, series)``.

    encode: the settings under which failures and statistics are reported (the run's own stage).
    stages: the stages whose packing is estimated, each with its own encode settings and budgets.
    report: ``passed`` / ``verdict`` / ``threshold``, ``totals``, ``datasets`` (records and failures per
        dataset), ``reasons`` (count and first examples per failure reason), ``stats`` (tokens, visual tokens,
        video seconds, pixels per sample) and ``stages`` (the packing estimate per stage).
    series: the values behind the histograms (``reports.write_report`` draws them).
    """
    from .costs import cost_config_hash
    from .pool import parallel_map

    threshold = opts.max_failure_rate if opts.max_failure_rate is not None else data.max_bad_fraction
    # One cost column per distinct cost-relevant encode config: stages 1-3 share one, stage 4 merges images.
    keys: list[str] = []
    cost_configs = []
    stage_col: dict[str, int] = {}
    for s, plan in stages.items():
        k = cost_config_hash(plan.encode)
        if k not in keys:
            keys.append(k)
            cost_configs.append(plan.encode)
        stage_col[s] = keys.index(k)

    names, sources, roots, paths, specs, file_errors = _read_sources(data)
    sizes = [len(s) for s in sources]
    shared = _SharedTables(data, processor, cost_configs, paths, specs, sources)
    job = _Job(
        sources, roots, names, paths, processor, encode, cost_configs, opts.decode, specs, shared.cached
    )
    spans = [
        (d, s, min(s + opts.chunk_size, n)) for d, n in enumerate(sizes) for s in range(0, n, opts.chunk_size)
    ]
    try:
        chunks = parallel_map(
            _check_range,
            spans,
            workers=opts.workers,
            desc="doctor",
            unit="rec",
            progress=progress,
            weight=lambda span: span[2] - span[1],
            initializer=_init_worker,
            initargs=(job,),
        )
    finally:
        _JOB.clear()  # the inline run filled it in this process
    tally = _Tally(opts.examples, names, paths, roots, sizes, len(keys))
    for r in (r for rows in chunks for r in rows):
        tally.add(r)
        shared.add(r)
    shared.finish(tally)
    tally.add_file_errors(file_errors, data)
    estimates = {
        s: _stage_estimate(plan, [c[:, stage_col[s], :] for c in tally.costs], specs, opts.num_ranks)
        for s, plan in stages.items()
    }
    return tally.report(threshold, estimates), tally.series()


class _SharedTables:
    """Training's cost tables (``data.cost_cache_dir``, keyed by ``costs.cost_cache``), shared with the doctor:
    a table already there is read instead of costing its records again, and the doctor writes the ones it costs,
    so a training run after it starts with its cost pass done. Only for datasets training loads (an Arrow-readable
    file) and with ``data.cost_cache``; the doctor's own failures (a frame that does not decode) are not in the
    table: training's pass does not decode either."""

    def __init__(self, data: DataConfig, processor, cost_configs, paths, specs, sources):
        from .costs import cost_cache, load_cost_table

        self.where: list[list[tuple[Any, str]] | None] = []
        self.cached: list[list[bool] | None] = []
        self.loaded: dict[tuple[int, int], Any] = {}
        self.rows: dict[tuple[int, int], Any] = {}
        for d, (path, spec, src) in enumerate(zip(paths, specs, sources)):
            if not data.cost_cache or isinstance(src, list):  # a file training refuses: no table of its own
                self.where.append(None)
                self.cached.append(None)
                continue
            where = [
                cost_cache(path, spec.encode_config(c), processor.tokenizer, cache_dir=data.cost_cache_dir)
                for c in cost_configs
            ]
            self.where.append(where)
            flags = []
            for k, (cache, key) in enumerate(where):
                table = load_cost_table(cache, key, len(src), COST_COLUMNS)
                if table is not None:
                    self.loaded[(d, k)] = table
                flags.append(table is not None)
            self.cached.append(flags)

    def add(self, r: dict[str, Any]) -> None:
        for k, row in enumerate(r.get("table") or ()):
            if row is not None:
                self.rows.setdefault((r["d"], k), {})[r["i"]] = row

    def finish(self, tally: _Tally) -> None:
        """Write the tables the scan costed; fill the columns read from the shared tables into ``tally``."""
        from .costs import CostTable, save_cost_table

        for (d, k), table in self.loaded.items():
            ok = tally.ok[d]
            tally.costs[d][ok, k] = table.costs[ok]
        for (d, k), rows in self.rows.items():
            n = len(tally.ok[d])
            if len(rows) != n:  # a record was not costed: no table rather than a wrong one
                continue
            costs = np.full((n, COST_COLUMNS), -1, dtype=np.int64)
            failures = {}
            for i in range(n):
                row = rows[i]
                if isinstance(row[0], str):
                    failures[i] = (row[0], row[1])
                else:
                    costs[i] = row
            save_cost_table(*self.where[d][k], CostTable(costs, failures))


def _read_sources(data: DataConfig):
    """The annotation files of ``data``'s datasets; a file that cannot be read is a failure of its dataset."""
    names, sources, roots, paths, specs, file_errors = [], [], [], [], [], {}
    for name, dset in data.resolved_datasets().items():
        path, root = Path(dset.path), dset.root
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
        specs.append(dset)
    return names, sources, roots, paths, specs, file_errors


class _Tally:
    """The scan's results per dataset and per failure reason, and the statistics behind the histograms."""

    def __init__(self, examples: int, names, paths, roots, sizes, columns: int):
        self.examples, self.names = examples, names
        self.costs = [np.full((n, columns, COST_COLUMNS), -1, dtype=np.int64) for n in sizes]
        self.ok = [np.zeros(n, dtype=bool) for n in sizes]  # records that passed every check
        self.reasons: dict[str, dict[str, Any]] = {}
        self.per_dataset: dict[str, dict[str, Any]] = {
            name: {"path": paths[d], "root": roots[d], "records": sizes[d], "failed": 0, "reasons": {}}
            for d, name in enumerate(names)
        }
        self.tokens: list[int] = []
        self.visual: list[int] = []
        self.durations: list[float] = []
        self.res_image: list[tuple[int, int]] = []
        self.res_video: list[tuple[int, int]] = []
        self.file_errors = 0

    def failure(self, reason: str, dataset: str, index: int | None, file: str | None, message: str) -> None:
        entry = self.reasons.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < self.examples:
            entry["examples"].append({"dataset": dataset, "record": index, "file": file, "message": message})

    def add(self, r: dict[str, Any]) -> None:
        name = self.names[r["d"]]
        for kind, w, h, dur in r["media"]:
            (self.res_image if kind == "image" else self.res_video).append((w, h))
            if kind == "video" and dur is not None:
                self.durations.append(dur)
        if "error" in r:
            reason, message, file = r["error"]
            self.failure(reason, name, r["i"], file, message)
            entry = self.per_dataset[name]
            entry["failed"] += 1
            entry["reasons"][reason] = entry["reasons"].get(reason, 0) + 1
            return
        for k, row in enumerate(r["costs"]):
            if row is not None:  # None: a column of the shared cost table, filled in after the scan
                self.costs[r["d"]][r["i"], k] = row
        self.ok[r["d"]][r["i"]] = True
        self.tokens.append(r["tokens"])
        self.visual.append(r["visual_tokens"])

    def add_file_errors(self, file_errors: dict[str, DataError], data: DataConfig) -> None:
        self.file_errors = len(file_errors)
        for name, e in file_errors.items():
            self.failure(e.reason, name, None, e.path, str(e))
            d = data.dataset_dict()[name]
            self.per_dataset[name] = {
                "path": d.path,
                "root": d.root,
                "records": 0,
                "failed": 0,
                "reasons": {e.reason: 1},
                "file_error": str(e),
            }
        for entry in self.per_dataset.values():
            n = entry["records"]
            entry["failure_rate"] = 1.0 if "file_error" in entry else (entry["failed"] / n if n else 0.0)

    def report(self, threshold: float, estimates: dict[str, Any]) -> dict[str, Any]:
        total = sum(e["records"] for e in self.per_dataset.values())
        failed = sum(e["failed"] for e in self.per_dataset.values())
        over = {n: e["failure_rate"] for n, e in self.per_dataset.items() if e["failure_rate"] > threshold}
        return {
            "threshold": threshold,
            "passed": not over,
            "verdict": _verdict(over, threshold),
            "totals": {
                "datasets": len(self.per_dataset),
                "records": total,
                "ok": total - failed,
                "failed": failed + self.file_errors,
                "failure_rate": failed / total if total else (1.0 if self.file_errors else 0.0),
                "images": len(self.res_image),
                "videos": len(self.res_video),
                "video_seconds": float(sum(self.durations)),
            },
            "datasets": self.per_dataset,
            "reasons": dict(sorted(self.reasons.items(), key=lambda kv: -kv[1]["count"])),
            "stats": {
                "tokens_per_sample": _summary(self.tokens),
                "visual_tokens_per_sample": _summary(self.visual),
                "video_seconds": _summary(self.durations),
                "image_pixels": _summary([w * h for w, h in self.res_image]),
                "video_pixels": _summary([w * h for w, h in self.res_video]),
            },
            "stages": estimates,
        }

    def series(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "visual": self.visual,
            "durations": self.durations,
            "res_image": self.res_image,
            "res_video": self.res_video,
        }


def _stage_estimate(plan: StagePlan, table: list[np.ndarray], specs, num_ranks: int) -> dict[str, Any]:
    """One stage's packing as training will run it on ``num_ranks`` data-parallel ranks: the same rule
    (``data.build.plan_training``), the same budgets per sequence-parallel group, the same ``G``."""
    from .build import plan_training

    sp = plan.sequence_parallel
    data = plan.data if sp == 1 else replace(plan.data, max_tokens=plan.data.max_tokens * sp,
                                             max_patches=plan.data.max_patches * sp)  # fmt: skip
    groups = max(1, num_ranks // sp)
    entry: dict[str, Any] = {
        "encode": {
            k: getattr(plan.encode, k)
            for k in ("image_merge_size", "video_merge_size", "use_token_compression")
        },
        "max_tokens": data.max_tokens,
        "max_patches": data.max_patches,
        "num_ranks": num_ranks,
        "sequence_parallel": sp,
        "global_batch_samples": plan.global_batch_samples,
        "tokens_total": int(sum(int(t[t[:, 0] >= 0, 0].sum()) for t in table)),
        "patches_total": int(sum(int(t[t[:, 1] >= 0, 1].sum()) for t in table)),
    }
    if not specs or not sum(len(t) for t in table):
        return entry
    planner = plan_training(
        data,
        specs,
        table,
        global_batch_samples=plan.global_batch_samples,
        grad_accum=plan.grad_accum,
        world_size=groups,
        activation=plan.activation,
        cost_model=plan.cost_model,
    )
    plan0 = planner.plan(0)
    st = plan0.stats()
    if plan.activation is not None:
        entry["memory"] = memory_report(plan0, plan.activation, data.max_activation_gb or 0.0, specs)
    entry.update(
        rows_per_step=planner.rows_per_step,
        grad_accum=planner.grad_accum,
        micro_batches_per_rank=planner.steps(0) * planner.grad_accum,
        samples_per_row=planner.samples_per_row,
        optimizer_steps_per_epoch=planner.steps(0),
        fill_ratio=st["fill_ratio"],
        samples_packed=st["samples_packed"],
        samples_failed=st["samples_failed"],
        samples_oversized=st["samples_oversized"],
        samples_over_memory=st["samples_over_memory"],
    )
    return entry


def memory_report(plan, activation, bound_gb: float, specs, top: int = 5) -> dict[str, Any]:
    """The predicted activation peak of every row of ``plan`` (``cost_model.ActivationModel``; GB = 1e9 bytes): its
    distribution, the bound, and the worst row with the samples that drive it (largest share of its peak first:
    ``add`` their linear part, ``peak`` their largest-segment attention term, which counts once per row)."""
    bound = activation.bound(plan.costs, 0)
    rows = plan.rows
    peaks = bound.row_peak(rows.ids, rows.offsets) / 1e9
    out: dict[str, Any] = {
        "bound_gb": float(bound_gb),
        "base_gb": bound.base / 1e9,
        "row_peak_gb": _summary(peaks),
        "samples_over_memory": int(len(rows.over_memory)),
    }
    if len(rows):
        worst = int(np.argmax(peaks))
        ids = rows.row(worst)
        share = bound.add[ids] + bound.peak[ids]
        drivers = []
        for i in ids[np.argsort(-share, kind="stable")][:top]:
            d, r = plan.keys(np.array([i]))[0]
            drivers.append(
                {
                    "dataset": specs[d].name if d < len(specs) else d,
                    "record": r,
                    "tokens": int(plan.costs[i, 0]),
                    "patches": int(plan.costs[i, 1]),
                    "add_gb": float(bound.add[i] / 1e9),
                    "peak_gb": float(bound.peak[i] / 1e9),
                }
            )
        out["worst_row"] = {"row": worst, "peak_gb": float(peaks[worst]), "samples": len(ids), "top": drivers}
    return out


def _verdict(over: dict[str, float], threshold: float) -> str:
    if not over:
        return f"OK: no dataset has more than {threshold:.2%} bad records"
    parts = ", ".join(f"{n!r} {r:.2%}" for n, r in over.items())
    return (
        f"TOO MANY BAD RECORDS: {parts} above the threshold {threshold:.2%} (training would abort on these datasets "
        "at data.max_bad_fraction); see the reasons below"
    )
