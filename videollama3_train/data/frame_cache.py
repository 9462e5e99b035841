"""A cache of sampled video frames, so training reads a few small images instead of decoding whole videos.

``prepare`` decodes every video once (in parallel) at the largest frame size any stage needs and writes one file
per (video, sampling parameters); ``encode_record`` then reads that file and only resizes down.

File format: one uncompressed tar per entry, ``<cache_dir>/<key[:2]>/<key>.tar``, holding ``header.json`` (shape,
timestamps, codec, the video's ``VideoInfo``) followed by one member per frame: ``000000.jpg`` ... (JPEG quality
95, the default), ``.png`` (lossless) or a single ``frames.npy`` (raw). Why a tar of JPEGs: it is ~10-20x smaller
than raw pixels (a 180-frame entry is a few MB instead of tens), decodes at well over 1000 small frames/s with
libjpeg-turbo, lets the JPEG decoder shrink by 1/2, 1/4, 1/8 for free when a stage wants smaller frames
(``draft`` mode), and stays inspectable with ``tar tf`` (measured in ``benchmarks/results/B1_video.md``).
Uncompressed, so members are read in place: there is nothing to gain from compressing JPEG bytes again.

Token pruning (``use_token_compression``) needs lossless entries: it keeps a token when its mean change from the
previous frame exceeds 0.1 grey levels, far below JPEG's error, so JPEG noise in still regions flips which tokens
are kept (measured on a still scene with a small moving square: 21 of 80 tokens flipped at quality 95, PNG 0).
``prepare`` therefore writes PNG when the stage prunes, and a pruning stage reads only lossless entries (a JPEG
entry misses, so the video is decoded).

Writes are atomic: the tar is written to a temporary name in the same directory, fsynced, then renamed, so a
reader sees either the whole entry or none (a crash mid-write leaves only a ``.tmp`` file, never a bad entry).

Keys (:func:`cache_key`) hash the resolved path, size and mtime of the video with every parameter that changes
which frames are sampled, so an edited or replaced video, or a stage with other sampling, misses instead of
reading stale frames. A miss is never an error: the caller decodes the video as usual.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import media
from .errors import DataError
from .pool import parallel_map

__all__ = [
    "CACHE_VERSION",
    "CODECS",
    "build_frame_cache",
    "cache_key",
    "cache_path",
    "cached_codec",
    "cached_size",
    "lookup_frames",
    "read_cached_frames",
    "write_cached_frames",
]

# Bump when the file layout or the meaning of a key changes: old entries then simply miss.
# 2: frames sampled by the processor's rule on torchcodec's frame numbering (media.sample_frames), converted and
# resized exactly as the processor does.
CACHE_VERSION = 2
CODECS = ("jpeg", "png", "npy")
LOSSLESS_CODECS = ("png", "npy")  # give the decoder's pixels bit for bit (what token pruning needs)
_HEADER = "header.json"
_SUFFIX = {"jpeg": ".jpg", "png": ".png"}
JPEG_QUALITY = 95

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------------------------
# keys and paths
# ---------------------------------------------------------------------------------------------------------------
def cache_key(
    video_path: PathLike,
    *,
    fps: float,
    max_frames: int,
    min_frames: int,
    start: float | None = None,
    end: float | None = None,
    max_side_or_pixels: int | None = None,
) -> str:
    """Hex key of one cache entry: sha256 of the video's resolved path, size and mtime and the sampling params.

    The path is resolved (symlinks followed) so that every way of naming one file maps to one entry; moving the
    data to another mount point therefore misses (safe: the video is decoded again). ``max_side_or_pixels`` is
    part of the key only when given: leave it None to share one entry between stages that need different frame
    sizes (the entry records its size; :func:`read_cached_frames` resizes down, and misses when it would have to
    enlarge a frame stored below native size). Raises DataError ``missing_file`` if the video does not exist.
    """
    real = os.path.realpath(os.fspath(video_path))
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise DataError("missing_file", "no such file", path=real) from None
    fields = {
        "v": CACHE_VERSION,
        "path": real,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        # repr-stable numbers: 1 and 1.0 must give one key
        "fps": float(fps),
        "max_frames": int(max_frames),
        "min_frames": int(min_frames),
        "start": None if start is None else float(start),
        "end": None if end is None else float(end),
        "cap": None if max_side_or_pixels is None else int(max_side_or_pixels),
    }
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def cache_path(cache_dir: PathLike, key: str) -> Path:
    """Where the entry of ``key`` lives: two-level fan-out so no directory holds millions of files."""
    if len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
        raise ValueError(f"not a cache key (lowercase hex expected): {key!r}")
    return Path(cache_dir) / key[:2] / f"{key}.tar"


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------
def _encode_frame(frame: np.ndarray, codec: str) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(frame)
    if codec == "jpeg":
        # 4:4:4 chroma: the default 4:2:0 would halve colour resolution on top of the video's own subsampling.
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        img.save(buf, format="PNG", compress_level=1)  # level 1: most of the size win, a fraction of the time
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = 0o644
    tar.addfile(ti, io.BytesIO(data))


def _info_dict(info: Any) -> dict[str, Any]:
    if info is None:
        return {}
    if dataclasses.is_dataclass(info) and not isinstance(info, type):
        d = dataclasses.asdict(info)
        d.pop("frame_times", None)  # one float per frame of the video: not needed to read an entry
        return d
    if isinstance(info, dict):
        return dict(info)
    raise TypeError(f"info must be a VideoInfo, a dict or None, got {type(info).__name__}")


def write_cached_frames(
    cache_dir: PathLike,
    key: str,
    frames: np.ndarray,
    timestamps: Sequence[float],
    info: Any = None,
    *,
    codec: str = "jpeg",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Store ``frames`` (``(T, H, W, 3)`` uint8 RGB) and their ``timestamps`` under ``key``, atomically.

    info: the video's ``media.VideoInfo`` (or a dict); kept in the header so a reader knows the native size.
    codec: ``"jpeg"`` (quality 95, 4:4:4; default), ``"png"`` (lossless) or ``"npy"`` (raw, lossless, largest).
    extra: more JSON-serialisable header fields (e.g. the requested sample times).
    Returns the entry's path. An existing entry is replaced.
    """
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if len(timestamps) != len(frames):
        raise ValueError(f"{len(timestamps)} timestamps for {len(frames)} frames")
    if len(frames) == 0:
        raise ValueError("refusing to cache an entry with no frames")
    header = {
        "version": CACHE_VERSION,
        "codec": codec,
        "shape": list(frames.shape),
        "timestamps": [float(t) for t in timestamps],
        "info": _info_dict(info),
        **(extra or {}),
    }
    final = cache_path(cache_dir, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the final name, so os.replace is a rename within one filesystem (atomic).
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                _add_member(tar, _HEADER, json.dumps(header).encode())
                if codec == "npy":
                    buf = io.BytesIO()
                    np.save(buf, np.ascontiguousarray(frames), allow_pickle=False)
                    _add_member(tar, "frames.npy", buf.getvalue())
                else:
                    for i, frame in enumerate(frames):
                        _add_member(tar, f"{i:06d}{_SUFFIX[codec]}", _encode_frame(frame, codec))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        # Leave nothing behind that a later run could mistake for data (KeyboardInterrupt included).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return final


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------
def _read_header(tar: tarfile.TarFile, path: Path) -> dict[str, Any]:
    member = tar.next()
    if member is None or member.name != _HEADER:
        raise DataError("corrupt_cache", "cache entry does not start with its header", path=str(path))
    header = json.loads(tar.extractfile(member).read())
    if header.get("version") != CACHE_VERSION or header.get("codec") not in CODECS:
        raise DataError("corrupt_cache", f"unsupported cache entry {header.get('version')}", path=str(path))
    return header


def cached_codec(cache_dir: PathLike, key: str) -> str | None:
    """Codec of the entry stored under ``key`` (header only), or None when there is no entry."""
    path = cache_path(cache_dir, key)
    try:
        with tarfile.open(path, mode="r:") as tar:
            return str(_read_header(tar, path)["codec"])
    except FileNotFoundError:
        return None


def cached_size(cache_dir: PathLike, key: str) -> tuple[int, int] | None:
    """``(height, width)`` of the frames stored under ``key`` (header only), or None when there is no entry."""
    path = cache_path(cache_dir, key)
    try:
        with tarfile.open(path, mode="r:") as tar:
            shape = _read_header(tar, path)["shape"]
    except FileNotFoundError:
        return None
    return int(shape[1]), int(shape[2])


def _decode_member(data: bytes, size: tuple[int, int] | None, path: Path) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
        if size is not None and img.format == "JPEG":
            # DCT-domain downscale to the smallest 1/2^k size that is still >= the request: cheaper and no
            # worse than decoding full size first.
            img.draft("RGB", (size[1], size[0]))
        img = img.convert("RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC, reducing_gap=None)
        return np.asarray(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError("corrupt_cache", f"cannot decode a cached frame: {e}", path=str(path)) from None


def read_cached_frames(
    cache_dir: PathLike, key: str, size: tuple[int, int] | None = None, *, lossless: bool = False
) -> tuple[np.ndarray, list[float]] | None:
    """The frames (``(T, H, W, 3)`` uint8) and timestamps stored under ``key``; None when there is no entry.

    size: ``(height, width)`` to return; frames are resized with PIL bicubic (JPEG entries first shrink in the
    decoder). Enlarging is refused (None, so the caller decodes the video) when the entry was stored below the
    video's native size, since a fresh decode would be sharper; when the entry holds native-size frames,
    enlarging is what a fresh decode would do too, so it is done.
    lossless: miss (None) unless the entry is PNG or raw (token pruning: see the module's docstring).
    A damaged entry raises DataError ``corrupt_cache`` (delete it, or run ``prepare`` again).
    """
    path = cache_path(cache_dir, key)
    try:
        tar = tarfile.open(path, mode="r:")  # noqa: SIM115 -- closed by the `with tar` below, after the miss check
    except FileNotFoundError:
        return None
    except tarfile.TarError as e:
        raise DataError("corrupt_cache", f"unreadable cache entry: {e}", path=str(path)) from None
    with tar:
        try:
            header = _read_header(tar, path)
            t, h, w, _ = header["shape"]
            if lossless and header["codec"] not in LOSSLESS_CODECS:
                return None
            if size is not None:
                size = (int(size[0]), int(size[1]))
                if size == (h, w):
                    size = None
                elif size[0] > h or size[1] > w:
                    info = header.get("info") or {}
                    native = (info.get("height"), info.get("width"))
                    if native != (h, w):
                        return None
            # iterating a TarFile starts again from its first member: skip the header read above
            members = [m for m in tar if m.isfile() and m.name != _HEADER]
            if header["codec"] == "npy":
                frames = np.load(io.BytesIO(tar.extractfile(members[0]).read()), allow_pickle=False)
                if size is not None:
                    frames = np.stack([_resize(f, size) for f in frames])
            else:
                if len(members) != t:
                    raise DataError(
                        "corrupt_cache", f"{len(members)} frames stored, header says {t}", path=str(path)
                    )
                out_h, out_w = size if size is not None else (h, w)
                frames = np.empty((t, out_h, out_w, 3), np.uint8)
                for i, m in enumerate(members):
                    frames[i] = _decode_member(tar.extractfile(m).read(), size, path)
        except (tarfile.TarError, OSError, KeyError, json.JSONDecodeError) as e:
            raise DataError("corrupt_cache", f"damaged cache entry: {e}", path=str(path)) from None
    if frames.shape[0] != t:
        raise DataError("corrupt_cache", f"{frames.shape[0]} frames stored, header says {t}", path=str(path))
    return frames, list(header["timestamps"])


def _resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(frame).resize((size[1], size[0]), Image.Resampling.BICUBIC, reducing_gap=None)
    return np.asarray(img)


def lookup_frames(
    cache_dir: PathLike | None,
    video_path: PathLike,
    *,
    fps: float,
    max_frames: int,
    min_frames: int,
    start: float | None = None,
    end: float | None = None,
    size: tuple[int, int] | None = None,
    lossless: bool = False,
) -> tuple[np.ndarray, list[float]] | None:
    """Key + read in one call, for ``encode_record``: None when caching is off, the entry is absent or too small
    (or lossy while ``lossless`` is asked: a stage that prunes tokens)."""
    if cache_dir is None:
        return None
    key = cache_key(video_path, fps=fps, max_frames=max_frames, min_frames=min_frames, start=start, end=end)
    return read_cached_frames(cache_dir, key, size=size, lossless=lossless)


# ---------------------------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------------------------
def stored_size(height: int, width: int, max_pixels: int | None) -> tuple[int, int]:
    """Frame size ``(h, w)`` to cache a ``height x width`` video at under a per-frame pixel cap.

    Native size when it fits, else the same aspect ratio scaled to the cap, rounded *up* to even numbers (the
    video scaler wants even sizes). Rounding up keeps both sides >= what ``smart_resize`` picks under the same cap
    (it floors to the patch grid), so a stage never has to enlarge a cached frame.
    """
    if max_pixels is None or height * width <= max_pixels:
        return height, width
    s = math.sqrt(max_pixels / (height * width))
    return min(height, max(2, 2 * math.ceil(height * s / 2))), min(
        width, max(2, 2 * math.ceil(width * s / 2))
    )


def _cache_one(
    job: tuple[str, float | None, float | None],
    cache_dir: str,
    fps: float,
    max_frames: int,
    min_frames: int,
    max_pixels_per_frame: int | Callable[[int], int] | None,
    codec: str,
    overwrite: bool,
) -> str:
    """Worker: decode one video's sampled frames and write its entry. Returns ``"written"``/``"existing"`` or
    ``"error:<reason>"`` (never raises a DataError, so one bad file cannot stop the pool)."""
    path, start, end = job
    try:
        key = cache_key(path, fps=fps, max_frames=max_frames, min_frames=min_frames, start=start, end=end)
        # a lossy entry does not serve a lossless request (a pruning stage would miss it every epoch): replace it
        if (
            not overwrite
            and cache_path(cache_dir, key).exists()
            and (codec not in LOSSLESS_CODECS or cached_codec(cache_dir, key) in LOSSLESS_CODECS)
        ):
            return "existing"
        info = media.probe_video(path, folder_fps=fps)
        if info.kind == "frames":
            return "skipped:frame_folder"  # already images on disk: nothing to gain
        try:
            times = media.sample_frame_times(
                info, fps=fps, max_frames=max_frames, min_frames=min_frames, start=start, end=end
            )
        except ValueError as e:  # empty [start, end]
            raise DataError("no_frames", str(e), path=path) from None
        cap = max_pixels_per_frame(len(times)) if callable(max_pixels_per_frame) else max_pixels_per_frame
        size = stored_size(info.height, info.width, cap)
        frames, stamps = media.decode_video(path, times, size=size, info=info)
        write_cached_frames(cache_dir, key, frames, stamps, info, codec=codec, extra={"times": list(times)})
        return "written"
    except DataError as e:
        return f"error:{e.reason}"
    except (OSError, MemoryError) as e:  # disk full, permissions, ...: count and go on, like a bad video
        return f"error:{type(e).__name__}"


def build_frame_cache(
    videos: Iterable[tuple[PathLike, float | None, float | None]],
    cache_dir: PathLike,
    *,
    fps: float,
    max_frames: int,
    min_frames: int,
    max_pixels_per_frame: int | Callable[[int], int] | None = None,
    num_workers: int = 1,
    codec: str = "jpeg",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Decode each video's sampled frames once, in parallel, and cache them; returns counts.

    videos: ``(path, start, end)`` triples (duplicates are done once; ``start``/``end`` None for the whole video).
    max_pixels_per_frame: pixel cap per stored frame, or a picklable callable ``num_sampled_frames -> cap`` (the
        per-frame budget shrinks as frames increase); None stores native size.
    num_workers: processes (``<= 1``: in this process, which is also easier to debug).
    codec: ``"jpeg"`` (smallest), ``"png"`` or ``"npy"`` (lossless, for stages that prune tokens).
    Existing entries are kept unless ``overwrite`` (a JPEG entry is replaced when a lossless codec is asked). Failures never raise: the result counts them per reason as
    ``"error:<reason>"`` beside ``"videos"``, ``"written"``, ``"existing"`` and ``"failed"``.
    """
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    jobs = list(dict.fromkeys((os.fspath(p), s, e) for p, s, e in videos))
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    args = dict(
        cache_dir=os.fspath(cache_dir),
        fps=fps,
        max_frames=max_frames,
        min_frames=min_frames,
        max_pixels_per_frame=max_pixels_per_frame,
        codec=codec,
        overwrite=overwrite,
    )
    counts: Counter[str] = Counter()

    def tally(outcome: str) -> dict[str, int]:
        counts[outcome] += 1
        return {"failed": sum(v for k, v in counts.items() if k.startswith("error:"))}

    # One video per task: videos differ a lot in cost, and one slow chunk must not stall the tail of the run.
    parallel_map(
        functools.partial(_cache_one, **args),
        jobs,
        workers=num_workers,
        desc="frame cache",
        unit="video",
        progress=progress,
        on_result=tally,
    )
    result = {"videos": len(jobs), "written": counts.pop("written", 0), "existing": counts.pop("existing", 0)}
    result["failed"] = sum(v for k, v in counts.items() if k.startswith("error:"))
    result.update(sorted(counts.items()))
    return result
