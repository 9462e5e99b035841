"""The one training loop: every stage, every backend (DDP, ZeRO-1/2/3 through accelerate), CPU or CUDA.

One optimizer step, as :func:`fit` tells it:

1. take ``grad_accum`` packed micro-batches from the loader and count their label tokens; all-reduce the count, so
   the loss is normalised exactly once by the label tokens of the whole global batch (REFERENCE §4: the official
   code divides twice under DeepSpeed);
2. forward each micro-batch through ``model.model`` (hidden states, never full logits), chunked cross-entropy
   against ``lm_head.weight``, backward ``loss_sum / global_count`` times the factor that cancels the backend's own
   averaging (DDP: 1/world; DeepSpeed: 1/world and 1/GA); gradients sync only on the last micro-batch;
3. clip (the norm is logged), skip the update if the loss or the norm is not finite, step AdamW and the schedule;
4. log, checkpoint, evaluate, each on its own cadence; SIGTERM ends the run after the step with a checkpoint.

Host syncs: the per-step counts (label tokens, tokens, visual tokens, FLOPs, data-wait seconds) are computed on the
CPU batches and summed over ranks in the one all-reduce that the loss normaliser needs anyway; the loss, the norm
and the stop votes reach the host in the single ``.tolist()`` that decides whether to apply the update. Only log
steps sync more (per-dataset losses, the loader's skip counters of every rank).

Speed metrics of every step (see :mod:`videollama3_train.trainer.metrics`): ``tokens_per_s`` and
``visual_tokens_per_s`` (all ranks), ``tflops_per_gpu`` and ``mfu`` (REFERENCE §6 FLOPs over the H100 bf16 peak
989.4 TFLOP/s, also on CPU, where the figure only shows relative changes), ``packing_fill`` (tokens over
micro-batches times ``loader.token_budget``, when the loader has that attribute), ``data_wait_fraction`` (mean over
ranks of the time blocked on the loader, over rank 0's step time). On CUDA a step's time is taken after the update
is queued, not finished: the next step's sync absorbs the rest, so averages over steps are right.

An out-of-memory micro-batch is re-raised as ``torch.OutOfMemoryError`` naming its size, its samples and the config
keys that bound them.

The vision tower and projector run on every rank at every micro-step (a 4-patch dummy image when a micro-batch is
text-only), so ZeRO-3 never waits on a rank that skipped the tower and DDP needs no ``find_unused_parameters``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from videollama3_train.model.groups import apply_trainable, build_param_groups, trainable_table
from videollama3_train.trainer.checkpoint import (
    LoopState,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from videollama3_train.trainer.config import TrainConfig
from videollama3_train.trainer.loss import chunked_cross_entropy, shift_and_select
from videollama3_train.trainer.metrics import (
    H100_BF16_PEAK,
    batch_stats,
    combine_batch_stats,
    flops_per_step,
    shape_from_config,
    throughput,
)

DEFAULT_DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


def resolve_precision(cfg: TrainConfig) -> str:
    """``"bf16"`` or ``"fp32"``; ``auto`` means bf16 exactly when CUDA is available."""
    if cfg.precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return cfg.precision


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The ZeRO json of ``cfg.backend`` with every ``"auto"`` resolved from ``cfg`` (our loader is not a DataLoader,
    so accelerate cannot infer batch sizes)."""
    stage = int(cfg.backend[-1])
    folder = Path(cfg.deepspeed_config_dir) if cfg.deepspeed_config_dir else DEFAULT_DEEPSPEED_DIR
    path = folder / f"zero{stage}.json"
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config for backend {cfg.backend!r} not found at {path}")
    ds = json.loads(path.read_text())
    # One packed row per micro-batch; DeepSpeed's engine steps after grad_accum of them.
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.grad_accum * world_size
    ds["gradient_clipping"] = cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0
    bf16 = resolve_precision(cfg) == "bf16"
    ds["bf16"] = {"enabled": bf16}
    ds["fp16"] = {"enabled": False}
    ds.setdefault("zero_optimization", {})["stage"] = stage
    return ds


