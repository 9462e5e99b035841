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
3. **Attention, Ulysses**: in every LLM layer q/k/v of the local slice are exchanged all-to-all so that each rank
   holds ``H / N`` heads for the whole row, attention runs per packed sample (segments from the full row's
   positions), and a second all-to-all brings the output back to the local slice with all heads.
4. **Loss**: labels are shifted over the whole row first, then sliced like the hidden states; each rank's loss is
   the sum over its slice, and its label count is its slice's, so the trainer's one normalisation by the global
   batch's label tokens holds unchanged (the counts of a group sum to the row's).

Why our own all-to-all rather than DeepSpeed's ``UlyssesSPAttentionHF`` (accelerate ``ParallelismConfig(
sp_backend="deepspeed")``): that path shards ``input_ids`` before the model, so the visual placeholders of one
sample land on several ranks and the model's scatter of features into placeholders raises (it checks counts
against the local tokens); it also needs DeepSpeed as the engine and requires equal-length batch rows with its
own data loader adapter. Here the split happens after the scatter, inside the model's forward, and works with every
backend (DDP, ZeRO, FSDP2) and with our packed rows.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from videollama3_train.contract import IGNORE_INDEX
from videollama3_train.model import api
from videollama3_train.trainer.loss import chunked_cross_entropy
from videollama3_train.trainer.step import LLM_KEYS, PER_SAMPLE_KEY, LossModule

ULYSSES = (
    "flash_ulysses"  # "flash" in the name: transformers then builds no dense mask (see model/attention.py)
)
_local = threading.local()  # the full row's segment table, set around one forward


# ----------------------------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SPGroup:
    """This rank's sequence-parallel group: ``size`` ranks ``[start, start + size)`` of the world."""

    size: int
    rank: int  # within the group
    group: Any  # the process group (None when size == 1)
    dp_rank: int  # index of the group among the world's groups (= the data-parallel rank of its loader)
    dp_size: int


def build_sp_group(size: int) -> SPGroup:
    """Split the world into consecutive groups of ``size`` ranks (collective: every rank calls it)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if size < 1 or world % size:
        raise ValueError(f"trainer.sequence_parallel={size} must divide the world size {world}")
    if size == 1:
        return SPGroup(1, 0, None, rank, world)
    mine = None
    for start in range(0, world, size):  # every rank creates every group, in the same order
        g = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = g
    return SPGroup(size, rank % size, mine, rank // size, world // size)


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
    for modality, grid_key, merge_key in (
        ("image", "image_grid_thw", "image_merge_sizes"),
        ("video", "video_grid_thw", "video_merge_sizes"),
    ):
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
    for modality, pix_key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
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
        return f.h * f.w // (f.merge * f.merge)

    counts = [sum(tokens(f) for f in fr) for fr in per_rank]
    # a rank's run is contiguous in row order, and ``_frames`` lists the images before the videos
    mine_parts = [local[m] for m in ("image", "video") if m in local]
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
    flat = torch.cat(
        [gathered[i * rows : i * rows + c] for i, c in enumerate(counts)]
    )  # every frame, row order
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
# LLM: the local slice, and Ulysses attention
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
    out["labels"] = torch.cat([batch["labels"], torch.full((1, extra), -100, device=dev)], dim=1)
    out["position_ids"] = torch.cat([batch["position_ids"], torch.arange(extra, device=dev)[None]], dim=1)
    return out


def slice_bounds(length: int, sp: SPGroup) -> tuple[int, int]:
    """This rank's ``[start, stop)`` of a row of ``length`` tokens (a multiple of the group size)."""
    per = length // sp.size
    return sp.rank * per, (sp.rank + 1) * per


@contextmanager
def local_llm_slice(language_model: torch.nn.Module, position_ids: Tensor, sp: SPGroup) -> Iterator[None]:
    """Within the context, the language model sees only this rank's slice of ``inputs_embeds`` / ``position_ids``,
    and Ulysses attention knows the full row's segments."""
    from videollama3_train.model.attention import cu_seqlens_from_position_ids

    a, b = slice_bounds(position_ids.shape[1], sp)

    def pre_hook(module, args, kwargs):
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"][:, a:b]
        kwargs["position_ids"] = kwargs["position_ids"][:, a:b]
        return args, kwargs

    handle = language_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    # kept after the context: activation checkpointing recomputes the layers' forward inside this micro-batch's
    # backward, after the context has exited (the next micro-batch's forward sets them anew)
    _local.cu = cu_seqlens_from_position_ids(position_ids)
    _local.sp = sp
    try:
        yield
    finally:
        handle.remove()


