"""Ulysses sequence parallelism over groups of N ranks, with the vision tower's work split across the group.

One packed row (up to ``data.max_tokens x N`` tokens) is given to all N ranks of a group. Each step of a
micro-batch, on every rank of the group:

1. **Vision, balanced by patches**: the row's visual items are cut into frames (an image is one frame; a video's
   frames are independent attention segments of the tower, so a video can be cut between frames) and the frames are
   dealt to the ranks in order, in contiguous runs of about equal patch count (:func:`split_frames`). Each rank runs
   the tower + projector on its run only, then the features are all-gathered (autograd: the backward sums the
   gradient of every rank's copy) and reassembled per image / per video. No rank encodes every frame.
2. **LLM, split by tokens**: the full row is embedded and the features scattered into their placeholders by
   transformers' own ``VideoLlama3Model.forward``; a pre-hook on the language model then keeps this rank's
   contiguous ``L / N`` slice of the embeddings and ``position_ids`` (per-sample positions kept, so RoPE is right).
3. **Attention, Ulysses** (``model/attention.py``, beside the varlen kernel it reuses; reached through
   ``model.api``): in every LLM layer q/k/v of the local slice are exchanged all-to-all so that each rank holds
   ``H / N`` heads for the whole row, attention runs per packed sample (segments from the full row's positions),
   and a second all-to-all brings the output back to the local slice with all heads.
4. **Loss**: labels are shifted over the whole row first, then sliced like the hidden states; each rank's loss is
   the sum over its slice, and its label count is its slice's, so the trainer's one normalisation by the global
   batch's label tokens holds unchanged (the counts of a group sum to the row's).

Why our own all-to-all rather than DeepSpeed's ``UlyssesSPAttentionHF`` (accelerate ``ParallelismConfig(
sp_backend="deepspeed")``): that path shards ``input_ids`` before the model, so the visual placeholders of one
sample land on several ranks and the model's scatter of features into placeholders raises (it checks counts
against the local tokens); it also needs DeepSpeed as the engine and requires equal-length batch rows with its
own data loader adapter. Here the split happens after the scatter, inside the model's forward, and works with every
backend (DDP, ZeRO, FSDP2) and with our packed rows.

The groups come from the run's one :class:`~videollama3_train.contract.ParallelDims` (the data build got the same
value: its data-parallel rank and size are the groups').
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from videollama3_train.contract import IGNORE_INDEX, TOWER_INPUTS, ParallelDims, merged_tokens
from videollama3_train.model import api
from videollama3_train.trainer.loss import chunked_cross_entropy
from videollama3_train.trainer.step import LLM_KEYS, PER_SAMPLE_KEY, LossModule, per_sample_losses

# ----------------------------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SPGroup:
    """This rank's sequence-parallel group: ``size`` ranks sharing each row, this one ``rank``-th among them."""

    size: int
    rank: int  # within the group
    group: Any  # the process group (None when size == 1)


