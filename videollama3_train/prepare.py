"""``prepare``: decode every video of a set of annotation files once and fill the frame cache.

Training then reads each video's sampled frames from ``EncodeConfig.frame_cache_dir`` (a few JPEGs) instead of
decoding the video again every epoch (see ``videollama3_train/data/frame_cache.py``).

The core is the plain function :func:`prepare`; :func:`prepare_main` is an argparse front end::

    python -m videollama3_train.prepare --data train.jsonl:/data/videos --cache-dir /cache/frames --workers 8

Videos are found the way training finds them (``normalize_record``, so both annotation schemas and the same
``start``/``end`` handling). Frame lists and frame folders are skipped: they are images on disk already.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from videollama3_train.data import media
from videollama3_train.data.annotations import normalize_record
from videollama3_train.data.config import EncodeConfig
from videollama3_train.data.errors import DataError
from videollama3_train.data.frame_cache import build_frame_cache
from videollama3_train.data.vision import per_item_tokens

__all__ = ["collect_videos", "frame_pixel_cap", "iter_annotation_records", "prepare", "prepare_main"]


def iter_annotation_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Records of a JSON-list or JSONL annotation file, streamed (JSONL is never loaded whole).

    Raises DataError ``missing_file`` or ``bad_schema`` (invalid JSON: a broken file should stop ``prepare``, as
    it would stop training, rather than silently cache half a dataset).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError("missing_file", "annotation file not found", path=path)
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError("bad_schema", f"not valid JSON: {e}", path=path) from None
            yield from records
            return
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError("bad_schema", f"line {lineno} is not valid JSON: {e}", path=path) from None


def collect_videos(
    annotation_paths_and_roots: list[tuple[str, str]],
) -> tuple[list[tuple[str, float | None, float | None]], Counter[str]]:
    """``(resolved video path, start, end)`` of every video file named by the annotations, deduplicated.

    Returns the list and counters: ``records``, ``video_items``, ``bad_records`` (a record training would reject
    too), ``frame_lists`` (skipped), ``error:<reason>`` for paths that cannot be resolved (missing, outside root).
    """
    counts: Counter[str] = Counter()
    found: dict[tuple[str, float | None, float | None], None] = {}  # ordered set
    for annotation, root in annotation_paths_and_roots:
        for raw in iter_annotation_records(annotation):
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


def _cap_for(
    num_frames: int, *, max_visual_tokens: int, min_tokens: int, max_tokens: int, factor: int
) -> int:
    return per_item_tokens(num_frames, max_visual_tokens, min_tokens, max_tokens) * factor * factor


def frame_pixel_cap(cfg: EncodeConfig):
    """Picklable ``num_frames -> pixels`` cap: the largest frame a video of that many frames can get in ``cfg``.

    That is when the video is alone in its sample (the budget is shared with nothing else): the per-frame token
    share of ``max_visual_tokens``, times the pixels one token covers (``(patch * video_merge)**2``).
    """
    return functools.partial(
        _cap_for,
        max_visual_tokens=cfg.max_visual_tokens,
        min_tokens=cfg.min_tokens_per_item,
        max_tokens=cfg.max_tokens_per_item,
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
) -> dict[str, int]:
    """Fill ``cache_dir`` with the sampled frames of every video in the annotation files; returns counts.

    annotation_paths_and_roots: ``(annotation file, media root)`` pairs; paths in a file are relative to its root.
    encode_cfg: the stage's sampling (``fps``, ``max_frames``, ``min_frames``) and budget; frames are stored at
        the largest size this config can ask for (:func:`frame_pixel_cap`) unless ``max_pixels_per_frame`` caps
        every frame at a fixed number of pixels instead.
    Bad records and unreadable videos are counted, not fatal (see ``collect_videos`` / ``build_frame_cache``).
    """
    videos, counts = collect_videos(annotation_paths_and_roots)
    cap = max_pixels_per_frame if max_pixels_per_frame is not None else frame_pixel_cap(encode_cfg)
    built = build_frame_cache(
        videos,
        cache_dir,
        fps=encode_cfg.fps,
        max_frames=encode_cfg.max_frames,
        min_frames=encode_cfg.min_frames,
        max_pixels_per_frame=cap,
        num_workers=num_workers,
        progress=progress,
    )
    out = dict(counts)
    for k, v in built.items():
        out[k] = out.get(k, 0) + v
    # videos that could not even be resolved are failures too
    out["failed"] = sum(v for k, v in out.items() if k.startswith("error:"))
    return out


def _data_arg(value: str) -> tuple[str, str]:
    # Split at the last ':': an annotation path may contain ':' (URL-like names), a media root may not.
    annotation, sep, root = value.rpartition(":")
    if not sep or not annotation or not root:
        raise argparse.ArgumentTypeError(f"expected ANNOTATION:ROOT, got {value!r}")
    return annotation, root


def prepare_main(argv: list[str] | None = None) -> dict[str, int]:
    """Command line: ``--data ANNOT:ROOT`` (repeatable), ``--cache-dir``, sampling and budget flags."""
    d = EncodeConfig()
    ap = argparse.ArgumentParser(
        prog="python -m videollama3_train.prepare", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--data", action="append", type=_data_arg, required=True, metavar="ANNOT:ROOT")
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--fps", type=float, default=d.fps)
    ap.add_argument("--max-frames", type=int, default=d.max_frames)
    ap.add_argument("--min-frames", type=int, default=d.min_frames)
    ap.add_argument("--max-visual-tokens", type=int, default=d.max_visual_tokens)
    ap.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="fixed pixel cap per stored frame (default: from the budget)",
    )
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = ap.parse_args(argv)
    cfg = EncodeConfig(
        fps=args.fps,
        max_frames=args.max_frames,
        min_frames=args.min_frames,
        max_visual_tokens=args.max_visual_tokens,
    )
    counts = prepare(args.data, args.cache_dir, cfg, args.workers, max_pixels_per_frame=args.max_pixels)
    print(json.dumps(counts, indent=2, sort_keys=True))
    return counts


def main() -> None:
    """``python -m videollama3_train.prepare data=D encode.frame_cache_dir=DIR [model=M] [stage=S] [...]``.

    The same config as training (so sampling and budgets match what training will ask the cache for); every
    dataset of ``data`` is scanned. The argparse form (``--data ANNOT:ROOT --cache-dir DIR``) also works.
    """
    import sys

    if any(a.startswith("--") for a in sys.argv[1:]):
        prepare_main()
        return
    import hydra
    from omegaconf import OmegaConf

    from .config import register_configs
    from .train import CONFIG_DIR

    register_configs()
    sys.argv += ["output_dir=.", "hydra.output_subdir=null", "hydra.run.dir=."]

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
    def _main(dcfg) -> None:
        cfg = OmegaConf.to_object(dcfg)
        if cfg.encode.frame_cache_dir is None:
            raise SystemExit("prepare: set encode.frame_cache_dir=DIR (and pass the same key to training)")
        pairs = [(d.path, d.root or str(Path(d.path).parent)) for d in cfg.data.dataset_dict().values()]
        counts = prepare(pairs, cfg.encode.frame_cache_dir, cfg.encode, max(1, cfg.data.cost_workers))
        print(json.dumps(counts, indent=2, sort_keys=True))

    _main()


if __name__ == "__main__":
    main()
