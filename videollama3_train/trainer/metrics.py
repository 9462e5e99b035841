"""Training FLOPs, MFU and run logging (W&B + JSONL + console).

FLOPs follow ../shared REFERENCE §6 term by term so every MFU figure of this project is comparable with the
measured anchors of REFERENCE §5: training counts 3x the forward matmuls, recomputation (activation
checkpointing) is not counted, attention is counted per unpacked sample (causal: half of the full square), and the
vision tower's attention is counted per image / per video frame, which is its attention segment.

Usage in a loop (one optimizer step = several micro-batches on each rank)::

    shape = shape_from_config(model.config)
    stats = combine_batch_stats([batch_stats(b) for b in micro_batches])   # on CPU, before .to(device)
    flops = flops_per_step(shape, stats, llm_trains=True, vision_trains=True)["total"]
    # all-reduce ``flops`` (sum over ranks), then
    logger.log(step, {"loss": ..., **throughput(stats, flops_all_ranks, seconds, n_gpus)})
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

H100_BF16_PEAK = 989.4e12  # dense bf16 FLOP/s of one H100 SXM; the denominator of every MFU in REFERENCE §5
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------------------
# Shapes and batch statistics
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopsShape:
    """The dimensions REFERENCE §6 uses (names kept as there).

    LLM: hidden ``d``, query heads ``nq``, KV heads ``nkv``, head dim ``hd``, MLP intermediate ``ff``, layers
    ``Ll``, vocabulary ``V``. Vision tower: hidden ``dv``, MLP intermediate ``ffv``, layers ``Lv``, patch side
    ``patch`` in pixels (14 for every VideoLLaMA3 checkpoint; REFERENCE writes the constant 14).
    """

    d: int
    nq: int
    nkv: int
    hd: int
    ff: int
    Ll: int
    V: int
    dv: int
    ffv: int
    Lv: int
    patch: int = 14
    channels: int = 3


def shape_from_config(config: Any) -> FlopsShape:
    """Read the FLOPs dimensions from a transformers ``VideoLlama3Config`` (or an object with the same fields)."""
    text, vision = getattr(config, "text_config", None), getattr(config, "vision_config", None)
    if text is None or vision is None:
        raise ValueError(
            f"expected a VideoLlama3Config with text_config and vision_config, got {type(config)}"
        )
    nq = int(text.num_attention_heads)
    # Qwen2 configs may omit head_dim (then it is hidden / heads); a set value wins.
    hd = getattr(text, "head_dim", None) or text.hidden_size // nq
    patch = vision.patch_size
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise ValueError(f"non-square vision patch {patch} is not supported by the FLOPs count")
        patch = patch[0]
    return FlopsShape(
        d=int(text.hidden_size),
        nq=nq,
        nkv=int(getattr(text, "num_key_value_heads", None) or nq),
        hd=int(hd),
        ff=int(text.intermediate_size),
        Ll=int(text.num_hidden_layers),
        V=int(text.vocab_size),
        dv=int(vision.hidden_size),
        ffv=int(vision.intermediate_size),
        Lv=int(vision.num_hidden_layers),
        patch=int(patch),
        channels=int(getattr(vision, "num_channels", 3)),
    )


def _segments(grid: torch.Tensor | None) -> list[int]:
    """Patches per tower attention segment: each of the ``t`` frames of a ``(t, h, w)`` item is one segment."""
    if grid is None:
        return []
    return [int(h) * int(w) for t, h, w in grid.tolist() for _ in range(int(t))]


def _merged_tokens(grid: torch.Tensor | None, merge_sizes: torch.Tensor | None, key: str) -> int:
    if grid is None:
        return 0
    if merge_sizes is None or len(merge_sizes) != len(grid):
        raise ValueError(
            f"{key}: every item of the grid needs a merge size (got {merge_sizes!r} for {len(grid)})"
        )
    return sum(
        int(t) * int(h) * int(w) // int(m) ** 2 for (t, h, w), m in zip(grid.tolist(), merge_sizes.tolist())
    )


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
# FLOPs and MFU (REFERENCE §6)
# ---------------------------------------------------------------------------------------------------------------


def flops_per_step(
    shape: FlopsShape, batch_stats: Mapping[str, Any], *, llm_trains: bool, vision_trains: bool
) -> dict[str, float]:
    """Training FLOPs of the micro-batches summarised by ``batch_stats``, term by term (REFERENCE §6).

    ``llm_trains`` / ``vision_trains``: whether that module has trainable parameters. A frozen LLM still costs
    forward + input-gradient backward (``kl = 4``) because gradients flow through it to the projector; a frozen
    tower costs its forward only (``kv = 2``). The projector always trains (``6``). Returns ``F_llm``, ``F_head``,
    ``F_attn``, ``F_proj``, ``F_vit`` and ``total``, in FLOPs (computed with Python ints, returned as floats).
    """
    s = shape
    kl = 6 if llm_trains else 4
    kv = 6 if vision_trains else 2
    lengths = batch_stats["sample_lengths"]
    patches = batch_stats["segment_patches"]

    w_layer = s.d * s.nq * s.hd + 2 * s.d * s.nkv * s.hd + s.nq * s.hd * s.d + 3 * s.d * s.ff
    f_llm = kl * s.Ll * w_layer * batch_stats["N_tokens"]
    f_head = kl * s.d * s.V * batch_stats["N_logit_tokens"]
    f_attn = kl * s.Ll * s.nq * s.hd * sum(n * n for n in lengths)
    f_proj = 6 * (s.dv * s.d + s.d * s.d) * batch_stats["N_visual_llm_tokens"]
    # The patch-embedding conv is a (channels * patch^2) x dv matmul per patch; REFERENCE writes 3*14*14*dv.
    w_vit = s.Lv * (4 * s.dv * s.dv + 2 * s.dv * s.ffv) + s.channels * s.patch * s.patch * s.dv
    f_vit = kv * w_vit * sum(patches) + 2 * kv * s.Lv * s.dv * sum(p * p for p in patches)

    terms = {
        "F_llm": float(f_llm),
        "F_head": float(f_head),
        "F_attn": float(f_attn),
        "F_proj": float(f_proj),
        "F_vit": float(f_vit),
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
    comparable with REFERENCE §5; on other hardware MFU only shows relative changes.
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
# Run logging
# ---------------------------------------------------------------------------------------------------------------

WANDB_MODES = ("online", "offline", "disabled")


def _scalar(value: Any) -> Any:
    """Plain Python value for JSON / W&B: 0-d tensors and numpy scalars become numbers."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"only scalar metrics can be logged, got a tensor of shape {tuple(value.shape)}")
        return value.item()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