def _all_to_all(x: Tensor, group) -> Tensor:
    """Autograd all-to-all of ``x (N, ...)``: chunk ``j`` goes to rank ``j``; result ``[i]`` came from rank ``i``.

    ``contiguous()`` first: a permuted view would otherwise be sent in its memory order (measured: wrong outputs)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(x.contiguous(), None, None, group))


def ulysses_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention-interface function: ``query (1, Hq, L/N, D)``, ``key``/``value`` ``(1, Hkv, L/N, D)``
    of the local slice; returns ``(1, L/N, Hq, D)``."""
    from videollama3_train.model import attention

    sp, cu = _local.sp, _local.cu
    n = sp.size
    hq, hkv = query.shape[1], key.shape[1]
    if hq % n:
        raise ValueError(f"sequence parallelism {n} needs the attention heads ({hq}) divisible by it")
    if hkv % n:  # fewer KV heads than ranks: give every rank the KV heads its query heads read
        key, value = (t.repeat_interleave(hq // hkv, dim=1) for t in (key, value))
        hkv = hq

    def scatter_heads(t: Tensor) -> Tensor:  # (1, H, Ls, D) -> (H/N, L, D)
        h, ls, d = t.shape[1:]
        chunks = t[0].reshape(n, h // n, ls, d)
        got = _all_to_all(chunks, sp.group)  # [i] = rank i's slice of my heads
        return got.permute(1, 0, 2, 3).reshape(h // n, n * ls, d)

    dtype = attention._kernel_dtype(query, key, value)  # one dtype for the kernel (see attention.py)
    q, k, v = (scatter_heads(t.to(dtype)).transpose(0, 1) for t in (query, key, value))  # (L, H/N, D)
    kernel = attention.reference_varlen_kernel if not q.is_cuda else _cuda_kernel()
    max_len = int((cu[1:] - cu[:-1]).max())
    out = kernel(q, k, v, cu.to(q.device), max_len, causal=True, scale=scaling)  # (L, Hq/N, D)
    L, hn, d = out.shape
    back = _all_to_all(out.reshape(n, L // n, hn, d), sp.group)  # [i] = my slice, heads of rank i
    return back.permute(1, 0, 2, 3).reshape(L // n, n * hn, d).unsqueeze(0), None


def _cuda_kernel():
    from videollama3_train.model.attention import _varlen_kernel

    return _varlen_kernel()


def register_ulysses() -> None:
    """Register the Ulysses attention with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ULYSSES, ulysses_attention_forward)
    AttentionMaskInterface.register(ULYSSES, flash_attention_mask)


def use_ulysses(model: torch.nn.Module) -> str:
    """Switch the LLM (not the vision tower, whose frames stay on one rank each) to Ulysses attention; returns the
    implementation it had (:meth:`SequenceParallelLoss.release` puts it back)."""
    register_ulysses()
    previous = model.config.text_config._attn_implementation
    model.config.text_config._attn_implementation_internal = ULYSSES
    return previous


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
        self._llm_attention = use_ulysses(self.model)
        self.frames_encoded = 0  # frames (images + video frames) this rank's tower encoded (tests, metrics)
        self.patches_encoded = 0

    def release(self) -> None:
        """Give the LLM its own attention back: after training, rank 0 alone evaluates and exports the model, and
        Ulysses attention would wait for the group's other ranks."""
        self.model.config.text_config._attn_implementation_internal = self._llm_attention

    def forward(self, batch: dict[str, Any]):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        sp = self.sp
        n_real = batch["input_ids"].shape[1]
        batch = pad_row(batch, sp.size)
        device = batch["input_ids"].device
        dummy = torch.zeros((), dtype=torch.float32, device=device)

        # ---- 1. vision: this rank's frames, then every rank's features --------------------------------
        inputs, frames, per_rank = local_tower_inputs(batch, sp)
        local: dict[str, Tensor] = {}
        for modality in ("image", "video"):  # twice on every rank, images then videos (as LossModule)
            if modality in inputs:
                pixels, grid, merge = inputs[modality]
                local[modality] = torch.cat(
                    api.visual_features(self.model, pixels, grid, merge).pooler_output
                )
                self.patches_encoded += pixels.shape[0]
            else:
                dummy = dummy + 0.0 * torch.cat(self._stand_in(device).pooler_output).float().sum()
        self.frames_encoded += len(per_rank[sp.rank])
        encoded = None
        if frames:
            width = api.output_layer(self.model).weight.shape[1]
            feats = gather_features(local, frames, per_rank, sp, width, like=dummy)
            encoded = {m: BaseModelOutputWithPooling(pooler_output=f) for m, f in feats.items()}

        # ---- 2-3. the LLM on this rank's slice, Ulysses attention inside ------------------------------
        with local_llm_slice(api.language_model(self.model), batch["position_ids"], sp):
            hidden = api.hidden_states(
                self.model, mm_encoder_outputs=encoded, **{k: batch[k] for k in LLM_KEYS if k in batch}
            )  # (1, L/N, d)

        # ---- 4. loss over the slice: labels shifted over the whole row first --------------------------
        labels = batch["labels"]
        targets = torch.cat([labels[:, 1:], labels.new_full((1, 1), IGNORE_INDEX)], dim=1)
        a, b = slice_bounds(labels.shape[1], sp)
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
            lengths = batch.get("sample_lengths") or [n_real]
            ids = torch.repeat_interleave(
                torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
            )
            ids = torch.cat([ids, ids.new_full((labels.shape[1] - n_real,), len(lengths))])  # padding
            local_ids = ids[a:b][keep]
            per_sample = torch.zeros(len(lengths) + 1, 2, dtype=torch.float64, device=device)
            per_sample[:, 0].index_add_(0, local_ids, token_losses.detach().double())
            per_sample[:, 1] = torch.bincount(local_ids, minlength=len(lengths) + 1).double()
            per_sample = per_sample[: len(lengths)]
        return loss_sum + dummy, per_sample
