"""One optimizer step on one rank: which micro-batches it takes, what it counts on the host, and the loss of each.

The loss is computed here, not by ``model(**batch, labels=...)``: the model gives hidden states
(:func:`videollama3_train.model.api.hidden_states`), never full logits, and the chunked cross-entropy multiplies
only the labelled positions by the output layer (docs/reference.md §4). The ``(1, L)`` packed row keeps its samples apart
by ``position_ids`` restarting at 0 and by the first label of each sample being ``IGNORE_INDEX``; no attention
mask, no KV cache.

The vision tower and projector run on every rank at every micro-step, exactly twice (images, then videos; a 4-patch
zero image stands in for a missing modality) and before the LLM: under ZeRO-3 and FSDP2 every rank must gather the
same parameters in the same order or the collectives mismatch; ZeRO-2 reduces its gradient buckets in gradient-ready
order, and a stand-in placed after the LLM mixed up buckets across ranks. Under DDP every parameter then gets a
gradient, so ``find_unused_parameters`` stays off. The stand-in's output enters the loss times 0.

The host-side counts (label tokens, tokens, visual tokens, FLOPs) are read from the CPU tensors the loader gave,
before the copy to the device, so that counting never waits on the GPU.

Per-dataset / per-modality losses: each micro-batch's per-token losses are reduced on the device, without a sync,
to a ``(n_samples, 2)`` float64 ``[loss sum, label tokens]`` per packed sample (:func:`per_sample_losses`); the
metrics sum them per dataset and modality over every rank at log steps (``metrics.StepLog``). The chunked kernel
gives the per-token losses for free; a fused kernel (liger) gives none, so they are recomputed by a no-grad chunked
pass over the output layer, on the steps whose ``forward_backward`` asks for them (``per_sample=True``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from videollama3_train.contract import FORWARD_KEYS, IGNORE_INDEX, TOWER_INPUTS, Loader, is_empty
from videollama3_train.model import api
from videollama3_train.trainer.loss import chunked_cross_entropy, shift_and_select
from videollama3_train.trainer.metrics import (
    batch_stats,
    combine_batch_stats,
    flops_per_step,
    shape_from_config,
)

if TYPE_CHECKING:
    from videollama3_train.trainer.backend import Backend
    from videollama3_train.trainer.checkpoint import LoopState

# Forward kwargs of the LLM body: the tower's inputs are consumed by the tower pass, labels by the loss, and the
# attention mask stays None (with per-sample position_ids that is what keeps packed samples apart).
_TOWER_KEYS = {k for keys in TOWER_INPUTS.values() for k in keys}
LLM_KEYS = tuple(k for k in FORWARD_KEYS if k not in _TOWER_KEYS | {"labels", "attention_mask"})

# Host counts of a step, in the order of the tensor that is all-reduced once per step.
COUNT_KEYS = ("label_tokens", "tokens", "visual_tokens", "flops", "data_wait_s")

# Batch key (set by forward_backward on the device copy) telling LossModule whether a fused loss kernel should pay
# the extra no-grad pass that gives the per-sample losses. Not a forward kwarg: the model never sees it.
PER_SAMPLE_KEY = "_per_sample_losses"

log = logging.getLogger(__name__)


class LossModule(nn.Module):
    """Wraps the model so that DDP / DeepSpeed / FSDP2 see the whole loss computation as one ``forward``
    (:class:`~videollama3_train.trainer.sequence_parallel.SequenceParallelLoss` is its sequence-parallel form).

    ``forward(batch)`` returns ``(loss_sum, sample_losses)``: the fp32 sum of the token cross-entropies of the
    micro-batch (plus ``0 * stand-in tower output`` for each missing modality), and, detached, the
    ``(n_samples, 2)`` float64 ``[loss sum, label tokens]`` of each packed sample (:func:`per_sample_losses`; for
    the per-dataset metrics). ``sample_losses`` is None only with a fused loss kernel when
    ``batch[PER_SAMPLE_KEY]`` is False (the kernel gives no per-token losses and the extra pass was not asked for).

    Only the forward keys reach the model: ``meta``, ``cu_seqlens`` and ``max_seqlen`` stay out (the vision tower
    would read a ``cu_seqlens`` kwarg as its own segment table; the attention backends derive segments from the
    position resets). Checkpoints name the weights ``model.<native name>`` (the attribute below).
    """

    def __init__(self, model: nn.Module, chunk_size: int):
        super().__init__()
        self.model = api.base_model(model)  # a PEFT wrapper would shadow the base model's modules
        self.chunk_size = chunk_size
        self.patch_dim = api.patch_dim(self.model)

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters this module reads outside their own module's forward: the output layer's (ZeRO-3 must
        gather them for this forward)."""
        head = api.output_layer(self.model)
        return [p for p in (head.weight, head.bias) if p is not None]

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        # the tower twice, images then videos, on every rank, before the LLM (module docstring: ZeRO-3, ZeRO-2)
        encoded: dict[str, Any] = {}
        dummy = torch.zeros((), dtype=torch.float32, device=batch["input_ids"].device)
        for modality, (pixels, grid, merge) in TOWER_INPUTS.items():
            if batch.get(pixels) is not None:
                encoded[modality] = api.visual_features(self.model, batch[pixels], batch[grid], batch[merge])
            else:
                dummy = dummy + 0.0 * torch.cat(self._stand_in(dummy.device).pooler_output).float().sum()
        hidden = api.hidden_states(
            self.model, mm_encoder_outputs=encoded or None, **{k: batch[k] for k in LLM_KEYS if k in batch}
        )
        labels = batch["labels"]
        hidden_sel, targets = shift_and_select(hidden, labels)  # (n, d), (n,)
        head = api.output_layer(self.model)
        loss_sum, _, token_losses = chunked_cross_entropy(
            hidden_sel,
            head.weight,
            targets,
            chunk_size=self.chunk_size,
            bias=head.bias,
            return_token_losses=True,
            recompute_token_losses=bool(batch.get(PER_SAMPLE_KEY, True)),
        )
        per_sample = None if token_losses is None else per_sample_losses(batch, labels, token_losses)
        return loss_sum + dummy, per_sample

    def _stand_in(self, device: torch.device):
        """The tower on a zero 2x2-patch image (merge 1): ties the tower into the graph at negligible cost."""
        pixels = torch.zeros(4, self.patch_dim, device=device)
        grid = torch.tensor([[1, 2, 2]], device=device)
        return api.visual_features(self.model, pixels, grid, torch.ones(1, dtype=torch.long, device=device))