class RunLogger:
    """Writes every step's metrics to ``<output_dir>/metrics.jsonl`` and, unless disabled, to W&B.

    The JSONL file is the source of truth (the report reads it); W&B is a view. ``wandb`` is imported only when
    ``wandb_mode`` is not ``"disabled"``, so a machine without it trains fine. The W&B run id is stored in
    ``<output_dir>/wandb_run_id`` so a resumed run keeps appending to the same W&B run (and the JSONL is opened in
    append mode). Create it on rank 0 only.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        project: str = "videollama3-train",
        name: str | None = None,
        wandb_mode: str = "offline",
        config: Mapping[str, Any] | None = None,
        console_every: int = 1,
        console_keys: Sequence[str] = ("loss", "grad_norm", "tokens_per_s", "mfu"),
        jsonl: bool = True,
    ) -> None:
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {WANDB_MODES}, got {wandb_mode!r}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        # fit() keeps its own metrics.jsonl; a logger fed by fit's on_step hook passes jsonl=False
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8") if jsonl else io.StringIO()
        self.console_every = console_every
        self.console_keys = tuple(console_keys)
        self._run = None
        if wandb_mode != "disabled":
            try:
                self._run = self._init_wandb(project, name, wandb_mode, config)
            except BaseException:
                self._jsonl.close()
                raise

    def _init_wandb(self, project: str, name: str | None, mode: str, config: Mapping[str, Any] | None) -> Any:
        import wandb  # lazy: optional at runtime

        id_file = self.output_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        run = wandb.init(
            project=project,
            name=name,
            dir=str(self.output_dir),
            mode=mode,
            config=dict(config or {}),
            id=run_id,
            resume="allow" if run_id else None,
        )
        id_file.write_text(run.id)
        return run

    @property
    def wandb_run(self) -> Any:
        """The W&B run object, or ``None`` when W&B is disabled."""
        return self._run

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` (scalars) for optimizer step ``step``; flushes the JSONL line at once."""
        clean = {str(k): _scalar(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()  # a crashed run keeps every step it finished
        if self._run is not None:
            self._run.log(clean, step=int(step))
        if self.console_every > 0 and step % self.console_every == 0:
            shown = [f"{k} {_fmt(clean[k])}" for k in self.console_keys if k in clean]
            log.info("step %d | %s", step, " | ".join(shown))

    def summary(self, values: Mapping[str, Any]) -> None:
        """Final values of the run (e.g. held-out accuracy): W&B summary and ``<output_dir>/summary.json``."""
        clean = {str(k): _scalar(v) for k, v in values.items()}
        path = self.output_dir / "summary.json"
        previous = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**previous, **clean}, indent=2) + "\n")
        if self._run is not None:
            self._run.summary.update(clean)

    def finish(self) -> None:
        """Close the JSONL file and the W&B run (idempotent)."""
        if not self._jsonl.closed:
            self._jsonl.close()
        if self._run is not None:
            self._run.finish()
            self._run = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


__all__ = [
    "H100_BF16_PEAK",
    "FlopsShape",
    "RunLogger",
    "batch_stats",
    "combine_batch_stats",
    "flops_per_step",
    "mfu",
    "shape_from_config",
    "throughput",
]