def build_accelerator(cfg: TrainConfig):
    """An ``Accelerator`` for ``cfg.backend``: DDP (gloo on CPU, NCCL on CUDA) or DeepSpeed ZeRO-N."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    mixed = "bf16" if resolve_precision(cfg) == "bf16" else "no"
    if cfg.backend == "ddp":
        # Every parameter gets a gradient every step (dummy tower pass), so the unused-parameter search is off.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
        # Without cpu=True accelerate ignores a torchrun launch on a CUDA-less host (each rank would train alone).
        return Accelerator(mixed_precision=mixed, kwargs_handlers=[ddp], cpu=not torch.cuda.is_available())
    # The launcher's WORLD_SIZE: accelerate's state must not be created before the Accelerator (it is a singleton).
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, world))
    handlers = []
    if not torch.cuda.is_available():
        # DeepSpeed runs on CPU with its CPU accelerator over gloo, but accelerate, finding no device backend,
        # would record a world of one process; naming gloo makes it read the real world size and rank.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(mixed_precision=mixed, deepspeed_plugin=plugin, kwargs_handlers=handlers)


def apply_gradient_checkpointing(model: nn.Module, mode: str, every_n_layers: int = 1) -> None:
    """Activation checkpointing of the decoder layers of the chosen tower(s), every ``every_n_layers``-th layer.

    transformers enables all ``GradientCheckpointingLayer``s at once; the layers of the tower that is not selected,
    and the ones between every n-th, are switched back off (REFERENCE §5: every 2nd LLM layer is the fast setting).
    """
    if mode == "none":
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    towers = {
        "llm": ("language_model",),
        "vision": ("vision_model",),
        "both": ("language_model", "vision_model"),
    }
    selected = towers[mode]
    index: dict[str, int] = defaultdict(int)
    for name, module in model.named_modules():
        if not isinstance(module, GradientCheckpointingLayer):
            continue
        tower = "vision_model" if ".vision_model." in f".{name}." else "language_model"
        module.gradient_checkpointing = tower in selected and index[tower] % every_n_layers == 0
        index[tower] += 1


def plan_steps(cfg: TrainConfig, loader: Any) -> tuple[int, list[int]]:
    """``(total_steps, steps per epoch)``. A loader with ``micro_batches_per_epoch(e)`` says how many micro-batches
    each epoch has (packing plans differ a little per epoch); otherwise every epoch has ``len(loader)``. Leftover
    micro-batches at an epoch end (fewer than grad_accum) are dropped."""
    if hasattr(loader, "micro_batches_per_epoch"):
        per_epoch = [loader.micro_batches_per_epoch(e) // cfg.grad_accum for e in range(cfg.epochs)]
    else:
        per_epoch = [len(loader) // cfg.grad_accum] * cfg.epochs
    if min(per_epoch) < 1:
        raise ValueError(
            f"an epoch of the loader yields fewer micro-batches than grad_accum={cfg.grad_accum}: not one "
            f"optimizer step fits (steps per epoch: {per_epoch})"
        )
    total = cfg.max_steps if cfg.max_steps > 0 else sum(per_epoch)
    return total, per_epoch


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable groups, one lr per component group (fused kernels on CUDA)."""
    groups = build_param_groups(model, cfg.lrs, cfg.weight_decay)
    on_cuda = next(model.parameters()).is_cuda or torch.cuda.is_available()
    return torch.optim.AdamW(groups, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=on_cuda or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warmup over ``warmup_ratio * total_steps`` steps, then cosine / linear decay to 0, or constant."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_schedule]
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


class LossModule(nn.Module):
    """Wraps the model so that DDP / DeepSpeed see the whole loss computation as one ``forward``.

    ``forward(batch)`` returns ``(loss_sum, token_losses, sample_ids)``: the fp32 sum of the token cross-entropies
    of the micro-batch (plus ``0 * dummy tower output`` when it has no pixels), and, detached, the ``(n,)`` per-token
    losses with the ``(n,)`` index of the packed sample each belongs to (for per-dataset logging).

    Only ``input_ids``, ``position_ids`` and the visual tensors reach the model: ``meta``, ``cu_seqlens`` and
    ``max_seqlen`` stay out (the vision tower would read a ``cu_seqlens`` kwarg as its own segment table; the
    attention backends derive segments from the position resets).
    """

    def __init__(self, model: nn.Module, chunk_size: int, zero3: bool = False):
        super().__init__()
        # A PEFT wrapper injects its adapters into the base model in place; the loss needs the base model's
        # ``.model`` (hidden states) and ``.lm_head``, which the wrapper's attribute lookup would shadow.
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        self.model = model
        self.chunk_size = chunk_size
        vc = model.config.vision_config
        self.patch_dim = vc.num_channels * vc.patch_size**2
        if zero3:
            # lm_head.weight is read outside lm_head.forward: ZeRO-3 must gather it for this module's forward.
            import deepspeed

            deepspeed.zero.register_external_parameter(self, model.lm_head.weight)

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None, Tensor]:
        # The tower runs exactly twice per micro-batch on every rank (images, then videos; a 4-patch zero image
        # stands in for a missing modality), before the LLM: under ZeRO-3 every rank must gather the same
        # parameters in the same order, or the collectives mismatch.
        encoded: dict[str, Any] = {}
        dummy = torch.zeros((), dtype=torch.float32, device=batch["input_ids"].device)
        for modality, (pix, grid, merge) in _TOWER_INPUTS.items():
            if batch.get(pix) is not None:
                encoded[modality] = self._tower(batch[pix], batch[grid], batch[merge])
            else:
                dummy = dummy + 0.0 * torch.cat(self._dummy_tower(dummy.device).pooler_output).float().sum()
        kwargs = {k: batch[k] for k in ("input_ids", "position_ids", "video_compression_mask") if k in batch}
        # attention_mask stays None and use_cache False: with per-sample position_ids that is what keeps packed
        # samples from attending to each other (REFERENCE §4).
        hidden = self.model.model(
            **kwargs, mm_encoder_outputs=encoded or None, use_cache=False
        ).last_hidden_state
        labels = batch["labels"]
        hidden_sel, targets = shift_and_select(hidden, labels)  # (n, d), (n,)
        head = self.model.lm_head
        loss_sum, _, token_losses = chunked_cross_entropy(
            hidden_sel,
            head.weight,
            targets,
            chunk_size=self.chunk_size,
            bias=head.bias,
            return_token_losses=True,
        )
        return loss_sum + dummy, token_losses, _sample_ids(batch, labels)

    def _tower(self, pixels: Tensor, grid: Tensor, merge: Tensor):
        """Vision tower + projector: ``pooler_output`` is a tuple of ``(t*h*w/m^2, d)`` tensors, one per item."""
        return self.model.model.get_image_features(
            pixel_values=pixels, image_grid_thw=grid, image_merge_sizes=merge
        )

    def _dummy_tower(self, device: torch.device):
        """The tower on a zero 2x2-patch image (merge 1): ties the tower into the graph at negligible cost."""
        pixels = torch.zeros(4, self.patch_dim, device=device)
        grid = torch.tensor([[1, 2, 2]], device=device)
        return self._tower(pixels, grid, torch.ones(1, dtype=torch.long, device=device))