def forward_backward(
    module: nn.Module,
    backend: Backend,
    micro: list[dict[str, Any]],
    scale: Tensor,
    *,
    step: int,
    per_sample: bool = True,
) -> tuple[Tensor, list[tuple[list[dict], Tensor]]]:
    """Forward + backward of each micro-batch of optimizer step ``step``, gradients reduced on the last one.

    The loss that is backpropagated is ``loss_sum * scale``, where ``scale = grad_scale / global label tokens``
    cancels the backend's averaging. Returns the detached sum of this rank's token losses and, per micro-batch,
    ``(meta, sample_losses)`` (see :class:`LossModule`) for the per-dataset breakdown, still on the device.
    ``per_sample``: whether a fused loss kernel (liger) should pay an extra no-grad pass over the output layer for
    those (the chunked kernel gives them for free; pass True on log steps at least); micro-batches without them
    are left out. An out-of-memory micro-batch is re-raised naming its size, its samples and the config keys
    that bound them.
    """
    device = scale.device
    step_loss = torch.zeros((), dtype=torch.float32, device=device)
    breakdown: list[tuple[list[dict], Tensor]] = []
    for i, cpu_batch in enumerate(micro):
        final = i == len(micro) - 1
        mb = to_device(cpu_batch, device)
        mb[PER_SAMPLE_KEY] = per_sample
        try:
            with backend.sync(module, final):
                loss_sum, sample_losses = module(mb)
                backend.backward(loss_sum * scale.to(loss_sum.dtype), final)
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(oom_message(step, i, len(micro), cpu_batch)) from e
        step_loss += loss_sum.detach()
        if sample_losses is not None:
            breakdown.append((mb.get("meta") or [], sample_losses))
        else:
            _note_no_breakdown()
    return step_loss, breakdown


_noted = False


def _note_no_breakdown() -> None:
    global _noted
    if not _noted:
        _noted = True
        log.info(
            "loss/dataset/* and loss/modality/* are logged on log steps only: the fused loss kernel (liger) gives "
            "no per-token losses, so they are recomputed by an extra no-grad pass over the output layer on the "
            "steps that log them, not on the others"
        )


class StepCounter:
    """The host counts of a step (:data:`COUNT_KEYS`): label tokens after the shift (the loss normaliser), real
    tokens, visual LLM tokens, training FLOPs of docs/reference.md §6 (which depend on which towers train: ``kl``, ``kv``),
    and the seconds this rank waited for data. Returned as one float64 tensor on ``device``, ready for the one
    all-reduce of the step.

    With sequence parallelism the ``share`` ranks of a group hold the same rows: each rank counts ``1 / share`` of
    them, so the sums over the world count every row once (the label count stays the loss normaliser)."""

    def __init__(self, model_config: Any, lrs: dict[str, float | None], device: torch.device, share: int = 1):
        self.shape = shape_from_config(model_config)
        self.llm_trains, self.vision_trains = lrs["llm"] is not None, lrs["vision"] is not None
        self.device = device
        self.share = share

    def __call__(self, micro: list[dict[str, Any]], data_wait: float) -> Tensor:
        stats = combine_batch_stats(batch_stats(mb) for mb in micro)
        flops = flops_per_step(
            self.shape, stats, llm_trains=self.llm_trains, vision_trains=self.vision_trains
        )
        counts = [
            sum(label_count(mb) for mb in micro) / self.share,
            stats["N_tokens"] / self.share,
            stats["N_visual_llm_tokens"] / self.share,
            flops["total"] / self.share,
            data_wait,
        ]
        return torch.tensor(counts, dtype=torch.float64, device=self.device)


