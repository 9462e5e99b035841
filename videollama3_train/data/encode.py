"""One annotation record -> one model-ready sample (the Sample dict of docs/architecture.md).

The work is split in two so that the packer can cost records without decoding pixels:

* :func:`plan_record` reads headers / container metadata only: normalises the record, picks the sampled frame
  times, shares the visual budget, applies the length policy and tokenises the text (with one pad per image /
  frame) into a :class:`Plan`, whose ``cost`` is what the packer needs;
* :func:`encode_record` executes a plan (its own, or one passed in): decodes, resizes, normalises, patchifies,
  prunes video tokens (DiffFP) and expands the pads; :func:`estimate_cost` is ``plan_record(...).cost``.

Both see the same plan, so ``estimate_cost`` equals ``encode_record``'s counts whenever token compression is off
(pruning can only make the real sample shorter).

The default path is the inference path: a sample equals what transformers' ``VideoLlama3Processor`` built with
:func:`processor_settings` (the processor each stage exports) makes of the same conversation, called with file
paths and the stage's fps (``tests/test_parity.py``): the processor's per-item budgets, its frame sampler on
torchcodec's frame numbering, torchcodec's RGB bytes, its resize, normalisation, patch order and pruning mask.
Where it cannot be followed: a sample whose items exceed ``max_visual_tokens`` together shares that budget
(the processor sizes each item alone), ``max_length`` rebudgets, clips (``start`` / ``end``), frame lists and
folders, the frame cache, and ``decode_scale`` (opt-in, approximate pixels).

Why the loader's workers plan a record again instead of receiving the cost pass's plan: the cost pass runs once
per annotation file and encode config (its table is cached on disk, so a second run has no plans at all), in
other processes, long before the record is encoded; keeping every record's plan (token ids, media metadata)
would cost 1-11 KiB per record pickled (a 1080p image, a 1- and a 10-minute 720p video), gigabytes for a
million-record mixture. Planning again costs under 1% of the encode for an image (0.3 ms of 53 ms) and 1-3% for
a video, most of it the packet scan that numbers frames as the processor's decoder does (100 ms for a 1-minute
and 180 ms for a 10-minute 720p clip, against 3.6 s and 18.5 s to decode their frames; 2 busy shared CPUs).
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

from ..contract import IGNORE_INDEX, merged_token_counts, merged_tokens
from . import media
from .annotations import RECORD_COLUMN, normalize_record
from .config import EncodeConfig
from .errors import DataError
from .text import build_skeleton, count_tokens, expand_pads, tokenize_skeleton
from .vision import (
    compression_mask,
    normalized_patches,
    per_item_tokens,
    processor_budgets,
    processor_frame_size,
    processor_image_size,
    target_size,
)

__all__ = [
    "PLAN_VERSION",
    "MediaPlan",
    "Plan",
    "encode_record",
    "estimate_cost",
    "estimate_cost_row",
    "plan_record",
    "processor_settings",
]

# Bumped when the same record and EncodeConfig plan to other sizes, frames or token counts, so that cost tables
# cached on disk under an older rule are not reused (2: the processor's budgets and frame sampling).
PLAN_VERSION = 2


@dataclass
class MediaPlan:
    """One image or video of a record, with what its header / metadata says (no pixels)."""

    kind: str  # "image" | "video"
    source: str  # as written in the record, for messages
    paths: list[Path]  # one file, or the frames of a video given as a list of images
    width: int  # display width of an image / a video frame, pixels
    height: int  # display height, pixels
    info: Any = None  # media.VideoInfo of a video file or frame folder
    times: list[float] = field(default_factory=list)  # video: seconds of the frames to decode (absolute)
    timestamps: list[float] = field(default_factory=list)  # video: the same, relative to the clip start
    frame_indices: list[int] = field(default_factory=list)  # video given as a list of images: which ones
    size: tuple[int, int] = (0, 0)  # target (height, width) after the budget
    merge: int = 1  # patches merged per side into one LLM token
    # video: the record's (start, end) in seconds, for the frame-cache key
    clip: tuple[float | None, float | None] = (None, None)

    @property
    def num_frames(self) -> int:
        return 1 if self.kind == "image" else len(self.timestamps)


@dataclass
class Plan:
    """What one record will encode to, from headers and metadata only (:func:`plan_record`)."""

    messages: list[dict[str, Any]]  # the normalised record (system prompt added)
    media: list[MediaPlan]  # images and videos in text order, with their target sizes
    ids: list[int]  # skeleton tokens (one pad per image / frame)
    flags: list[bool]  # loss flag per skeleton token
    text_tokens: int  # skeleton tokens that are not pads
    # LLM tokens allowed per image / frame when the sample's budget is shared (over max_visual_tokens, or rebudgeted
    # by the length policy); None when every item has the processor's own size
    item_tokens: int | None
    config: EncodeConfig  # the config the plan was made under (encode_record refuses another)
    truncate_to: int | None = None  # "truncate" policy: cut the expanded ids to this length

    @property
    def visual_tokens(self) -> int:
        """LLM visual tokens before token compression."""
        return sum(m.num_frames * _tokens_of(m, self.config.patch_size) for m in self.media)

    @property
    def cost(self) -> tuple[int, int]:
        """``(num_tokens, num_patches)`` of the sample: the packer's cost, exact without token compression and
        an upper bound on the tokens with it."""
        patch = self.config.patch_size
        num_tokens = self.text_tokens + self.visual_tokens
        if self.truncate_to is not None:
            num_tokens = min(num_tokens, self.truncate_to)
        num_patches = sum(m.num_frames * (m.size[0] // patch) * (m.size[1] // patch) for m in self.media)
        return num_tokens, num_patches

    @property
    def cost_row(self) -> tuple[int, int, int, int]:
        """The cost table's row (``data.costs``: ``COST_COLUMNS``): :attr:`cost`, then what the packer's FLOPs
        estimate needs beyond it: the visual tokens reaching the LLM (after the merge, before token compression,
        which only lowers them: an upper bound as the tokens are) and the tower's ``sum P_f^2`` over its attention
        segments (each image, each video frame: ``P_f`` patches). Equal to what the processor's grids give
        (``tests/test_cost_model.py``)."""
        patch = self.config.patch_size
        segments_sq = sum(
            m.num_frames * ((m.size[0] // patch) * (m.size[1] // patch)) ** 2 for m in self.media
        )
        return (*self.cost, self.visual_tokens, segments_sq)


# ---------------------------------------------------------------------------------------------------------------
# planning (no pixel decode)
# ---------------------------------------------------------------------------------------------------------------


def _probe(item: dict[str, Any], data_root: Path, config: EncodeConfig) -> MediaPlan:
    path = item["path"]
    if item["type"] == "image":
        p = media.resolve_media_path(data_root, path, config.follow_symlinks)
        w, h = media.probe_image(p, max_pixels=config.max_image_pixels)
        return MediaPlan("image", path, [p], w, h)

    if isinstance(path, list):  # a video given frame by frame (official "<image> per frame" convention)
        frames = [media.resolve_media_path(data_root, f, config.follow_symlinks) for f in path]
        n = len(frames)
        count = min(n, config.max_frames)
        # evenly spaced when over the cap, as for decoded videos
        idx = sorted({int(i * n / count) for i in range(count)})
        w, h = media.probe_image(frames[0], max_pixels=config.max_image_pixels)
        m = MediaPlan("video", str(path[0]) + f" (+{n - 1} frames)", frames, w, h)
        m.frame_indices = idx
        # a frame list carries no clock: its frames are taken as sampled at `config.fps`
        m.timestamps = [i / config.fps for i in idx]
        return m

    p = media.resolve_media_path(data_root, path, config.follow_symlinks)
    # a frame folder's clock is config.frame_folder_fps (a GIF's: its own, or config.gif_fps); media.sample_frames
    # samples such assigned clocks by the official code's rule
    info = media.probe_video(p, folder_fps=config.frame_folder_fps, gif_fps=config.gif_fps)
    start, end = item.get("start"), item.get("end")
    try:
        # the processor's frame sampler on torchcodec's frame numbering (media.sample_frames)
        sample = media.sample_frames(
            info,
            fps=config.fps,
            max_frames=config.max_frames,
            min_frames=config.min_frames,
            start=start,
            end=end,
        )
    except ValueError as e:  # an empty [start, end] range
        raise DataError("no_frames", str(e), path=str(p)) from e
    if not sample.times:
        raise DataError("no_frames", "no frame to sample in the requested range", path=str(p))
    m = MediaPlan("video", path, [p], info.width, info.height, info=info)
    m.clip = (start, end)
    m.times = sample.times
    m.timestamps = sample.timestamps
    return m


def processor_settings(config: EncodeConfig) -> dict[str, Any]:
    """``build_processor``'s keywords for this config: the processor to save with a stage's export, so that
    inference sizes, samples and prunes as the stage trained (``encode_record`` equals its output whenever the
    sample's items fit ``max_visual_tokens`` together; ``tests/test_parity.py``)."""
    return {
        "image_merge_size": config.image_merge_size,
        "video_merge_size": config.video_merge_size,
        **_budgets(config),
        "use_token_compression": config.use_token_compression,
        "fps": config.fps,
        "max_frames": config.max_frames,
        "min_frames": config.min_frames,
    }


def _budgets(config: EncodeConfig) -> dict[str, int]:
    return processor_budgets(
        patch_size=config.patch_size,
        image_merge_size=config.image_merge_size,
        video_merge_size=config.video_merge_size,
        max_visual_tokens=config.max_visual_tokens,
        min_tokens_per_item=config.min_tokens_per_item,
        max_tokens_per_item=config.max_tokens_per_item,
    )


def _apply_processor_sizes(items: list[MediaPlan], config: EncodeConfig) -> int:
    """Give each item the size the stage's processor gives it (an image its own budget, a video its budget over
    its frames); returns the sample's LLM visual tokens."""
    budgets = _budgets(config)
    total = 0
    for m in items:
        m.merge = config.image_merge_size if m.kind == "image" else config.video_merge_size
        m.size = _with_path(_processor_size, m, m.source, budgets, config.patch_size)
        total += m.num_frames * _tokens_of(m, config.patch_size)
    return total


def _processor_size(m: MediaPlan, budgets: dict[str, int], patch: int) -> tuple[int, int]:
    if m.kind == "image":
        return processor_image_size(m.height, m.width, merge_size=m.merge, budgets=budgets, patch_size=patch)
    return processor_frame_size(
        m.height, m.width, m.num_frames, merge_size=m.merge, budgets=budgets, patch_size=patch
    )


def _apply_budget(items: list[MediaPlan], per_item: int, config: EncodeConfig) -> int:
    """Set each item's target size for ``per_item`` tokens (the shared budget); returns the sample's LLM visual
    tokens."""
    total = 0
    for m in items:
        m.merge = config.image_merge_size if m.kind == "image" else config.video_merge_size
        m.size = _with_path(_item_size, m, m.source, per_item, config)
        total += m.num_frames * _tokens_of(m, config.patch_size)
    return total


def _item_size(m: MediaPlan, per_item: int, config: EncodeConfig) -> tuple[int, int]:
    return target_size(
        m.height,
        m.width,
        merge_size=m.merge,
        max_tokens=per_item,
        min_tokens=config.min_tokens_per_item,
        patch_size=config.patch_size,
    )


def _tokens_of(m: MediaPlan, patch: int) -> int:
    """LLM tokens of one image / one frame at the item's target size."""
    h, w = m.size
    return merged_tokens(1, h // patch, w // patch, m.merge)


def _pad_counts(items: list[MediaPlan], patch: int, kept: list[list[int]] | None = None) -> list[int]:
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


def _plan(
    record: dict[str, Any],
    data_root: str | Path,
    tokenizer,
    config: EncodeConfig,
    pad_ids,
    *,
    count_only: bool = False,
) -> Plan:
    """:func:`plan_record` with the tokenizer and pad ids given directly; DataErrors are not located.

    ``count_only`` (the cost pass): the text is counted (:func:`~.text.count_tokens`), not tokenised, so the
    plan's ``ids`` / ``flags`` are empty unless the "truncate" policy needs them; its ``cost`` is the same."""
    if isinstance(record, dict) and set(record) == {RECORD_COLUMN} and isinstance(record[RECORD_COLUMN], str):
        # a row of load_annotations' dataset, as the loader hands it
        record = json.loads(record[RECORD_COLUMN])
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
    if count_only:
        ids, flags = [], []
        n_ids = count_tokens(tokenizer, skeleton.text)
    else:
        ids, flags = tokenize_skeleton(tokenizer, skeleton)
        n_ids = len(ids)
    n_slots = sum(m.num_frames for m in items)
    text_tokens = n_ids - n_slots

    per_item = per_item_tokens(
        n_slots, config.max_visual_tokens, config.min_tokens_per_item, config.max_tokens_per_item
    )
    # The processor's sizes (what inference makes of each item); a sample whose items exceed max_visual_tokens
    # together shares the budget equally instead (the official rule; the processor sizes items one by one).
    visual = _apply_processor_sizes(items, config) if items else 0
    item_tokens = None
    if visual > config.max_visual_tokens:
        visual = _apply_budget(items, per_item, config)
        item_tokens = per_item
    plan = Plan(messages, items, ids, flags, text_tokens, item_tokens, config)
    total = text_tokens + visual
    if total <= config.max_length:
        return plan

    # ---- over max_length: the length policy ----------------------------------------------------------------
    if config.length_policy == "rebudget" and items:
        allowed = config.max_length - text_tokens
        # from the shared budget (not yet tried when the items had the processor's sizes), downwards
        first = per_item if item_tokens is None else per_item - 1
        per_item = min(first, max(config.min_tokens_per_item, allowed // n_slots))
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
        if count_only:  # the cut point depends on the labels: tokenise after all
            plan.ids, plan.flags = ids, flags = tokenize_skeleton(tokenizer, skeleton)
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


def _decode_size(m: MediaPlan, config: EncodeConfig) -> tuple[int, int] | None:
    """With ``decode_scale`` (opt-in, approximate), the size ``(height, width)`` FFmpeg's scaler shrinks frames to
    during conversion, before the exact resize to the target; None (the default path) for none.

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


def _cached_frames(m: MediaPlan, config: EncodeConfig) -> np.ndarray | None:
    """Frames of ``m`` from the frame cache written by ``prepare`` (None: caching off, absent, or stored smaller
    than this stage's target, in which case the video is decoded as usual)."""
    if config.frame_cache_dir is None:
        return None
    if m.info is not None and m.info.assigned_fps is not None:
        return None  # `prepare` caches files on their own clock (and skips frame folders)
    from .frame_cache import lookup_frames

    hit = lookup_frames(
        config.frame_cache_dir,
        m.paths[0],
        fps=config.fps,
        max_frames=config.max_frames,
        min_frames=config.min_frames,
        start=m.clip[0],
        end=m.clip[1],
        lossless=config.use_token_compression,  # JPEG noise would change which tokens pruning keeps
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


def _pixels(m: MediaPlan, config: EncodeConfig, mean, std) -> torch.Tensor:
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
            # Each frame is converted as torchcodec converts it and resized to the target as soon as it is decoded
            # (the processor's resize): memory holds the sampled frames at target size plus one native frame.
            # Frame folders are images: read at native size, resized below like any image.
            size = None if m.info is not None and m.info.kind == "frames" else m.size
            arr, _ = media.decode_video(
                m.paths[0], m.times, size=size, info=m.info, prescale=_decode_size(m, config)
            )
        if len(arr) != len(m.times):
            raise DataError(
                "corrupt_video", f"decoded {len(arr)} frames, asked for {len(m.times)}", path=str(m.paths[0])
            )
        if tuple(arr.shape[1:3]) == tuple(m.size):  # at target size: a view, patch order is the first copy
            frames = torch.from_numpy(arr).permute(0, 3, 1, 2)
        else:
            frames = _to_chw(arr)
        del arr
    # one float copy at the peak: the output (normalized_patches)
    return normalized_patches(
        frames, m.size, mean=mean, std=std, patch_size=config.patch_size, merge_size=m.merge
    )


def _same_size(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bring uint8 ``(N, 3, H, W)`` frames to ``size=(H, W)`` if they differ (frame lists of mixed sizes)."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return tvF.resize(frames, list(size), interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)


def _pad_ids(processor) -> tuple[int, int]:
    return int(processor.image_token_id), int(processor.video_token_id)


def _modality(items: list[MediaPlan]) -> str:
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
    plan: Plan | None = None,
) -> dict[str, Any]:
    """Turn one annotation record (either schema) into a Sample dict.

    Args:
        record: raw annotation record (official or messages schema, or the internal form), or a row of the
            dataset from ``load_annotations`` (``{"record": json_string}``).
        data_root: directory media paths are relative to (paths may not escape it).
        processor: ``VideoLlama3Processor`` (its tokenizer, pad ids and mean/std are used).
        config: vision / text knobs of the stage.
        dataset, index: where the record comes from; written into every ``DataError`` and into ``meta``.
        plan: the record's :func:`plan_record` under the same ``config``, when the caller has it already (the
            record is then not planned again: no header reads, no tokenising); None plans it here.
    Returns:
        ``input_ids`` / ``labels`` long ``(L,)``; when the sample has images ``pixel_values`` float32
        ``(sum h*w, 588)``, ``image_grid_thw`` ``(n_img, 3)``, ``image_merge_sizes`` ``(n_img,)``; when it has videos
        ``pixel_values_videos`` ``(sum t*h*w, 588)``, ``video_grid_thw`` ``(n_vid, 3)``, ``video_merge_sizes``
        ``(n_vid,)``, ``video_compression_mask`` bool ``(sum t*h*w/m^2,)``; and ``meta``.
    Raises:
        DataError: naming ``dataset``, ``index`` and the file at fault.
    """
    if plan is not None and plan.config != config:
        raise ValueError("encode_record: the plan was made under another EncodeConfig than `config`")
    try:
        return _encode(record, data_root, processor, config, dataset, index, plan)
    except DataError as e:
        raise e.locate(dataset=dataset, index=index) from None


def _encode(
    record, data_root, processor, config: EncodeConfig, dataset: str, index: int, plan: Plan | None
) -> dict[str, Any]:
    pad_ids = _pad_ids(processor)
    if plan is None:
        plan = _plan(record, data_root, processor.tokenizer, config, pad_ids)
    ip = processor.image_processor
    mean, std = tuple(ip.image_mean), tuple(ip.image_std)

    sample: dict[str, Any] = {}
    images = [m for m in plan.media if m.kind == "image"]
    videos = [m for m in plan.media if m.kind == "video"]
    patch = config.patch_size
    if images:
        sample["pixel_values"] = _concat([_located(_pixels, m, config, mean, std) for m in images])
        sample["image_grid_thw"] = torch.tensor(
            [[1, h // patch, w // patch] for h, w in (m.size for m in images)]
        )
        sample["image_merge_sizes"] = torch.tensor([m.merge for m in images], dtype=torch.long)
    kept: list[list[int]] = []
    if videos:
        pv = _concat([_located(_pixels, m, config, mean, std) for m in videos])
        grid = torch.tensor([[m.num_frames, m.size[0] // patch, m.size[1] // patch] for m in videos])
        merges = torch.tensor([m.merge for m in videos], dtype=torch.long)
        if config.use_token_compression:
            mask = compression_mask(pv, grid, merges, threshold=config.compression_threshold)
        else:
            mask = torch.ones(sum(merged_token_counts(grid, merges)), dtype=torch.bool)
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


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)`` without copying a single part: ``cat`` of one tensor allocates a second copy of the
    sample's pixels (+81 MB at the peak for a 20-min clip at 180 frames; BENCHMARKS.md, B1)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _located(fn, m: MediaPlan, *args):
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


def plan_record(
    record: dict[str, Any],
    *,
    data_root: str | Path,
    processor,
    config: EncodeConfig,
    dataset: str = "",
    index: int = -1,
) -> Plan:
    """The :class:`Plan` of one record, from image headers / video metadata only (no pixel decode).

    Arguments as :func:`encode_record`. ``plan.cost`` is ``(num_tokens, num_patches)``; ``plan.media`` holds each
    image / video with its native size, sampled frame times and target size; ``plan.text_tokens`` and
    ``plan.visual_tokens`` split the tokens. Pass the plan to ``encode_record(..., plan=plan)`` to encode the
    record without planning it again. Raises the same ``DataError`` as :func:`encode_record` for anything
    detectable without decoding pixels, located at ``dataset`` / ``index``.
    """
    try:
        return _plan(record, data_root, processor.tokenizer, config, _pad_ids(processor))
    except DataError as e:
        raise e.locate(dataset=dataset, index=index) from None


def estimate_cost(
    record: dict[str, Any],
    *,
    data_root: str | Path,
    processor,
    config: EncodeConfig,
    dataset: str = "",
    index: int = -1,
) -> tuple[int, int]:
    """``(num_tokens, num_patches)`` the record will encode to: ``plan_record(...).cost`` (see :class:`Plan`),
    with the text counted instead of tokenised (the same count; ``tests/test_costing.py``)."""
    try:
        plan = _plan(record, data_root, processor.tokenizer, config, _pad_ids(processor), count_only=True)
    except DataError as e:
        raise e.locate(dataset=dataset, index=index) from None
    return plan.cost


def estimate_cost_row(
    record: dict[str, Any],
    *,
    data_root: str | Path,
    processor,
    config: EncodeConfig,
    dataset: str = "",
    index: int = -1,
) -> tuple[int, int, int, int]:
    """The record's cost-table row, ``plan_record(...).cost_row`` (tokens, patches, visual LLM tokens, tower
    ``sum P_f^2``), planned as :func:`estimate_cost` plans it (the text counted, not tokenised)."""
    try:
        plan = _plan(record, data_root, processor.tokenizer, config, _pad_ids(processor), count_only=True)
    except DataError as e:
        raise e.locate(dataset=dataset, index=index) from None
    return plan.cost_row