_TOWER_INPUTS = {
    "image": ("pixel_values", "image_grid_thw", "image_merge_sizes"),
    "video": ("pixel_values_videos", "video_grid_thw", "video_merge_sizes"),
}


def _sample_ids(batch: dict[str, Any], labels: Tensor) -> Tensor:
    """``(n,)`` packed-sample index of each labelled position (same order as :func:`shift_and_select`)."""
    lengths = batch.get("sample_lengths") or [labels.shape[-1]]
    ids = torch.repeat_interleave(
        torch.arange(len(lengths), device=labels.device), torch.tensor(lengths, device=labels.device)
    )
    t = labels[0, 1:]
    # Position i predicts label i+1, which belongs to the same sample: each sample's first label is -100.
    return ids[1:][t != -100]


def _placeholder_batch() -> dict[str, Any]:
    """A two-token text row with no label: stands in for a micro-batch whose samples all failed."""
    return {
        "input_ids": torch.zeros(1, 2, dtype=torch.long),
        "labels": torch.full((1, 2), -100, dtype=torch.long),
        "position_ids": torch.arange(2).unsqueeze(0),
        "meta": [],
        "sample_lengths": [2],
    }


class _StepBatches:
    """Yields the ``grad_accum`` micro-batches of each optimizer step, crossing epochs.

    At the start of each new epoch (not the resumed one) ``loader.set_epoch(epoch)`` is called when the loader
    has it; the loader must then start that epoch from its beginning.
    """

    def __init__(self, loader: Iterable, state: LoopState, steps_per_epoch: list[int], grad_accum: int):
        self.loader, self.state = loader, state
        self.per_epoch, self.grad_accum = steps_per_epoch, grad_accum
        self._it: Iterator | None = None

    @property
    def steps_per_epoch(self) -> int:
        # past the planned epochs (max_steps beyond them) the last epoch's length repeats
        return self.per_epoch[min(self.state.epoch, len(self.per_epoch) - 1)]

    def next_step(self) -> list[dict[str, Any]]:
        if self.state.step_in_epoch >= self.steps_per_epoch:
            self.state.epoch += 1
            self.state.step_in_epoch = 0
            self._start_epoch()
        if self._it is None:
            if self.state.step_in_epoch == 0 and self.state.step == 0:
                self._start_epoch()
            else:  # resumed mid-epoch: the loader's restored state positions it
                self._it = iter(self.loader)
        out = []
        for _ in range(self.grad_accum):
            try:
                mb = next(self._it)
            except StopIteration:
                raise RuntimeError(
                    f"the loader ran out after {len(out)} of {self.grad_accum} micro-batches at epoch "
                    f"{self.state.epoch}, step {self.state.step_in_epoch + 1}/{self.steps_per_epoch}: its "
                    "__len__ promised more (or its state was restored inconsistently)"
                ) from None
            # every sample of this micro-batch failed to decode (the loader counted them): a one-token row
            # without labels keeps this rank's collectives in step with the others, adding nothing to the loss
            out.append(_placeholder_batch() if mb.get("empty") else mb)
        return out

    def _start_epoch(self) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.state.epoch)
        self._it = iter(self.loader)