def build_sp_group(dims: ParallelDims) -> SPGroup:
    """The process group of ``dims``' sequence-parallel group of this rank (collective: every rank calls it)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != dims.world_size:
        raise ValueError(f"the run was planned for {dims.world_size} processes, this world has {world}")
    if not dims.sp_enabled:
        return SPGroup(1, 0, None)
    mine = None
    for ranks in dims.sp_groups():  # every rank creates every group, in the same order
        g = dist.new_group(ranks)
        if dims.rank in ranks:
            mine = g
    return SPGroup(dims.sp_size, dims.sp_rank, mine)


# ----------------------------------------------------------------------------------------------------------------
# Vision: frames dealt by patch count
# ----------------------------------------------------------------------------------------------------------------


def split_frames(frame_patches: list[int], n: int) -> list[tuple[int, int]]:
    """Cut ``frame_patches`` (patches of each frame, in row order) into ``n`` contiguous runs of about equal patch
    count; returns ``[start, stop)`` frame ranges per rank (some may be empty)."""
    total = sum(frame_patches)
    bounds, acc, start = [], 0, 0
    for r in range(n - 1):
        target = total * (r + 1) / n
        stop = start
        while stop < len(frame_patches) and acc + frame_patches[stop] / 2 <= target:
            acc += frame_patches[stop]
            stop += 1
        bounds.append((start, stop))
        start = stop
    bounds.append((start, len(frame_patches)))
    return bounds


@dataclass
class _Frame:
    modality: str  # "image" | "video"
    item: int  # index of the image / video in the row
    index: int  # frame index within the item
    h: int
    w: int
    merge: int
    row: int  # first pixel row of the frame in the modality's pixel tensor


def _frames(batch: dict[str, Any]) -> list[_Frame]:
    out = []
    for modality, (_, grid_key, merge_key) in TOWER_INPUTS.items():
        if batch.get(grid_key) is None:
            continue
        row = 0
        for item, ((t, h, w), m) in enumerate(
            zip(batch[grid_key].tolist(), batch[merge_key].tolist(), strict=True)
        ):
            for f in range(t):
                out.append(_Frame(modality, item, f, h, w, m, row))
                row += h * w
    return out


def local_tower_inputs(
    batch: dict[str, Any], sp: SPGroup
) -> tuple[dict[str, tuple], list[_Frame], list[list]]:
    """This rank's share of the row's frames as tower inputs per modality: ``{modality: (pixels, grid, merge)}``
    (a video cut between frames becomes a shorter video), the row's frames, and each rank's frames."""
    frames = _frames(batch)
    runs = split_frames([f.h * f.w for f in frames], sp.size)
    per_rank = [frames[a:b] for a, b in runs]
    mine = per_rank[sp.rank]
    inputs: dict[str, tuple] = {}
    for modality, (pix_key, _, _) in TOWER_INPUTS.items():
        sel = [f for f in mine if f.modality == modality]
        if not sel:
            continue
        # consecutive frames of one item form one sub-item (t frames of h x w)
        groups: list[list[_Frame]] = []
        for f in sel:
            if groups and groups[-1][-1].item == f.item:
                groups[-1].append(f)
            else:
                groups.append([f])
        rows = [batch[pix_key][g[0].row : g[-1].row + g[-1].h * g[-1].w] for g in groups]
        grid = torch.tensor([[len(g), g[0].h, g[0].w] for g in groups], device=batch[pix_key].device)
        merge = torch.tensor([g[0].merge for g in groups], device=batch[pix_key].device)
        inputs[modality] = (torch.cat(rows), grid, merge)
    return inputs, frames, per_rank


def gather_features(
    local: dict[str, Tensor],
    frames: list[_Frame],
    per_rank: list[list[_Frame]],
    sp: SPGroup,
    width: int,
    like: Tensor,
) -> dict[str, tuple[Tensor, ...]]:
    """All-gather every rank's frame features and reassemble them per item: ``{modality: (item features, ...)}``
    in the row's order, as the tower would have returned them for the whole row.

    ``local[modality]``: this rank's features of that modality, ``(sum of its frames' h*w/m^2, width)``. Sizes are
    known on every rank from the grids, so the gather pads to the largest rank and trims; its backward sums the
    gradients of every rank's copy (``torch.distributed.nn.functional.all_gather``)."""
    from torch.distributed._functional_collectives import all_gather_single_autograd, wait_tensor

    def tokens(f: _Frame) -> int:
        return merged_tokens(1, f.h, f.w, f.merge)

    counts = [sum(tokens(f) for f in fr) for fr in per_rank]
    # a rank's run is contiguous in row order, and ``_frames`` lists the images before the videos
    mine_parts = [local[m] for m in TOWER_INPUTS if m in local]
    mine = torch.cat(mine_parts) if mine_parts else like.new_zeros(0, width)
    pad = max(counts) - mine.shape[0]
    if pad:
        mine = torch.cat([mine, mine.new_zeros(pad, width)])
    if torch.is_grad_enabled() and not mine.requires_grad:
        # A rank that encoded no frame of the row (a row whose one image went to the other rank) would gather
        # outside autograd and skip the gather's backward (a reduce-scatter) that the other ranks run: a hang
        # (measured: every rank waits in step 1), and its slice's gradient for the other ranks' features lost.
        mine = mine.detach().requires_grad_()
    gathered = wait_tensor(all_gather_single_autograd(mine.contiguous(), 0, sp.group))  # (N * max, width)
    rows = max(counts)
    # every frame, in row order
    flat = torch.cat([gathered[i * rows : i * rows + c] for i, c in enumerate(counts)])
    out: dict[str, list[list[Tensor]]] = {}
    pos = 0
    for f in frames:
        n = tokens(f)
        items = out.setdefault(f.modality, [])
        if f.index == 0:
            items.append([])
        items[-1].append(flat[pos : pos + n])
        pos += n
    return {m: tuple(torch.cat(parts) for parts in items) for m, items in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# LLM: the local slice (Ulysses attention inside it: model/attention.py)
# ----------------------------------------------------------------------------------------------------------------


def pad_row(batch: dict[str, Any], n: int, pad_id: int = 0) -> dict[str, Any]:
    """``input_ids`` / ``labels`` / ``position_ids`` padded to a multiple of ``n`` tokens; the padding is one more
    segment (positions from 0) without labels, so it neither attends to nor is attended by a sample."""
    L = batch["input_ids"].shape[1]
    extra = (-L) % n
    if not extra:
        return batch
    out = dict(batch)
    dev = batch["input_ids"].device
    out["input_ids"] = torch.cat([batch["input_ids"], torch.full((1, extra), pad_id, device=dev)], dim=1)
    out["labels"] = torch.cat([batch["labels"], torch.full((1, extra), IGNORE_INDEX, device=dev)], dim=1)
    out["position_ids"] = torch.cat([batch["position_ids"], torch.arange(extra, device=dev)[None]], dim=1)
    return out


def slice_bounds(length: int, sp: SPGroup) -> tuple[int, int]:
    """This rank's ``[start, stop)`` of a row of ``length`` tokens (a multiple of the group size)."""
    per = length // sp.size
    return sp.rank * per, (sp.rank + 1) * per


# ----------------------------------------------------------------------------------------------------------------
# The loss module
# ----------------------------------------------------------------------------------------------------------------


def sequence_parallel_loss_module(model: torch.nn.Module, chunk_size: int, sp: SPGroup) -> LossModule:
    """The loss module for ``sp``: :class:`SequenceParallelLoss` when ``sp.size > 1``, else the plain one."""
    return LossModule(model, chunk_size) if sp.size == 1 else SequenceParallelLoss(model, chunk_size, sp)


class SequenceParallelLoss(LossModule):
    """Same contract as ``LossModule.forward`` (``(loss_sum, per-sample [loss, labels])``), over this rank's
    slice of the row: the module docstring's four steps."""

    def __init__(self, model, chunk_size: int, sp: SPGroup):
        super().__init__(model, chunk_size)
        self.sp = sp
        self._llm_attention = api.use_llm_attention(self.model, api.ULYSSES)
        self.frames_encoded = 0  # frames (images + video frames) this rank's tower encoded (tests, metrics)
        self.patches_encoded = 0

    def release(self) -> None:
        """Give the LLM its own attention back: after training, rank 0 alone evaluates and exports the model, and
        Ulysses attention would wait for the group's other ranks."""
        api.use_llm_attention(self.model, self._llm_attention)

    def forward(self, batch: dict[str, Any]):
        sp = self.sp
        batch = pad_row(batch, sp.size)
        dummy = torch.zeros((), dtype=torch.float32, device=batch["input_ids"].device)
        encoded, dummy = self._encode_frames(batch, dummy)

        # ---- 2-3. the LLM on this rank's slice, Ulysses attention inside ------------------------------
        labels = batch["labels"]
        a, b = slice_bounds(labels.shape[1], sp)
        with api.ulysses_slice(api.language_model(self.model), batch["position_ids"], (a, b), sp.group):
            llm_inputs = {k: batch[k] for k in LLM_KEYS if k in batch}
            hidden = api.hidden_states(self.model, mm_encoder_outputs=encoded, **llm_inputs)  # (1, L/N, d)

        # ---- 4. loss over the slice: labels shifted over the whole row first --------------------------
        targets = torch.cat([labels[:, 1:], labels.new_full((1, 1), IGNORE_INDEX)], dim=1)
        local_targets = targets[0, a:b]
        keep = local_targets != IGNORE_INDEX
        head = api.output_layer(self.model)
        loss_sum, _, token_losses = chunked_cross_entropy(
            hidden[0][keep],
            head.weight,
            local_targets[keep],
            chunk_size=self.chunk_size,
            bias=head.bias,
            return_token_losses=True,
            recompute_token_losses=bool(batch.get(PER_SAMPLE_KEY, True)),
        )
        per_sample = None
        if token_losses is not None:
            per_sample = per_sample_losses(batch, labels, token_losses, window=(a, b))
        return loss_sum + dummy, per_sample

    def _encode_frames(self, batch: dict[str, Any], dummy: Tensor) -> tuple[dict[str, Any] | None, Tensor]:
        """Step 1: the tower on this rank's frames (a stand-in for a modality it has none of, as
        :class:`LossModule`), then every rank's features gathered: ``mm_encoder_outputs`` for the LLM (None for a
        text-only row) and ``dummy`` with the stand-ins' zero terms."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        sp = self.sp
        inputs, frames, per_rank = local_tower_inputs(batch, sp)
        local: dict[str, Tensor] = {}
        for modality in TOWER_INPUTS:  # twice on every rank, images then videos (as LossModule)
            if modality in inputs:
                pixels, grid, merge = inputs[modality]
                local[modality] = torch.cat(
                    api.visual_features(self.model, pixels, grid, merge).pooler_output
                )
                self.patches_encoded += pixels.shape[0]
            else:
                dummy = dummy + 0.0 * torch.cat(self._stand_in(dummy.device).pooler_output).float().sum()
        self.frames_encoded += len(per_rank[sp.rank])
        if not frames:
            return None, dummy
        width = api.output_layer(self.model).weight.shape[1]
        feats = gather_features(local, frames, per_rank, sp, width, like=dummy)
        return {m: BaseModelOutputWithPooling(pooler_output=f) for m, f in feats.items()}, dummy
