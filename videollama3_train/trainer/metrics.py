"""What a run measures and where it goes: training FLOPs and MFU, the per-step metrics, the one metrics writer.

FLOPs follow docs/reference.md §6 term by term so every MFU figure of this project is comparable with the
measured anchors of docs/reference.md §5: training counts 3x the forward matmuls, recomputation (activation
checkpointing) is not counted, attention is counted per unpacked sample (causal: half of the full square), and the
vision tower's attention is counted per image / per video frame, which is its attention segment. The counts are
read from the CPU batches (:func:`batch_stats`), so measuring never waits on the GPU::

    shape = shape_from_config(model.config)
    stats = combine_batch_stats([batch_stats(b) for b in micro_batches])   # on CPU, before .to(device)
    flops = flops_per_step(shape, stats, llm_trains=True, vision_trains=True)["total"]
    # all-reduce ``flops`` (sum over ranks), then
    writer.log(step, {"loss": ..., **throughput(stats, flops_all_ranks, seconds, n_gpus)})

Speed metrics of every step: ``tokens_per_s`` and ``visual_tokens_per_s`` (all ranks), ``tflops_per_gpu`` and
``mfu`` (over the H100 bf16 peak 989.4 TFLOP/s, also on CPU, where the figure only shows relative changes),
``packing_fill`` (tokens over micro-batches times the loader's ``token_budget``, when it has one),
``data_wait_fraction`` (mean over ranks of the time blocked on the loader, over rank 0's step time). On CUDA a
step's time is taken after the update is queued, not finished: the next step's sync absorbs the rest, so averages
over steps are right.

Where they go: :class:`StepLog` holds each step's metrics until a log step (``log_every``: the per-dataset losses
need a device-to-host copy and a gather over ranks, the loaders' skip counters a collective), then hands the rows
to the one :class:`MetricsWriter` (``metrics.jsonl``, W&B, progress bar) and to fit's ``on_step`` hook.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from videollama3_train.contract import IGNORE_INDEX, merged_token_counts
from videollama3_train.data.cost_model import FlopsShape, training_flops
from videollama3_train.model.api import flops_dimensions

log = logging.getLogger(__name__)

# dense bf16 FLOP/s of one H100 SXM; the denominator of every MFU in docs/reference.md §5
H100_BF16_PEAK = 989.4e12


# ---------------------------------------------------------------------------------------------------------------
# Shapes and batch statistics
# ---------------------------------------------------------------------------------------------------------------


def shape_from_config(config: Any) -> FlopsShape:
    """The FLOPs dimensions of a transformers ``VideoLlama3Config`` (or an object with the same fields)."""
    return FlopsShape(**flops_dimensions(config))


def _segments(grid: torch.Tensor | None) -> list[int]:
    """Patches per tower attention segment: each of the ``t`` frames of a ``(t, h, w)`` item is one segment."""
    if grid is None:
        return []
    return [int(h) * int(w) for t, h, w in grid.tolist() for _ in range(int(t))]


def _merged_tokens(grid: torch.Tensor | None, merge_sizes: torch.Tensor | None, key: str) -> int:
    if grid is None:
        return 0
    if merge_sizes is None:
        raise ValueError(f"{key}: every item of the grid needs a merge size (got none for {len(grid)} items)")
    return sum(merged_token_counts(grid, merge_sizes))


def batch_stats(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Counts of one (packed or padded) micro-batch that the FLOPs formula needs.

    Returns ``N_tokens`` (real tokens, padding excluded), ``N_logit_tokens`` (positions with a label, i.e. whose
    logits the loss computes), ``sample_lengths`` (``s_i``), ``N_visual_llm_tokens`` (visual tokens that reach the
    LLM: ``t*h*w/m^2`` per image, the kept tokens of ``video_compression_mask`` for videos) and
    ``segment_patches`` (``P_f``: ``h*w`` for each image and each video frame).

    Call it on the CPU batch, before moving it to the GPU: it reads small tensors with ``.tolist()``.
    """
    if "input_ids" not in batch or "labels" not in batch:
        raise ValueError(f"batch needs input_ids and labels, got keys {sorted(batch)}")
    if batch.get("sample_lengths") is not None:
        lengths = [int(n) for n in batch["sample_lengths"]]
    elif batch.get("cu_seqlens") is not None:
        lengths = torch.diff(batch["cu_seqlens"].cpu()).tolist()
    else:  # an unpacked row per sample, no padding information: every row is one sample
        ids = batch["input_ids"]
        lengths = [int(ids.shape[-1])] * (ids.shape[0] if ids.ndim == 2 else 1)

    n_visual = _merged_tokens(batch.get("image_grid_thw"), batch.get("image_merge_sizes"), "image")
    mask = batch.get("video_compression_mask")
    if mask is not None:
        n_visual += int(mask.sum())
    else:
        n_visual += _merged_tokens(batch.get("video_grid_thw"), batch.get("video_merge_sizes"), "video")

    return {
        "N_tokens": sum(lengths),
        "N_logit_tokens": int((batch["labels"] != IGNORE_INDEX).sum()),
        "sample_lengths": lengths,
        "N_visual_llm_tokens": n_visual,
        "segment_patches": _segments(batch.get("image_grid_thw")) + _segments(batch.get("video_grid_thw")),
    }