class _StopOnSigterm:
    """Turns SIGTERM into a flag checked after each step (main thread only; restored on exit)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopOnSigterm:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, the run simply cannot be stopped gracefully
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _label_count(batch: dict[str, Any]) -> int:
    """Label tokens after the causal shift, counted on the host tensor the loader gave (no device sync)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _oom_message(step: int, index: int, n_micro: int, stats: dict[str, Any], meta: list[dict]) -> str:
    """What ran out of memory, and which knobs bound it (the packing budget, the per-sample visual budget,
    activation memory)."""
    samples = ", ".join(
        f"{m.get('dataset', '') or 'unnamed'}[{m.get('index', '?')}] ({m.get('modality', '?')}, "
        f"{m.get('num_tokens', '?')} tokens)"
        for m in meta
    )
    return (
        f"out of memory in micro-batch {index + 1}/{n_micro} of step {step}: {stats['N_tokens']} tokens, "
        f"{sum(stats['segment_patches'])} vision patches, {stats['N_visual_llm_tokens']} visual LLM tokens, "
        f"{len(meta)} samples: {samples or 'no sample metadata'}. Lower data.max_tokens (tokens per packed row), "
        "data.max_patches (vision patches per row) or encode.max_visual_tokens (per sample), or turn on "
        "trainer.gradient_checkpointing (llm / vision / both)"
    )


def _skip_counts(loader: Any, accelerator) -> dict[str, int]:
    """``skipped/<reason>``: samples the loaders of all ranks dropped for bad data so far (cumulative, restored on
    resume). Collective when distributed: every rank must call it at the same step."""
    local = dict(getattr(loader, "skipped", None) or {})
    if accelerator.num_processes > 1 and hasattr(loader, "skipped"):
        gathered: list[dict[str, int] | None] = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(gathered, local)
    else:
        gathered = [local]
    total: dict[str, int] = defaultdict(int)
    for counts in gathered:
        for reason, n in (counts or {}).items():
            total[f"skipped/{reason}"] += int(n)
    return dict(total)


