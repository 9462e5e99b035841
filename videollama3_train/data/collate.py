"""Turn encoded samples into model inputs: one packed row (training) or a padded batch (baselines, eval).

A packed row stays exact only if samples cannot see each other. With transformers' ``sdpa`` / ``eager``
attention that holds when ``position_ids`` restart at 0 for every sample, ``attention_mask`` is ``None`` and
``use_cache`` is False (docs/reference.md §4): the mask builder then derives a block-diagonal causal mask from the
position resets. The first label of every sample is ``-100`` because, after the model's internal shift, the
last token of the previous sample would otherwise be trained to predict it.

``cu_seqlens`` / ``max_seqlen`` describe the same segments for varlen kernels. They are NOT forward kwargs of
``VideoLlama3ForConditionalGeneration``: the vision tower pops a ``cu_seqlens`` kwarg as *its* segment table,
so pass :func:`forward_kwargs` of a batch to the model, never the batch itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..contract import (
    FORWARD_KEYS,
    IGNORE_INDEX,
    IMAGE_KEYS,
    VIDEO_KEYS,
    VISUAL_KEYS,
    forward_kwargs,
    merged_token_counts,
)

# Re-exported: these names were defined here before they moved to the contract shared with model/ and trainer/.
MODEL_KEYS = FORWARD_KEYS
__all__ = [
    "IGNORE_INDEX",
    "IMAGE_KEYS",
    "MODEL_KEYS",
    "VIDEO_KEYS",
    "VISUAL_KEYS",
    "collate_packed",
    "collate_padded",
    "forward_kwargs",
]


def _concat_visual(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Visual tensors of all samples concatenated in sample order; a modality no sample has stays absent."""
    out: dict[str, torch.Tensor] = {}
    for keys in (IMAGE_KEYS, VIDEO_KEYS):
        having = [s for s in samples if keys[0] in s]
        if not having:
            continue
        for s in having:
            missing = [k for k in keys[:3] if k not in s]
            if missing:
                raise ValueError(f"sample {s.get('meta', {})} has {keys[0]} but lacks {missing}")
        for k in keys[:3]:
            out[k] = torch.cat([s[k] for s in having], dim=0)
        if keys is VIDEO_KEYS:
            # The mask is all-True when compression is off; build it for samples encoded without one so that a
            # row mixing both still indexes the right features.
            masks = []
            for s in having:
                if "video_compression_mask" in s:
                    masks.append(s["video_compression_mask"].to(torch.bool))
                else:
                    n = sum(merged_token_counts(s["video_grid_thw"], s["video_merge_sizes"]))
                    masks.append(torch.ones(n, dtype=torch.bool))
            out["video_compression_mask"] = torch.cat(masks)
        grid, pixels = out[keys[1]], out[keys[0]]
        if int(grid.prod(dim=1).sum()) != pixels.shape[0]:
            raise ValueError(
                f"{keys[0]} has {pixels.shape[0]} rows but {keys[1]} describes {int(grid.prod(dim=1).sum())}"
            )
    return out


def collate_packed(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate ``samples`` (Sample dicts, see docs/architecture.md) into one packed row.

    Returns ``input_ids`` / ``labels`` / ``position_ids`` long ``(1, L)`` with ``L = sum(len_i)``,
    ``cu_seqlens`` int32 ``(n+1,)``, ``max_seqlen`` int, the visual tensors concatenated in sample order
    (absent when no sample has them), ``meta`` (list of the samples' meta dicts) and ``sample_lengths`` (list
    of ``len_i``). No ``attention_mask``: isolation comes from the position resets.
    """
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    lengths = [int(s["input_ids"].shape[0]) for s in samples]
    for s, n in zip(samples, lengths, strict=True):
        if s["input_ids"].ndim != 1 or s["labels"].shape != s["input_ids"].shape:
            raise ValueError(
                f"input_ids and labels must be 1-D of equal length, got {tuple(s['input_ids'].shape)} and "
                f"{tuple(s['labels'].shape)} (sample {s.get('meta', {})})"
            )
        if n == 0:
            raise ValueError(f"empty sample {s.get('meta', {})}")

    input_ids = torch.cat([s["input_ids"] for s in samples]).long()
    labels = torch.cat([s["labels"] for s in samples]).long()
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    labels[cu[:-1].long()] = IGNORE_INDEX
    position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])

    batch: dict[str, Any] = {
        "input_ids": input_ids.unsqueeze(0),
        "labels": labels.unsqueeze(0),
        "position_ids": position_ids.unsqueeze(0),
        "cu_seqlens": cu,
        "max_seqlen": max(lengths),
    }
    batch.update(_concat_visual(samples))
    batch["meta"] = [dict(s.get("meta", {})) for s in samples]
    batch["sample_lengths"] = lengths
    return batch


def collate_padded(
    samples: Sequence[dict[str, Any]], pad_id: int, padding_side: str = "right"
) -> dict[str, Any]:
    """Pad ``samples`` to the longest into a batch (the unpacked baseline).

    Returns ``input_ids`` / ``labels`` long ``(B, L_max)`` (labels padded with -100), ``attention_mask`` long
    ``(B, L_max)``, visual tensors concatenated in sample order, ``meta``, ``sample_lengths``.
    """
    if not samples:
        raise ValueError("collate_padded needs at least one sample")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = [int(s["input_ids"].shape[0]) for s in samples]
    width = max(lengths)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[i, cols] = s["input_ids"]
        labels[i, cols] = s["labels"]
        attention_mask[i, cols] = 1
    batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    batch.update(_concat_visual(samples))
    batch["meta"] = [dict(s.get("meta", {})) for s in samples]
    batch["sample_lengths"] = lengths
    return batch