def combine_batch_stats(stats: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Stats of several micro-batches (gradient accumulation) as one: counts add, per-sample lists concatenate.

    Exact for the FLOPs formula, which is a sum over samples and segments.
    """
    out: dict[str, Any] = {
        "N_tokens": 0,
        "N_logit_tokens": 0,
        "sample_lengths": [],
        "N_visual_llm_tokens": 0,
        "segment_patches": [],
    }
    for s in stats:
        for key in ("N_tokens", "N_logit_tokens", "N_visual_llm_tokens"):
            out[key] += int(s[key])
        out["sample_lengths"] += list(s["sample_lengths"])
        out["segment_patches"] += list(s["segment_patches"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and MFU (docs/reference.md §6)
# ---------------------------------------------------------------------------------------------------------------


def flops_per_step(
    shape: FlopsShape, batch_stats: Mapping[str, Any], *, llm_trains: bool, vision_trains: bool
) -> dict[str, float]:
    """Training FLOPs of the micro-batches summarised by ``batch_stats``, term by term (docs/reference.md §6).

    ``llm_trains`` / ``vision_trains``: whether that module has trainable parameters. A frozen LLM still costs
    forward + input-gradient backward (``kl = 4``) because gradients flow through it to the projector; a frozen
    tower costs its forward only (``kv = 2``). The projector always trains (``6``). Returns ``F_llm``, ``F_head``,
    ``F_attn``, ``F_proj``, ``F_vit`` and ``total``, in FLOPs (computed with Python ints, returned as floats).
    """
    lengths = batch_stats["sample_lengths"]
    patches = batch_stats["segment_patches"]
    # the formula itself lives with the packer's cost model (one formula for MFU and for dealing rows)
    terms = {
        k: float(v)
        for k, v in training_flops(
            shape,
            tokens=int(batch_stats["N_tokens"]),
            logit_tokens=int(batch_stats["N_logit_tokens"]),
            tokens_sq=sum(int(n) * int(n) for n in lengths),
            visual_llm_tokens=int(batch_stats["N_visual_llm_tokens"]),
            patches=sum(int(p) for p in patches),
            patches_sq=sum(int(p) * int(p) for p in patches),
            llm_trains=llm_trains,
            vision_trains=vision_trains,
        ).items()
    }
    terms["total"] = math.fsum(terms.values())
    return terms


def mfu(flops: float, seconds: float, n_gpus: int, peak: float = H100_BF16_PEAK) -> float:
    """Model FLOPs utilisation in [0, 1]: ``flops`` summed over all ranks, done in ``seconds`` on ``n_gpus``."""
    if seconds <= 0 or n_gpus <= 0 or peak <= 0:
        raise ValueError(f"mfu needs seconds, n_gpus and peak > 0, got {seconds}, {n_gpus}, {peak}")
    return flops / (seconds * peak * n_gpus)


def throughput(
    stats: Mapping[str, Any], flops: float, seconds: float, n_gpus: int, peak: float = H100_BF16_PEAK
) -> dict[str, float]:
    """The per-step speed metrics we log: real tokens/s (all ranks), visual LLM tokens/s when ``stats`` has
    ``N_visual_llm_tokens``, TFLOP/s per GPU and MFU.

    ``stats`` and ``flops`` must cover the same work (both summed over ranks, or both of one rank with
    ``n_gpus=1``). ``peak`` defaults to the H100 bf16 peak on every device, CPU included, so figures stay
    comparable with docs/reference.md §5; on other hardware MFU only shows relative changes.
    """
    if seconds <= 0:
        raise ValueError(f"step time must be > 0 s, got {seconds}")
    out = {"tokens_per_s": stats["N_tokens"] / seconds}
    if "N_visual_llm_tokens" in stats:
        out["visual_tokens_per_s"] = stats["N_visual_llm_tokens"] / seconds
    out["tflops_per_gpu"] = flops / seconds / n_gpus / 1e12
    out["mfu"] = mfu(flops, seconds, n_gpus, peak)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The metrics of one step
# ---------------------------------------------------------------------------------------------------------------


def step_metrics(
    host: Mapping[str, float], *, seconds: float, world: int, capacity: float = 0
) -> dict[str, Any]:
    """The loss and speed metrics of one optimizer step from its host values (all ranks summed): ``label_tokens``,
    ``tokens``, ``visual_tokens``, ``flops``, ``data_wait_s``, ``loss_sum``, ``grad_norm``. ``capacity``: tokens the
    step's packed rows could hold, all ranks (0: unknown, no ``packing_fill``)."""
    n_labels, n_tokens, n_visual = host["label_tokens"], host["tokens"], host["visual_tokens"]
    out = {
        "loss": host["loss_sum"] / max(n_labels, 1.0),
        "grad_norm": host["grad_norm"],
        "tokens": int(n_tokens),
        "label_tokens": int(n_labels),
        "visual_tokens": int(n_visual),
        "seconds": seconds,
        "data_wait_fraction": min(host["data_wait_s"] / world / seconds, 1.0),
        **throughput(
            {"N_tokens": n_tokens, "N_visual_llm_tokens": n_visual},
            host["flops"],
            seconds,
            world,
            H100_BF16_PEAK,
        ),
    }
    if capacity:
        out["packing_fill"] = n_tokens / capacity
    return out


def skip_counts(loader: Any, accelerator) -> dict[str, int]:
    """``skipped/<reason>``: samples the loaders of all ranks dropped for bad data so far (cumulative, restored on
    resume). Collective when distributed: every rank must call it at the same step."""
    local = dict(loader.skipped or {})
    if accelerator.num_processes > 1:
        gathered: list[dict[str, int] | None] = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(gathered, local)
    else:
        gathered = [local]
    total: dict[str, int] = defaultdict(int)
    for counts in gathered:
        for reason, n in (counts or {}).items():
            total[f"skipped/{reason}"] += int(n)
    return dict(total)


PerSample = list[tuple[list[dict], Tensor]]  # (meta, (n_samples, 2) [loss sum, label tokens]) per micro-batch


class StepLog:
    """Each step's metrics, held until a log step, then written: through ``writer`` and ``on_step``, rank 0 only.

    Cadence: every ``log_every`` steps, at the last step and at a stop (:meth:`should_flush`). Until then the
    per-sample losses (``trainer.step.per_sample_losses``) stay on the device; at a flush they become
    ``loss/dataset/<name>`` and ``loss/modality/<m>``: the mean token loss of the step's samples of that dataset /
    modality on EVERY rank (sums and label-token counts per key, gathered from all ranks in one
    ``all_gather_object`` per flush, then divided). :meth:`flush` is therefore collective when distributed: every
    rank calls it at the same steps (fit does). ``last`` is the newest step row written.

    A step row (what fit's ``on_step`` and ``metrics.jsonl`` get): step, epoch, loss, loss/dataset/<name>,
    loss/modality/<m>, lr/<group>, grad_norm, tokens, label_tokens, visual_tokens, seconds, tokens_per_s,
    visual_tokens_per_s, tflops_per_gpu, mfu, data_wait_fraction, packing_fill (when the loader has a token
    budget), skipped_nonfinite, nonfinite; on log steps also skipped/<reason> (the loaders' bad samples, all ranks,
    cumulative). A step whose micro-batches brought no per-sample losses (a fused loss kernel on a step that did
    not ask for them, see ``trainer.step.forward_backward``) has no loss/dataset and loss/modality keys. An
    evaluation row: step and eval/<name>.
    """

    def __init__(
        self,
        writer: MetricsWriter,
        *,
        log_every: int,
        is_main: bool,
        on_step: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.writer, self.log_every, self.is_main, self.on_step = writer, log_every, is_main, on_step
        self.pending: list[tuple[dict[str, Any], PerSample]] = []
        self.last: dict[str, Any] = {}

    def add(self, metrics: dict[str, Any], per_sample: PerSample) -> None:
        self.pending.append((metrics, per_sample))

    def should_flush(self, step: int, last: bool, stop: bool) -> bool:
        return step % self.log_every == 0 or last or stop

    def flush(self, extra: Mapping[str, Any] | None = None) -> None:
        """Write the held rows; ``extra`` joins the newest one (e.g. the skip counters of this log step).

        Collective when distributed and rows are held (every rank holds as many rows as the others)."""
        if extra and self.pending:
            self.pending[-1][0].update(extra)
        if self.pending:
            breakdowns = reduce_breakdowns([local_breakdown(ps) for _, ps in self.pending])
            if self.is_main:
                for (metrics, _), breakdown in zip(self.pending, breakdowns, strict=True):
                    self._emit({**{k: _scalar(v) for k, v in metrics.items()}, **breakdown})
        self.pending.clear()

    def add_eval(self, step: int, values: Mapping[str, Any]) -> None:
        # rows still held go out first: W&B drops a row whose step is lower than one already logged (collective:
        # every rank calls add_eval at the same step)
        self.flush()
        if self.is_main and values:
            self._emit({"step": step, **{f"eval/{k}": _scalar(v) for k, v in values.items()}})

    def _emit(self, row: dict[str, Any]) -> None:
        self.writer.log(row["step"], row)
        if self.on_step is not None:
            self.on_step(row)
        if "loss" in row:
            self.last = row

    def close(self) -> dict[str, Any]:
        """Flush what is held (collective, as :meth:`flush`); the newest step row."""
        self.flush()
        return dict(self.last)


def local_breakdown(per_sample: PerSample) -> dict[str, list[float]]:
    """``{"loss/dataset/<name>" | "loss/modality/<m>": [sum of token losses, label tokens]}`` of this rank's
    micro-batches of one step (one device-to-host copy)."""
    items = []
    for meta, stats in per_sample:
        if meta and len(meta) != stats.shape[0]:
            log.warning(
                "a micro-batch has %d samples in meta but %d per-sample losses (sample_lengths): left out of "
                "loss/dataset and loss/modality",
                len(meta),
                stats.shape[0],
            )
        elif meta:
            items.append((meta, stats))
    if not items:
        return {}
    host = torch.cat([stats for _, stats in items]).tolist()
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    rows = iter(host)
    for meta, _ in items:
        for m in meta:
            s, c = next(rows)
            for key in (
                f"loss/dataset/{m.get('dataset', '') or 'unnamed'}",
                f"loss/modality/{m.get('modality', 'text')}",
            ):
                out[key][0] += s
                out[key][1] += c
    return dict(out)


def reduce_breakdowns(local: list[dict[str, list[float]]]) -> list[dict[str, float]]:
    """Mean token loss per key of each step, over every rank: the ``[sum, count]`` of each key are summed over the
    ranks (one ``all_gather_object`` of these small dicts when ``torch.distributed`` runs with several
    processes; every rank must call it with as many steps), then divided. Keys with no label token are dropped."""
    gathered = [local]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, local)
    out = []
    for i in range(len(local)):
        sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for rank_steps in gathered:
            for key, (s, c) in (rank_steps[i] if i < len(rank_steps) else {}).items():
                sums[key][0] += s
                sums[key][1] += c
        out.append({k: s / c for k, (s, c) in sorted(sums.items()) if c > 0})
    return out


# ---------------------------------------------------------------------------------------------------------------
# The metrics writer
# ---------------------------------------------------------------------------------------------------------------

WANDB_MODES = ("online", "offline", "disabled")
# Progress-bar names of the per-group learning rates.
_BAR_LRS = {"lr/vision": "lr_vision", "lr/projector": "lr_projector", "lr/llm": "lr_llm"}


class MetricsWriter:
    """The run's one metrics sink: ``<out_dir>/metrics.jsonl``, W&B and a progress bar on the console.

    The JSONL file is the source of truth (the report reads it; appended to, one flushed line per call, so a
    resumed or crashed run keeps every step it finished; JSON has no NaN/Inf, so non-finite values are written as
    the strings ``"nan"``, ``"inf"``); W&B is a view, imported only when ``wandb_mode`` is not ``"disabled"``, so a
    machine without it trains fine. The W&B run id is kept in ``<out_dir>/wandb_run_id`` so that a resumed run
    appends to the same W&B run. Build it on every rank with ``enabled`` true on rank 0 only: a disabled writer
    opens nothing and ignores every call.

    The progress bar opens when the number of steps is known (``total_steps``, or :meth:`start`, which fit calls
    after planning) and shows the loss, the lr of each trainable group and tokens/s; without it a step row is one
    console log line.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        project: str = "videollama3-train",
        run_name: str | None = None,
        wandb_mode: str = "disabled",
        config: Mapping[str, Any] | None = None,
        enabled: bool = True,
        total_steps: int | None = None,
        group: str | None = None,
        job_type: str | None = None,
    ) -> None:
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {WANDB_MODES}, got {wandb_mode!r}")
        self.out_dir = Path(out_dir)
        self.jsonl_path = self.out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.summaries: dict[str, Any] = {}  # every summary() value, for the run's results
        self._jsonl = None
        self._run = None
        self._bar = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        if wandb_mode != "disabled":
            try:
                self._run = self._init_wandb(project, run_name, wandb_mode, config, group, job_type)
            except BaseException:
                self._jsonl.close()
                raise
        if total_steps is not None:
            self.start(total_steps)

    def _init_wandb(
        self,
        project: str,
        name: str | None,
        mode: str,
        config: Mapping[str, Any] | None,
        group: str | None,
        job_type: str | None,
    ) -> Any:
        import wandb  # lazy: optional at runtime

        id_file = self.out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        run = wandb.init(
            project=project,
            name=name,
            dir=str(self.out_dir),
            mode=mode,
            config=dict(config or {}),
            id=run_id,
            resume="allow" if run_id else None,
            group=group,  # a pipeline's stages share one group: one row of runs on the dashboard
            job_type=job_type,  # the stage
        )
        id_file.write_text(run.id)
        # every metric, evaluations (eval/*, bench/*) included, plots against the optimizer step
        run.define_metric("trainer/step")
        for pattern in ("eval/*", "bench/*", "*"):
            run.define_metric(pattern, step_metric="trainer/step")
        return run

    @property
    def wandb_run(self) -> Any:
        """The W&B run object, or ``None`` when W&B is disabled."""
        return self._run

    def start(self, total_steps: int, step: int = 0) -> None:
        """(Re)open the progress bar at ``step`` of ``total_steps``."""
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if self._bar is not None:
            self._bar.close()
        self._bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` (scalars) of optimizer step ``step``: a JSONL line, a W&B row, the progress bar."""
        if not self.enabled:
            return
        row = {"step": int(step), **{str(k): _scalar(v) for k, v in metrics.items() if k != "step"}}
        self._jsonl.write(json.dumps({k: _json_safe(v) for k, v in row.items()}) + "\n")
        self._jsonl.flush()  # a crashed run keeps every step it finished
        if self._run is not None:
            wb = {k: v for k, v in row.items() if k != "step"}
            self._run.log({**wb, "trainer/step": int(step)}, step=int(step))
        if "loss" in row:
            self._show(row)

    def _show(self, row: dict[str, Any]) -> None:
        shown = {"loss": f"{row['loss']:.4f}"}
        shown.update({short: f"{row[k]:.2e}" for k, short in _BAR_LRS.items() if k in row})
        shown["tok_s"] = f"{row.get('tokens_per_s', 0):.0f}"
        if self._bar is None:
            log.info("step %d | %s", row["step"], " | ".join(f"{k} {v}" for k, v in shown.items()))
            return
        self._bar.n = row["step"]
        self._bar.set_postfix(shown)
        if self._bar.total is not None and row["step"] >= self._bar.total:
            self._bar.close()
            self._bar = None

    def summary(self, values: Mapping[str, Any]) -> None:
        """Final values of the run (e.g. held-out accuracy): W&B summary, ``<out_dir>/summary.json`` (merged with
        what an earlier stage run wrote there) and :attr:`summaries`."""
        clean = {str(k): _scalar(v) for k, v in values.items()}
        self.summaries.update(clean)
        if not self.enabled:
            return
        path = self.out_dir / "summary.json"
        previous = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**previous, **clean}, indent=2) + "\n")
        if self._run is not None:
            self._run.summary.update(clean)

    def config(self, values: Mapping[str, Any]) -> None:
        """Add ``values`` to the W&B run's config (e.g. the effective learning rates and budgets)."""
        if self._run is not None:
            self._run.config.update(dict(values), allow_val_change=True)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A W&B table at ``step`` (nothing without W&B): one row per entry of ``rows``; an RGB ``numpy`` array
        cell becomes an image (a thumbnail), ``None`` stays empty."""
        if self._run is None:
            return
        import numpy as np
        import wandb

        def cell(v: Any) -> Any:
            return wandb.Image(v) if isinstance(v, np.ndarray) else v

        table = wandb.Table(columns=list(columns), data=[[cell(v) for v in row] for row in rows])
        self._run.log({key: table, "trainer/step": int(step)}, step=int(step))

    def log_artifact(self, name: str, kind: str, paths: Iterable[str | os.PathLike]) -> None:
        """Files (``paths``, e.g. the doctor's report and plots) as one W&B artifact of type ``kind``."""
        if self._run is None:
            return
        import wandb

        artifact = wandb.Artifact(name, type=kind)
        for p in paths:
            artifact.add_file(str(p))
        self._run.log_artifact(artifact)

    def finish(self) -> None:
        """Close the progress bar, the JSONL file and the W&B run (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jsonl is not None and not self._jsonl.closed:
            self._jsonl.close()
        if self._run is not None:
            self._run.finish()
            self._run = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


RunLogger = MetricsWriter  # the name of the W&B half before the two writers were merged


def _scalar(value: Any) -> Any:
    """Plain Python value for JSON / W&B: 0-d tensors and numpy scalars become numbers."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"only scalar metrics can be logged, got a tensor of shape {tuple(value.shape)}")
        return value.item()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def _json_safe(v: Any) -> Any:
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


__all__ = [
    "H100_BF16_PEAK",
    "FlopsShape",
    "MetricsWriter",
    "RunLogger",
    "StepLog",
    "batch_stats",
    "combine_batch_stats",
    "flops_per_step",
    "local_breakdown",
    "mfu",
    "reduce_breakdowns",
    "shape_from_config",
    "skip_counts",
    "step_metrics",
    "throughput",
]