def _group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        name = str(g.get("name", "all")).removesuffix("_no_decay")
        out.setdefault(f"lr/{name}", float(g["lr"]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def fit(
    model: nn.Module,
    loader: Iterable,
    cfg: TrainConfig,
    *,
    accelerator=None,
    processor=None,
    eval_fn: Callable[[nn.Module, int], dict[str, float]] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (a ``VideoLlama3ForConditionalGeneration``) on ``loader`` as ``cfg`` says.

    Args:
        model: the model, on CPU or already on the device; trained in place.
        loader: iterable of packed micro-batches (``collate_packed`` dicts) of this rank, with ``__len__``
            (micro-batches per epoch) and, for resumable runs, ``state_dict()`` / ``load_state_dict()``.
        cfg: the loop's configuration.
        accelerator: an ``accelerate.Accelerator``; built from ``cfg.backend`` / ``cfg.precision`` when None.
        processor: saved into every checkpoint beside the model config when given.
        eval_fn: ``eval_fn(model, step) -> {name: value}``, run every ``cfg.eval_every`` steps on every rank (it
            decides itself who works); values join that step's metrics.
        on_step: called on rank 0 with each step's metrics dict: step, epoch, loss, loss/dataset/<name>,
            loss/modality/<m> (rank 0's samples), lr/<group>, grad_norm, tokens, label_tokens, visual_tokens,
            seconds, tokens_per_s, visual_tokens_per_s, tflops_per_gpu, mfu, data_wait_fraction, packing_fill
            (when ``loader.token_budget`` is set), skipped_nonfinite, nonfinite; on log steps also
            skipped/<reason> (``loader.skipped`` summed over ranks, cumulative).

    Returns:
        The last step's metrics (``interrupted`` is True when SIGTERM ended the run; the process then exits 0).
    """
    from accelerate.utils import DistributedType, set_seed

    accelerator = accelerator or build_accelerator(cfg)
    set_seed(cfg.seed)
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    out_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)

    # ---- model, optimizer, schedule ------------------------------------------------------------------------
    apply_trainable(model, cfg.lrs, lora=any("lora_" in n for n, _ in model.named_parameters()))
    apply_gradient_checkpointing(model, cfg.gradient_checkpointing, cfg.checkpoint_every_n_layers)
    model.config.use_cache = False
    model.train()
    total_steps, steps_per_epoch = plan_steps(cfg, loader)
    optimizer = build_optimizer(model, cfg)
    # The scheduler drives the raw optimizer's param groups (shared with accelerate's / DeepSpeed's wrapper) and
    # is stepped by us once per applied update: accelerate's scheduler wrapper would step it once per process.
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    zero3 = is_deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3
    train_module, optimizer = accelerator.prepare(
        LossModule(model, cfg.loss_chunk_size, zero3=zero3), optimizer
    )
    if accelerator.is_main_process:
        print(trainable_table(model, cfg.lrs), flush=True)

    # Factor that cancels the backend's own averaging so that gradients = d(sum of token losses)/global_count.
    grad_scale = float(accelerator.num_processes)
    if is_deepspeed:
        grad_scale *= accelerator.deepspeed_engine_wrapped.engine.gradient_accumulation_steps()

    # ---- resume --------------------------------------------------------------------------------------------
    state = LoopState()
    latest = find_latest_checkpoint(out_dir) if cfg.resume else None
    if latest is not None:
        state = load_checkpoint(accelerator, latest, scheduler=scheduler, loader=loader)
        if accelerator.is_main_process:
            print(f"resumed from {latest} at step {state.step}", flush=True)
    batches = _StepBatches(loader, state, steps_per_epoch, cfg.grad_accum)
    logger = _MetricsLog(out_dir / "metrics.jsonl", accelerator, on_step, total_steps, state.step)

    def write_checkpoint() -> None:
        def write_extras(path: Path) -> None:
            model.config.save_pretrained(path / "model_config")
            if processor is not None:
                processor.save_pretrained(path / "processor")

        save_checkpoint(
            accelerator,
            out_dir,
            state,
            scheduler=scheduler,
            loader=loader,
            keep_last=cfg.keep_last,
            write_extras=write_extras,
        )

    # FLOPs of a micro-batch depend on which towers train (REFERENCE §6: kl, kv); counted on the CPU batches.
    flops_shape = shape_from_config(model.config)
    llm_trains, vision_trains = cfg.lrs["llm"] is not None, cfg.lrs["vision"] is not None
    world = accelerator.num_processes
    token_budget = getattr(loader, "token_budget", None)

    metrics: dict[str, Any] = {"step": state.step}
    interrupted = False
    with _StopOnSigterm() as sigterm:
        while state.step < total_steps:
            t0 = time.perf_counter()

            # ---- 1. the step's micro-batches; counts of the global batch in one all-reduce ------------------
            micro = batches.next_step()
            data_wait = time.perf_counter() - t0
            stats = [batch_stats(mb) for mb in micro]  # on the CPU tensors: no device sync
            step_stats = combine_batch_stats(stats)
            counts = torch.tensor(
                [
                    sum(_label_count(mb) for mb in micro),
                    step_stats["N_tokens"],
                    step_stats["N_visual_llm_tokens"],
                    flops_per_step(
                        flops_shape, step_stats, llm_trains=llm_trains, vision_trains=vision_trains
                    )["total"],
                    data_wait,
                ],
                dtype=torch.float64,
                device=accelerator.device,
            )
            counts = accelerator.reduce(counts, reduction="sum")  # (labels, tokens, visual, FLOPs, wait s)
            global_labels = counts[0].clamp(min=1)

            # ---- 2. forward + backward each micro-batch; gradients sync on the last one ----------------------
            step_loss = torch.zeros((), dtype=torch.float32, device=accelerator.device)
            per_sample: list[tuple[list[dict], Tensor, Tensor]] = []
            for i, mb in enumerate(micro):
                final = i == len(micro) - 1
                mb = _to_device(mb, accelerator.device)
                sync = nullcontext() if final or is_deepspeed else accelerator.no_sync(train_module)
                try:
                    with sync:
                        loss_sum, token_losses, sample_ids = train_module(mb)
                        loss = loss_sum * (grad_scale / global_labels).to(loss_sum.dtype)
                        if (
                            is_deepspeed
                        ):  # the engine steps (clip + AdamW) inside the last micro-batch's backward
                            accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=final)
                        else:
                            accelerator.backward(loss)
                except torch.OutOfMemoryError as e:
                    raise torch.OutOfMemoryError(
                        _oom_message(state.step + 1, i, len(micro), stats[i], mb.get("meta") or [])
                    ) from e
                step_loss += loss_sum.detach()
                if token_losses is not None:
                    per_sample.append((mb.get("meta") or [], token_losses, sample_ids))

            # ---- 3. clip, check, update ----------------------------------------------------------------------
            if is_deepspeed:
                norm = accelerator.deepspeed_engine_wrapped.engine.get_global_grad_norm()
                grad_norm = torch.tensor(
                    float("nan") if norm is None else float(norm), device=accelerator.device
                )
            else:
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = accelerator.clip_grad_norm_(train_module.parameters(), max_norm)
            flags = torch.stack(
                [step_loss.double(), torch.tensor(float(sigterm.requested), device=step_loss.device).double()]
            )
            flags = accelerator.reduce(flags, reduction="sum")
            # The one host sync of every step: whether to apply the update must be known here. Everything else
            # the step logs rides along in the same transfer.
            host = torch.cat([counts, flags, grad_norm.detach().reshape(1).to(counts)]).tolist()
            n_labels, n_tokens, n_visual, flops, wait_sum, global_loss_sum, stop_votes, norm_value = host
            finite = math.isfinite(global_loss_sum) and math.isfinite(norm_value)
            if finite:
                if not is_deepspeed:
                    optimizer.step()
                scheduler.step()
                state.consecutive_nonfinite = 0
            else:
                # DeepSpeed's ZeRO optimizer detected the non-finite gradients and skipped its update itself.
                state.skipped_nonfinite += 1
                state.consecutive_nonfinite += 1
            if not is_deepspeed:
                optimizer.zero_grad(set_to_none=True)
            seconds = max(time.perf_counter() - t0, 1e-9)
            state.step += 1
            state.step_in_epoch += 1
            state.label_tokens += int(n_labels)
            state.tokens += int(n_tokens)

            # ---- 4. log, abort on repeated non-finite steps, checkpoint, evaluate ---------------------------
            metrics = {
                "step": state.step,
                "epoch": state.epoch,
                "loss": global_loss_sum / max(n_labels, 1.0),
                "grad_norm": norm_value,
                "tokens": int(n_tokens),
                "label_tokens": int(n_labels),
                "visual_tokens": int(n_visual),
                "seconds": seconds,
                "data_wait_fraction": min(wait_sum / world / seconds, 1.0),
                **throughput(
                    {"N_tokens": n_tokens, "N_visual_llm_tokens": n_visual},
                    flops,
                    seconds,
                    world,
                    H100_BF16_PEAK,
                ),
                "skipped_nonfinite": state.skipped_nonfinite,
                "nonfinite": not finite,
                **_group_lrs(optimizer),
            }
            if token_budget:
                metrics["packing_fill"] = n_tokens / (len(micro) * world * token_budget)
            logger.add(metrics, per_sample)
            if state.consecutive_nonfinite >= cfg.nan_tolerance:
                logger.flush()
                raise FloatingPointError(
                    f"{state.consecutive_nonfinite} consecutive steps with a non-finite loss or gradient norm "
                    f"(nan_tolerance={cfg.nan_tolerance}), last at step {state.step}: check the data of these steps "
                    f"(metrics.jsonl), the learning rates and the precision"
                )
            stop = stop_votes > 0
            last = state.step >= total_steps
            if state.step % cfg.log_every == 0 or last or stop:
                metrics.update(_skip_counts(loader, accelerator))  # collective: every rank is here
                logger.flush()
            if stop or last or (cfg.save_every and state.step % cfg.save_every == 0):
                write_checkpoint()
            if eval_fn is not None and cfg.eval_every and state.step % cfg.eval_every == 0 and not stop:
                logger.add_eval(state.step, eval_fn(model, state.step))
            if stop:
                interrupted = True
                break

    final = logger.close()
    final["interrupted"] = interrupted
    if interrupted:
        if accelerator.is_main_process:
            print(f"SIGTERM: checkpoint of step {state.step} written, exiting", flush=True)
        raise SystemExit(0)
    return final


class _MetricsLog:
    """Per-step metrics kept on the device until a log step, then written (metrics.jsonl, on_step, progress bar).

    Per-dataset / per-modality losses are those of rank 0's micro-batches.
    """

    def __init__(self, path: Path, accelerator, on_step, total_steps: int, start_step: int):
        self.path, self.accelerator, self.on_step = path, accelerator, on_step
        self.pending: list[tuple[dict[str, Any], list]] = []
        self.last: dict[str, Any] = {}
        self.bar = None
        if accelerator.is_main_process:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def add(self, metrics: dict[str, Any], per_sample: list[tuple[list[dict], Tensor, Tensor]]) -> None:
        self.pending.append((metrics, per_sample))

    def flush(self) -> None:
        if not self.accelerator.is_main_process:
            self.pending.clear()
            return
        for metrics, per_sample in self.pending:
            row = {k: _plain(v) for k, v in metrics.items()}
            row.update(_breakdown(per_sample))
            self._emit(row)
        self.pending.clear()

    def add_eval(self, step: int, values: dict[str, float]) -> None:
        if self.accelerator.is_main_process and values:
            self._emit({"step": step, **{f"eval/{k}": _plain(v) for k, v in values.items()}})

    def _emit(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            # JSON has no NaN/Inf: non-finite values are written as strings ("nan", "inf").
            f.write(json.dumps({k: _json_safe(v) for k, v in row.items()}) + "\n")
        if self.on_step is not None:
            self.on_step(row)
        if "loss" in row:
            self.last = row
            if self.bar is not None:
                self.bar.n = row["step"]
                lrs = [v for k, v in row.items() if k.startswith("lr/")]
                self.bar.set_postfix(
                    loss=f"{row['loss']:.4f}",
                    lr=f"{max(lrs, default=0):.2e}",
                    tok_s=f"{row.get('tokens_per_s', 0):.0f}",
                )

    def close(self) -> dict[str, Any]:
        self.flush()
        if self.bar is not None:
            self.bar.close()
        return dict(self.last)


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, Tensor) else v


def _json_safe(v: Any) -> Any:
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


def _breakdown(per_sample: list[tuple[list[dict], Tensor, Tensor]]) -> dict[str, float]:
    """Mean token loss per dataset and per modality over the given micro-batches."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for meta, token_losses, sample_ids in per_sample:
        if not meta:
            continue
        n = len(meta)
        s = torch.zeros(n, dtype=torch.float64, device=token_losses.device).index_add_(
            0, sample_ids, token_losses.double()
        )
        c = torch.bincount(sample_ids, minlength=n)
        for m, si, ci in zip(meta, s.tolist(), c.tolist(), strict=True):
            for key in (
                f"loss/dataset/{m.get('dataset', '') or 'unnamed'}",
                f"loss/modality/{m.get('modality', 'text')}",
            ):
                sums[key] += si
                counts[key] += ci
    return {k: sums[k] / counts[k] for k in sums if counts[k]}
