"""Fill the frame cache: decode every video of a data mixture once, ahead of training.

Training then reads each video's sampled frames from ``EncodeConfig.frame_cache_dir`` (a few JPEGs, or PNGs when
the stage prunes tokens) instead of decoding the video again every epoch (see ``frame_cache.py``). Videos are found
the way training finds them (``iter_records`` + ``normalize_record``, so both annotation schemas and the same
``start``/``end`` handling). Frame lists and frame folders are skipped: they are images on disk already.
"""

from __future__ import annotations

import functools
import os
from collections import Counter

from . import media
from .annotations import iter_records, normalize_record
from .config import DataConfig, EncodeConfig
from .errors import DataError
from .frame_cache import build_frame_cache

__all__ = ["collect_videos", "frame_pixel_cap", "prepare", "prepare_data"]


def collect_videos(
    annotation_paths_and_roots: list[tuple[str, str]],
) -> tuple[list[tuple[str, float | None, float | None]], Counter[str]]:
    """``(resolved video path, start, end)`` of every video file named by the annotations, deduplicated.

    Returns the list and counters: ``records``, ``video_items``, ``bad_records`` (a record training would reject
    too), ``frame_lists`` (skipped), ``error:<reason>`` for paths that cannot be resolved (missing, outside root).
    A file that is not valid JSON raises ``DataError`` (a broken file should stop ``prepare``, as it would stop
    training, rather than silently cache half a dataset).
    """
    counts: Counter[str] = Counter()
    found: dict[tuple[str, float | None, float | None], None] = {}  # ordered set
    for annotation, root in annotation_paths_and_roots:
        for raw in iter_records(annotation):
            counts["records"] += 1
            try:
                record = normalize_record(raw)
            except DataError:
                counts["bad_records"] += 1
                continue
            for message in record["messages"]:
                for item in message["content"]:
                    if item["type"] != "video":
                        continue
                    counts["video_items"] += 1
                    if isinstance(item["path"], list):
                        counts["frame_lists"] += 1
                        continue
                    try:
                        path = media.resolve_media_path(root, item["path"])
                    except DataError as e:
                        counts[f"error:{e.reason}"] += 1
                        continue
                    if path.is_dir():
                        counts["frame_lists"] += 1
                        continue
                    found[(str(path), item.get("start"), item.get("end"))] = None
    return list(found), counts


def _cap_for(num_frames: int, *, max_visual_tokens: int, min_tokens: int, factor: int) -> int:
    # the processor's video budget: the sample's pixels divided by the frame count (data/encode.py, the parity path)
    return max(min_tokens * factor * factor, max_visual_tokens * factor * factor // max(num_frames, 1))


def frame_pixel_cap(cfg: EncodeConfig):
    """Picklable ``num_frames -> pixels`` cap: the largest frame a video of that many frames can get in ``cfg``.

    That is when the video is alone in its sample (the budget is shared with nothing else): the processor's video
    budget, ``max_visual_tokens`` pixels-worth divided by the frame count (at least ``min_tokens_per_item``), in the
    pixels one token covers (``(patch * video_merge)**2``).
    """
    return functools.partial(
        _cap_for,
        max_visual_tokens=cfg.max_visual_tokens,
        min_tokens=cfg.min_tokens_per_item,
        factor=cfg.patch_size * cfg.video_merge_size,
    )


def prepare(
    annotation_paths_and_roots: list[tuple[str, str]],
    cache_dir: str | os.PathLike,
    encode_cfg: EncodeConfig,
    num_workers: int = 1,
    *,
    max_pixels_per_frame: int | None = None,
    progress: bool = True,
    codec: str | None = None,
) -> dict[str, int]:
    """Fill ``cache_dir`` with the sampled frames of every video in the annotation files; returns counts.

    annotation_paths_and_roots: ``(annotation file, media root)`` pairs; paths in a file are relative to its root.
    encode_cfg: the stage's sampling (``fps``, ``max_frames``, ``min_frames``) and budget; frames are stored at
        the largest size this config can ask for (:func:`frame_pixel_cap`) unless ``max_pixels_per_frame`` caps
        every frame at a fixed number of pixels instead.
    codec: how frames are stored (``frame_cache.CODECS``); None: PNG when ``encode_cfg`` prunes tokens
        (``use_token_compression``: JPEG noise would change which tokens are kept), else JPEG (smaller).
    Bad records and unreadable videos are counted, not fatal (see ``collect_videos`` / ``build_frame_cache``).
    """
    videos, counts = collect_videos(annotation_paths_and_roots)
    cap = max_pixels_per_frame if max_pixels_per_frame is not None else frame_pixel_cap(encode_cfg)
    if codec is None:
        codec = "png" if encode_cfg.use_token_compression else "jpeg"
    built = build_frame_cache(
        videos,
        cache_dir,
        fps=encode_cfg.fps,
        max_frames=encode_cfg.max_frames,
        min_frames=encode_cfg.min_frames,
        max_pixels_per_frame=cap,
        num_workers=num_workers,
        codec=codec,
        progress=progress,
    )
    out = dict(counts)
    for k, v in built.items():
        out[k] = out.get(k, 0) + v
    # videos that could not even be resolved are failures too
    out["failed"] = sum(v for k, v in out.items() if k.startswith("error:"))
    return out


def prepare_data(
    data: DataConfig,
    encode: EncodeConfig,
    *,
    workers: int | None = None,
    max_pixels_per_frame: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """:func:`prepare` over every dataset of ``data`` into ``encode.frame_cache_dir`` (the key training reads).

    workers: decoding processes; None = ``data.cost_workers`` (the processes of training's cost pre-pass).
    """
    if encode.frame_cache_dir is None:
        raise ValueError("prepare: set encode.frame_cache_dir=DIR (and pass the same key to training)")
    pairs = [(d.path, d.root) for d in data.resolved_datasets().values()]
    if workers is None:
        workers = max(1, data.cost_workers)
    return prepare(
        pairs,
        encode.frame_cache_dir,
        encode,
        workers,
        max_pixels_per_frame=max_pixels_per_frame,
        progress=progress,
    )