class StepBatches:
    """Yields the ``grad_accum`` micro-batches of each optimizer step, crossing epochs.

    At the start of each new epoch (not the resumed one) ``loader.set_epoch(epoch)`` restarts the loader at that
    epoch's beginning; a resumed run's loader was positioned by its restored state. A micro-batch whose samples
    all failed to decode (the loader's empty marker) becomes :func:`placeholder_batch`.
    """

    def __init__(self, loader: Loader, state: LoopState, steps_per_epoch: list[int], grad_accum: int):
        self.loader, self.state = loader, state
        self.per_epoch, self.grad_accum = steps_per_epoch, grad_accum
        self._it: Iterator | None = None

    @property
    def steps_per_epoch(self) -> int:
        # past the planned epochs (max_steps beyond them) the last epoch's length repeats
        return self.per_epoch[min(self.state.epoch, len(self.per_epoch) - 1)]

    def next_step(self) -> tuple[list[dict[str, Any]], float]:
        """The step's micro-batches (CPU tensors) and the seconds spent waiting for them."""
        t0 = time.perf_counter()
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
                    "micro_batches_per_epoch promised more (or its state was restored inconsistently)"
                ) from None
            # every sample of this micro-batch failed to decode (the loader counted them): a row without labels
            # keeps this rank's collectives in step with the others, adding nothing to the loss
            out.append(placeholder_batch() if is_empty(mb) else mb)
        return out, time.perf_counter() - t0

    def _start_epoch(self) -> None:
        self.loader.set_epoch(self.state.epoch)
        self._it = iter(self.loader)


def placeholder_batch() -> dict[str, Any]:
    """A two-token text row with no label: stands in for a micro-batch whose samples all failed."""
    return {
        "input_ids": torch.zeros(1, 2, dtype=torch.long),
        "labels": torch.full((1, 2), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.arange(2).unsqueeze(0),
        "meta": [],
        "sample_lengths": [2],
    }


def label_count(batch: dict[str, Any]) -> int:
    """Label tokens after the causal shift, counted on the host tensor the loader gave (no device sync)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def sample_ids(batch: dict[str, Any], labels: Tensor, window: tuple[int, int] | None = None) -> Tensor:
    """``(n,)`` packed-sample index of each labelled position (same order as :func:`shift_and_select`).

    ``window = (start, stop)``: only the positions ``start <= i < stop`` that predict a label (a sequence-parallel
    rank's slice of the row). A row padded past its samples (to a multiple of the group) has no labels there."""
    lengths = batch.get("sample_lengths") or [labels.shape[-1]]
    ids = torch.repeat_interleave(
        torch.arange(len(lengths), device=labels.device),
        torch.tensor(lengths, device=labels.device),
        output_size=int(sum(lengths)),  # known on the host: no device sync for the output size
    )
    if ids.numel() < labels.shape[-1]:  # padding (unlabelled): any index
        ids = torch.cat([ids, ids.new_full((labels.shape[-1] - ids.numel(),), len(lengths) - 1)])
    # Position i predicts label i+1, which belongs to the same sample: each sample's first label is ignored.
    ids, targets = ids[1:], labels[0, 1:]
    if window is not None:
        ids, targets = ids[window[0] : window[1]], targets[window[0] : window[1]]
    return ids[targets != IGNORE_INDEX]


def per_sample_losses(
    batch: dict[str, Any], labels: Tensor, token_losses: Tensor, window: tuple[int, int] | None = None
) -> Tensor:
    """``(n_samples, 2)`` float64 ``[sum of token losses, label tokens]`` of each packed sample of ``batch``.

    ``token_losses``: the ``(n,)`` losses of the labelled positions in :func:`shift_and_select` order (of the
    positions in ``window`` only, see :func:`sample_ids`). Reduced on the device (``index_add_`` / ``bincount``),
    nothing is copied to the host; ``n_samples`` is the number of ``sample_lengths``.
    """
    ids = sample_ids(batch, labels, window)
    n = len(batch.get("sample_lengths") or [labels.shape[-1]])
    out = torch.zeros(n, 2, dtype=torch.float64, device=token_losses.device)
    out[:, 0].index_add_(0, ids, token_losses.detach().double())
    out[:, 1] = torch.bincount(ids, minlength=n).double()
    return out


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def oom_message(step: int, index: int, n_micro: int, batch: dict[str, Any]) -> str:
    """What ran out of memory, and which knobs bound it (the packing budget, the per-sample visual budget,
    activation memory)."""
    stats, meta = batch_stats(batch), batch.get("meta") or []
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


__all__ = [
    "COUNT_KEYS",
    "LLM_KEYS",
    "LossModule",
    "PER_SAMPLE_KEY",
    "StepBatches",
    "StepCounter",
    "forward_backward",
    "label_count",
    "per_sample_losses",
    "placeholder_batch",
    "sample_ids",
]
