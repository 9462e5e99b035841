"""One annotation record -> one model-ready sample (the Sample dict of docs/architecture.md).

The work is split in two so that the packer can cost records without decoding pixels:

* :func:`_plan` reads headers / container metadata only: normalises the record, picks the sampled frame times,
  shares the visual budget, applies the length policy and tokenises the text (with one pad per image / frame);
* :func:`encode_record` executes a plan: decodes, resizes, normalises, patchifies, prunes video tokens
  (DiffFP) and expands the pads; :func:`estimate_cost` returns the plan's counts.

Both see the same plan, so ``estimate_cost`` equals ``encode_record``'s counts whenever token compression is off
(pruning can only make the real sample shorter).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as tvF

from . import media
from .annotations import RECORD_COLUMN, normalize_record
from .config import EncodeConfig
from .errors import DataError
from .text import IGNORE_INDEX, build_skeleton, expand_pads, tokenize_skeleton
from .vision import compression_mask, patchify, per_item_tokens, resize_and_normalize, target_size

__all__ = ["encode_record", "estimate_cost"]


@dataclass
class _Media:
    """One image or video of a record, with what its header / metadata says (no pixels)."""

    kind: str  # "image" | "video"
    source: str  # as written in the record, for messages
    paths: list[Path]  # one file, or the frames of a video given as a list of images
    width: int  # display size of an image / a video frame
    height: int
    info: Any = None  # media.VideoInfo of a video file or frame folder
    times: list[float] = field(default_factory=list)  # video: seconds of the frames to decode (absolute)
    timestamps: list[float] = field(default_factory=list)  # video: the same, relative to the clip start
    frame_indices: list[int] = field(default_factory=list)  # video given as a list of images: which ones
    size: tuple[int, int] = (0, 0)  # target (height, width) after the budget
    merge: int = 1
    clip: tuple[float | None, float | None] = (
        None,
        None,
    )  # video: the record's (start, end), for the cache key

    @property
    def num_frames(self) -> int:
        return 1 if self.kind == "image" else len(self.timestamps)


@dataclass
class _Plan:
    messages: list[dict[str, Any]]
    media: list[_Media]
    ids: list[int]  # skeleton tokens (one pad per image / frame)
    flags: list[bool]  # loss flag per skeleton token
    text_tokens: int  # skeleton tokens that are not pads
    item_tokens: int  # LLM tokens allowed per image / frame after the length policy
    truncate_to: int | None = None  # "truncate" policy: cut the expanded ids to this length


# ---------------------------------------------------------------------------------------------------------------
# planning (no pixel decode)
# ---------------------------------------------------------------------------------------------------------------


def _probe(item: dict[str, Any], data_root: Path, config: EncodeConfig) -> _Media:
    path = item["path"]
    if item["type"] == "image":
        p = media.resolve_media_path(data_root, path)
        w, h = media.probe_image(p, max_pixels=config.max_image_pixels)
        return _Media("image", path, [p], w, h)

    if isinstance(path, list):  # a video given frame by frame (official "<image> per frame" convention)
        frames = [media.resolve_media_path(data_root, f) for f in path]
        n = len(frames)
        count = min(n, config.max_frames)
        # evenly spaced when over the cap, as for decoded videos
        idx = sorted({int(i * n / count) for i in range(count)})
        w, h = media.probe_image(frames[0], max_pixels=config.max_image_pixels)
        m = _Media("video", str(path[0]) + f" (+{n - 1} frames)", frames, w, h)
        m.frame_indices = idx
        # a frame list carries no clock: its frames are taken as sampled at `config.fps`
        m.timestamps = [i / config.fps for i in idx]
        return m

    p = media.resolve_media_path(data_root, path)
    # a folder of frames is taken as sampled at `config.fps`, like a list of frames
    info = media.probe_video(p, folder_fps=config.fps)
    start, end = item.get("start"), item.get("end")
    try:
        times = media.sample_frame_times(
            info,
            fps=config.fps,
            max_frames=config.max_frames,
            min_frames=config.min_frames,
            start=start,
            end=end,
        )
    except ValueError as e:  # an empty [start, end] range
        raise DataError("no_frames", str(e), path=str(p)) from e
    if not times:
        raise DataError("no_frames", "no frame to sample in the requested range", path=str(p))
    origin = max(0.0, start) if start is not None else 0.0
    m = _Media("video", path, [p], info.width, info.height, info=info)
    m.clip = (start, end)
    m.times = list(times)
    m.timestamps = [max(0.0, t - origin) for t in times]
    return m


def _apply_budget(items: list[_Media], per_item: int, config: EncodeConfig) -> int:
    """Set each item's target size for ``per_item`` tokens; returns the sample's LLM visual tokens."""
    total = 0
    for m in items:
        m.merge = config.image_merge_size if m.kind == "image" else config.video_merge_size
        m.size = _with_path(_item_size, m, m.source, per_item, config)
        total += m.num_frames * _tokens_of(m, config.patch_size)
    return total


def _item_size(m: _Media, per_item: int, config: EncodeConfig) -> tuple[int, int]:
    return target_size(
        m.height,
        m.width,
        merge_size=m.merge,
        max_tokens=per_item,
        min_tokens=config.min_tokens_per_item,
        patch_size=config.patch_size,
    )


def _tokens_of(m: _Media, patch: int) -> int:
    """LLM tokens of one image / one frame at the item's target size."""
    h, w = m.size
    return (h // patch) * (w // patch) // (m.merge * m.merge)


def _pad_counts(items: list[_Media], patch: int, kept: list[list[int]] | None = None) -> list[int]:
    """Pads per skeleton pad, in text order; ``kept[k]``: kept tokens per frame of the k-th video (compression)."""
    counts: list[int] = []
    vid = 0
    for m in items:
        if m.kind == "image":
            counts.append(_tokens_of(m, patch))
        else:
            counts += kept[vid] if kept is not None else [_tokens_of(m, patch)] * m.num_frames
            vid += 1
    return counts


def _truncation_point(
    ids: torch.Tensor, labels: torch.Tensor, pad_ids: tuple[int, int], max_length: int
) -> int:
    """Length to cut an over-long sample to under the "truncate" policy, or raise ``too_long``."""
    is_pad = (ids == pad_ids[0]) | (ids == pad_ids[1])
    last_visual = int(is_pad.nonzero().max()) if bool(is_pad.any()) else -1
    if last_visual >= max_length:
        raise DataError(
            "too_long",
            f"{ids.numel()} tokens > max_length {max_length}, and visual tokens reach position {last_visual}: "
            "truncation never cuts inside visual tokens",
        )
    if not bool((labels[:max_length] != IGNORE_INDEX).any()):
        raise DataError(
            "too_long", f"{ids.numel()} tokens > max_length {max_length}; truncation leaves no label"
        )
    return max_length


def _plan(record: dict[str, Any], data_root: str | Path, tokenizer, config: EncodeConfig, pad_ids) -> _Plan:
    if isinstance(record, dict) and set(record) == {RECORD_COLUMN} and isinstance(record[RECORD_COLUMN], str):
        record = json.loads(
            record[RECORD_COLUMN]
        )  # a row of load_annotations' dataset, as the loader hands it
    rec = normalize_record(record)
    messages = rec["messages"]
    if config.system_prompt and messages[0]["role"] != "system":
        messages = [
            {"role": "system", "content": [{"type": "text", "text": config.system_prompt}]},
            *messages,
        ]

    root = Path(data_root)
    items = [
        _with_path(_probe, it, it["path"], root, config)
        for m in messages
        for it in m["content"]
        if it["type"] in ("image", "video")
    ]
    skeleton = build_skeleton(messages, [m.timestamps for m in items if m.kind == "video"])
    ids, flags = tokenize_skeleton(tokenizer, skeleton)
    n_slots = sum(m.num_frames for m in items)
    text_tokens = len(ids) - n_slots

    per_item = per_item_tokens(
        n_slots, config.max_visual_tokens, config.min_tokens_per_item, config.max_tokens_per_item
    )
    visual = _apply_budget(items, per_item, config) if items else 0
    plan = _Plan(messages, items, ids, flags, text_tokens, per_item)
    total = text_tokens + visual
    if total <= config.max_length:
        return plan

    # ---- over max_length: the length policy ----------------------------------------------------------------
    if config.length_policy == "rebudget" and items:
        allowed = config.max_length - text_tokens
        per_item = min(per_item - 1, max(config.min_tokens_per_item, allowed // n_slots))
        while per_item >= config.min_tokens_per_item:
            # smart_resize rounds to the factor grid, so a budget can land a little above; step down until it fits
            visual = _apply_budget(items, per_item, config)
            if text_tokens + visual <= config.max_length:
                plan.item_tokens = per_item
                return plan
            per_item -= 1
        raise DataError(
            "too_long",
            f"{text_tokens} text tokens + {n_slots} visual items at the minimum "
            f"{config.min_tokens_per_item} tokens each exceed max_length {config.max_length}",
        )
    if config.length_policy == "truncate":
        ids_t, labels_t = expand_pads(ids, flags, _pad_counts(items, config.patch_size), pad_ids)
        plan.truncate_to = _truncation_point(ids_t, labels_t, pad_ids, config.max_length)
        return plan
    raise DataError("too_long", f"{total} tokens > max_length {config.max_length}")


# ---------------------------------------------------------------------------------------------------------------
# execution
# ---------------------------------------------------------------------------------------------------------------


def _to_chw(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> ``(T, 3, H, W)``."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()


def _decode_size(m: _Media, config: EncodeConfig) -> tuple[int, int] | None:
    """Size ``(height, width)`` to ask the decoder's scaler for, or None for the native size.

    Only when the target is under half the native size (where decode-time scaling saves real work): then the
    smallest even size, same aspect ratio, at least the target in both dimensions, so the exact bicubic resize
    afterwards still only shrinks a little.
    """
    if not config.decode_scale:
        return None
    th, tw = m.size
    scale = max(th / m.height, tw / m.width)
    if scale >= 0.5:
        return None
    h = min(m.height, max(th, 2 * math.ceil(m.height * scale / 2)))
    w = min(m.width, max(tw, 2 * math.ceil(m.width * scale / 2)))
    return (h, w)


def _cached_frames(m: _Media, config: EncodeConfig) -> np.ndarray | None:
    """Frames of ``m`` from the frame cache written by ``prepare`` (None: caching off, absent, or stored smaller
    than this stage's target, in which case the video is decoded as usual)."""
    if config.frame_cache_dir is None:
        return None
    from .frame_cache import lookup_frames

    hit = lookup_frames(
        config.frame_cache_dir,
        m.paths[0],
        fps=config.fps,
        max_frames=config.max_frames,
        min_frames=config.min_frames,
        start=m.clip[0],
        end=m.clip[1],
    )
    if hit is None:
        return None
    arr, _ = hit
    if len(arr) != len(m.times):
        return None
    native = tuple(arr.shape[1:3]) == (m.height, m.width)
    if not native and (arr.shape[1] < m.size[0] or arr.shape[2] < m.size[1]):
        return None  # stored below this stage's target: a fresh decode is sharper
    return arr


def _pixels(m: _Media, config: EncodeConfig, mean, std) -> torch.Tensor:
    """Normalised patch rows ``(t*h*w, 3*14*14)`` of one image / video at its target size."""
    if m.kind == "image":
        img = media.load_image(m.paths[0], max_pixels=config.max_image_pixels)
        frames = _to_chw(np.array(img, dtype=np.uint8)[None])
    elif m.frame_indices:
        imgs = [
            np.array(media.load_image(m.paths[i], max_pixels=config.max_image_pixels), dtype=np.uint8)
            for i in m.frame_indices
        ]
        chw = [_to_chw(a[None]) for a in imgs]
        # frames of one video share one size; resize each list frame to it (they usually already agree)
        frames = torch.cat([_same_size(c, (m.height, m.width)) for c in chw])
    else:
        arr = _cached_frames(m, config)
        if arr is None:
            arr, _ = media.decode_video(m.paths[0], m.times, size=_decode_size(m, config), info=m.info)
        if len(arr) != len(m.times):
            raise DataError(
                "corrupt_video", f"decoded {len(arr)} frames, asked for {len(m.times)}", path=str(m.paths[0])
            )
        frames = _to_chw(arr)
    x = resize_and_normalize(frames, m.size, mean=mean, std=std)
    return patchify(x, patch_size=config.patch_size, merge_size=m.merge)


def _same_size(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bring uint8 ``(N, 3, H, W)`` frames to ``size=(H, W)`` if they differ (frame lists of mixed sizes)."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return tvF.resize(frames, list(size), interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)


def _pad_ids(processor) -> tuple[int, int]:
    return int(processor.image_token_id), int(processor.video_token_id)


def _modality(items: list[_Media]) -> str:
    kinds = {m.kind for m in items}
    if not kinds:
        return "text"
    return kinds.pop() if len(kinds) == 1 else "mixed"


def encode_record(
    record: dict[str, Any],
    *,
    data_root: str | Path,
    processor,
    config: EncodeConfig,
    dataset: str = "",
    index: int = -1,
) -> dict[str, Any]:
    """Turn one annotation record (either schema) into a Sample dict.

    Args:
        record: raw annotation record (official or messages schema, or the internal form), or a row of the
            dataset from ``load_annotations`` (``{"record": json_string}``).
        data_root: directory media paths are relative to (paths may not escape it).
        processor: ``VideoLlama3Processor`` (its tokenizer, pad ids and mean/std are used).
        config: vision / text knobs of the stage.
        dataset, index: where the record comes from; written into every ``DataError`` and into ``meta``.
    Returns:
        ``input_ids`` / ``labels`` long ``(L,)``; when the sample has images ``pixel_values`` float32
        ``(sum h*w, 588)``, ``image_grid_thw`` ``(n_img, 3)``, ``image_merge_sizes`` ``(n_img,)``; when it has videos
        ``pixel_values_videos`` ``(sum t*h*w, 588)``, ``video_grid_thw`` ``(n_vid, 3)``, ``video_merge_sizes``
        ``(n_vid,)``, ``video_compression_mask`` bool ``(sum t*h*w/m^2,)``; and ``meta``.
    Raises:
        DataError: naming ``dataset``, ``index`` and the file at fault.
    """
    try:
        return _encode(record, data_root, processor, config, dataset, index)
    except DataError as e:
        raise e.locate(dataset=dataset, index=index) from None


def _encode(record, data_root, processor, config: EncodeConfig, dataset: str, index: int) -> dict[str, Any]:
    pad_ids = _pad_ids(processor)
    plan = _plan(record, data_root, processor.tokenizer, config, pad_ids)
    ip = processor.image_processor
    mean, std = tuple(ip.image_mean), tuple(ip.image_std)

    sample: dict[str, Any] = {}
    images = [m for m in plan.media if m.kind == "image"]
    videos = [m for m in plan.media if m.kind == "video"]
    patch = config.patch_size
    if images:
        sample["pixel_values"] = torch.cat([_located(_pixels, m, config, mean, std) for m in images])
        sample["image_grid_thw"] = torch.tensor(
            [[1, h // patch, w // patch] for h, w in (m.size for m in images)]
        )
        sample["image_merge_sizes"] = torch.tensor([m.merge for m in images], dtype=torch.long)
    kept: list[list[int]] = []
    if videos:
        pv = torch.cat([_located(_pixels, m, config, mean, std) for m in videos])
        grid = torch.tensor([[m.num_frames, m.size[0] // patch, m.size[1] // patch] for m in videos])
        merges = torch.tensor([m.merge for m in videos], dtype=torch.long)
        if config.use_token_compression:
            mask = compression_mask(pv, grid, merges, threshold=config.compression_threshold)
        else:
            mask = torch.ones(int((grid.prod(dim=1) // merges**2).sum()), dtype=torch.bool)
        offset = 0
        for m in videos:
            per_frame = _tokens_of(m, patch)
            frame_masks = mask[offset : offset + per_frame * m.num_frames].view(m.num_frames, per_frame)
            kept.append(frame_masks.sum(dim=1).tolist())
            offset += per_frame * m.num_frames
        sample.update(
            pixel_values_videos=pv, video_grid_thw=grid, video_merge_sizes=merges, video_compression_mask=mask
        )

    input_ids, labels = expand_pads(plan.ids, plan.flags, _pad_counts(plan.media, patch, kept), pad_ids)
    if input_ids.numel() > config.max_length:
        # only "truncate" gets here: the plan checked the other policies on the uncompressed length
        cut = _truncation_point(input_ids, labels, pad_ids, config.max_length)
        input_ids, labels = input_ids[:cut], labels[:cut]
    num_patches = sum(int(sample[k].shape[0]) for k in ("pixel_values", "pixel_values_videos") if k in sample)
    sample["input_ids"] = input_ids
    sample["labels"] = labels
    sample["meta"] = {
        "dataset": dataset,
        "index": index,
        "modality": _modality(plan.media),
        "num_tokens": int(input_ids.numel()),
        "num_patches": num_patches,
        "num_label_tokens": int((labels != IGNORE_INDEX).sum()),
    }
    return sample


def _located(fn, m: _Media, *args):
    """Run ``fn(m, ...)`` and make sure a ``DataError`` from it names the media file."""
    return _with_path(fn, m, m.source, *args)


def _with_path(fn, first, path, *args):
    """Call ``fn(first, *args)``; a ``DataError`` that names no file gets ``path``."""
    try:
        return fn(first, *args)
    except DataError as e:
        if not e.path:
            e.path = str(path)
            e.args = (e._render(),)
        raise


def estimate_cost(
    record: dict[str, Any],
    *,
    data_root: str | Path,
    processor,
    config: EncodeConfig,
    dataset: str = "",
    index: int = -1,
) -> tuple[int, int]:
    """``(num_tokens, num_patches)`` the record will encode to, from image headers / video metadata only.

    Exact when token compression is off; an upper bound on ``num_tokens`` when it is on. Raises the same
    ``DataError`` as :func:`encode_record` for anything detectable without decoding pixels.
    """
    try:
        pad_ids = _pad_ids(processor)
        plan = _plan(record, data_root, processor.tokenizer, config, pad_ids)
    except DataError as e:
        raise e.locate(dataset=dataset, index=index) from None
    patch = config.patch_size
    visual = sum(m.num_frames * _tokens_of(m, patch) for m in plan.media)
    num_tokens = plan.text_tokens + visual
    if plan.truncate_to is not None:
        num_tokens = min(num_tokens, plan.truncate_to)
    num_patches = sum(m.num_frames * (m.size[0] // patch) * (m.size[1] // patch) for m in plan.media)
    return num_tokens, num_patches
