"""Reading images, videos, GIFs and frame folders into RGB arrays, with every failure a named ``DataError``.

Images go through Pillow: header-only probing (size after EXIF orientation), a decompression-bomb guard checked
before any pixel is decoded, and one well-defined conversion of every mode to 8-bit RGB.

Videos go through PyAV (FFmpeg). The official VideoLLaMA3 code decodes a whole video at native resolution in an
ffmpeg subprocess and then keeps one frame per second (REFERENCE §4); here only the frames that are kept are
converted, each is resized to its target size as soon as it is decoded, and long gaps between kept frames are
crossed by seeking to the preceding keyframe instead of decoding everything in between.

What a model trained here sees must be what transformers' ``VideoLlama3Processor`` gives it at inference, and that
processor decodes with torchcodec. So: frames are numbered and sampled as torchcodec's exact-mode scan and the
processor's ``sample_frames`` do (:func:`sample_frames`); each decoded frame becomes the same RGB bytes torchcodec
produces (an FFmpeg ``format=rgb24`` filter graph, :class:`_RGBConverter`: byte-identical to torchcodec on 8- and
10-bit, limited and full range, BT.601/709/2020, 4:2:0/4:2:2/4:4:4, H.264/VP8/VP9/MPEG-4/MJPEG); and it is resized
with torchvision's bicubic + antialias on uint8, the processor's own resize (:func:`resize_frame`).

Time convention: every time in this module (``sample_frame_times`` output, ``decode_video`` input and returned
timestamps) is seconds from the video's first frame (``VideoInfo.start_time`` is subtracted), so the first frame
of any video is at 0.0. A sub-clip ``[start, end]`` keeps that origin: its times begin at ``start``.

Rotation: ``VideoInfo.rotation`` is the clockwise angle a player turns the stored frames by (FFmpeg's
``-autorotate`` convention, i.e. minus ``av_display_rotation_get`` of the display matrix); decoded frames are
returned upright, and ``width``/``height`` are the display size.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
import torchvision.transforms.v2.functional as tvF
from PIL import Image, ImageFile

from videollama3_train.data.errors import DataError

PathLike = str | os.PathLike

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's hard DecompressionBomb limit (2 x MAX_IMAGE_PIXELS)

# Keyframe statistics are read from at most this many index entries: enough to know the GOP, cheap on hour-long files.
_INDEX_ENTRIES_SCANNED = 4096
# Without a known keyframe interval, seek only across gaps longer than this (seconds). Typical GOPs are 0.5-10 s.
_DEFAULT_SEEK_GAP = 5.0
# Bounds on decode loops, so a broken file can never keep a worker busy forever.
_MAX_SEEK_RETRIES = 3


@dataclass
class VideoInfo:
    """What a video is, read from the container (and its first frame); see the module docstring for conventions."""

    path: str
    width: int  # display size (after rotation)
    height: int
    duration: float  # seconds from the first frame to the end of the last one
    fps: float  # average frame rate
    num_frames: int  # exact when the container says, else round(duration * fps)
    rotation: int  # clockwise degrees applied for display: 0 / 90 / 180 / 270
    start_time: float  # seconds (stream time) of the first frame; subtracted from every timestamp
    keyframe_interval: float | None  # mean seconds between keyframes when the index gives it cheaply
    kind: str  # "video" | "gif" | "frames"
    # frames / (end - start) of the packet scan: torchcodec's exact-mode `average_fps`, which the processor's frame
    # sampler and prompt timestamps use; None when not scanned (frame folders): `fps` stands in
    average_fps: float | None = None
    # seconds (from the first frame) of every frame in presentation order, from the packet scan: frame `i` of the
    # processor's sampling is shown at `frame_times[i]`; None when not scanned (then frame `i` is at `i / fps`)
    frame_times: np.ndarray | None = field(default=None, repr=False, compare=False)
    # frames per second given by configuration instead of read from the file (frame folders; GIFs with a `gif_fps`):
    # frame `i` is at `i / assigned_fps` in prompts and clips and is sampled by the official code's rule
    # (`official_frame_indices`); decoding still finds it by `frame_times` / `fps`. None: the file's own clock
    assigned_fps: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------------------------
def resolve_media_path(root: PathLike, rel: str) -> Path:
    """Join ``rel`` to ``root``, resolve symlinks and check the result stays inside ``root`` and holds data.

    An absolute ``rel`` is accepted only when it resolves inside ``root``. A directory is returned as is (a frame
    folder); emptiness of a folder is checked when it is probed.
    Raises DataError ``path_escapes_root``, ``missing_file`` or ``empty_file`` (0-byte file).
    """
    root_resolved = Path(root).resolve()
    target = (root_resolved / rel).resolve()  # follows symlinks, so a link pointing outside is caught below
    if target != root_resolved and root_resolved not in target.parents:
        raise DataError(
            "path_escapes_root",
            f"{rel!r} resolves to {target}, outside the data root {root_resolved}",
            path=rel,
        )
    try:
        st = target.stat()
    except FileNotFoundError:
        raise DataError("missing_file", f"no such file under {root_resolved}", path=str(target)) from None
    if not target.is_dir() and st.st_size == 0:
        raise DataError("empty_file", "file is 0 bytes", path=str(target))
    return target


def _check_file(path: PathLike) -> str:
    """Existence / emptiness check shared by the readers; returns the path as str."""
    p = str(path)
    try:
        size = os.stat(p).st_size
    except FileNotFoundError:
        raise DataError("missing_file", "no such file", path=p) from None
    if not os.path.isdir(p) and size == 0:
        raise DataError("empty_file", "file is 0 bytes", path=p)
    return p


# ---------------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------------
# EXIF orientation -> the transpose that makes the image upright (same table as PIL.ImageOps.exif_transpose).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Pillow's errors for unreadable / broken image data (UnidentifiedImageError is an OSError).
_PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _open_image(path: str, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and apply the pixel guard before anything is decoded."""
    if os.path.isdir(path):
        raise DataError(
            "unsupported_image_folder",
            "an image path names a folder. The official code reads a folder under 'image' as one image per file "
            "(one <image> tag each); not supported here: list its files under 'image', or give the folder "
            "under 'video' to read it as one video (frame folder)",
            path=path,
        )
    try:
        with warnings.catch_warnings():
            # Our own max_pixels decides; Pillow's warning above 89 MP would only add noise in data workers.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as e:
        raise DataError("image_too_large", str(e), path=path) from None
    except _PIL_DECODE_ERRORS as e:
        raise DataError("corrupt_image", f"cannot read image header: {e}", path=path) from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise DataError("image_too_large", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}", path=path)
    if w < 1 or h < 1:
        img.close()
        raise DataError("corrupt_image", f"image has size {w}x{h}", path=path)
    return img


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1-8) from header data only.

    ``Image.getexif()`` on a PNG decodes the whole file to look for a trailing eXIf chunk, so for PNG only an eXIf
    chunk seen before the pixel data counts; probe and load use this same function, so their sizes always agree.
    """
    if img.format == "PNG":
        raw = img.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
    else:
        exif = img.getexif()
    value = exif.get(0x0112, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def probe_image(path: PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` as displayed (after EXIF orientation), from the header only.

    Raises DataError ``missing_file``, ``empty_file``, ``corrupt_image`` (unreadable header) or ``image_too_large``.
    """
    p = _check_file(path)
    with _open_image(p, max_pixels) as img:
        w, h = img.size
        try:
            orientation = _orientation(img)
        except _PIL_DECODE_ERRORS as e:
            raise DataError("corrupt_image", f"cannot read EXIF: {e}", path=p) from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


def _int_grey_to_8bit(a: np.ndarray) -> np.ndarray:
    """32-bit integer greys (Pillow mode ``I``) to uint8, by the range the values actually occupy.

    Mode ``I`` does not say how many bits the data uses (TIFF / PGM / some PNG readers give 8-, 12-, 16- or 32-bit
    data this mode), so the values decide: all in ``0..255`` -> taken as 8-bit, unchanged; all in ``0..65535`` ->
    16-bit, scaled like ``I;16`` (``round(v * 255 / 65535)``); anything else (negative values or above 65535) ->
    stretched linearly from its min..max to 0..255 (a constant image becomes black). Nothing is clipped.
    """
    a = a.astype(np.int64)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    if lo >= 0 and hi <= 255:
        return a.astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    span = hi - lo
    if span == 0:
        return np.zeros(a.shape, np.uint8)
    return (((a - lo) * 510 + span) // (2 * span)).astype(np.uint8)  # round((a - lo) * 255 / span)


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparency (RGBA, LA, P with a transparent index, ...) is composited on white, as transformers'
    ``convert_to_rgb`` does (documents and icons are drawn for a white page; dropping alpha would show whatever
    colour the transparent pixels happen to store). 16-bit integer greys (``I;16*``) are scaled to 8 bits
    (``round(v * 255 / 65535)``) rather than clipped, which is what Pillow's own ``convert("L")`` does. 32-bit
    integer greys (``I``) are mapped by the range their values occupy (8-bit, 16-bit, else min..max; see
    ``_int_grey_to_8bit``): Pillow's ``convert("RGB")`` would clip them at 255.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        a = np.asarray(img).astype(np.int64)
        a = np.clip(a, 0, 65535)
        return _grey_to_rgb(((a * 255 + 32767) // 65535).astype(np.uint8))
    if mode == "I":
        return _grey_to_rgb(_int_grey_to_8bit(np.asarray(img)))
    if mode == "F":
        a = np.asarray(img, np.float32)
        scale = 255.0 if float(np.nanmax(a, initial=0.0)) <= 1.0 else 1.0  # [0,1] floats vs 0-255 floats
        grey = np.clip(np.nan_to_num(a) * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:  # e.g. LAB / HSV, which Pillow cannot map to RGB
        raise DataError("corrupt_image", f"unsupported image mode {mode}: {e}", path=path) from None


def load_image(path: PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decoded, upright (EXIF-transposed), 8-bit RGB image.

    See ``_to_rgb`` for the mode conversions (alpha composited on white, 16-bit scaled). For animated images the
    first frame is returned. Raises DataError ``missing_file``, ``empty_file``, ``corrupt_image`` (including
    truncated data) or ``image_too_large`` (checked from the header, before decoding).
    """
    p = _check_file(path)
    with _open_image(p, max_pixels) as img:
        try:
            orientation = _orientation(img)
            # LOAD_TRUNCATED_IMAGES is a process-wide Pillow switch; refuse to run with it on rather than return
            # half-grey images silently.
            if ImageFile.LOAD_TRUNCATED_IMAGES:
                raise DataError(
                    "corrupt_image", "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; refusing", path=p
                )
            img.load()
            rgb = _to_rgb(img, p)
        except _PIL_DECODE_ERRORS as e:
            raise DataError("corrupt_image", f"cannot decode image: {e}", path=p) from None
    if orientation in _EXIF_TRANSPOSE:
        rgb = rgb.transpose(_EXIF_TRANSPOSE[orientation])
    return rgb


# ---------------------------------------------------------------------------------------------------------------
# video probing
# ---------------------------------------------------------------------------------------------------------------
def _natural_key(name: str) -> tuple[tuple[str | int, ...], str]:
    """Sort key that orders digit runs by value: ``frame_2`` before ``frame_10`` (plain ``sorted`` puts
    ``frame_10`` first); names equal by value (``f01`` / ``f1``) fall back to the name itself."""
    # text, digits, text, ...: the same kind at the same position in every key, so keys always compare
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def _frame_folder_images(path: str) -> list[str]:
    """The frames of a frame folder in natural order (:func:`_natural_key`): its image files (``IMAGE_SUFFIXES``,
    any case), hidden files and everything else left out. The official code sorts plain ``os.listdir`` names,
    which agrees for zero-padded names and misorders unpadded ones (``frame_1, frame_10, frame_2``)."""
    names = sorted(
        (n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")),
        key=_natural_key,
    )
    return [os.path.join(path, n) for n in names]


def _probe_frames_folder(path: str, folder_fps: float) -> VideoInfo:
    """A frame folder as a video whose clock is assigned: file ``i`` (natural order) is frame ``i``, shown at
    ``i / folder_fps`` seconds (``EncodeConfig.frame_folder_fps``; the official code's is 3)."""
    if not folder_fps > 0:
        raise ValueError(f"frame folder fps must be positive, got {folder_fps}")
    files = _frame_folder_images(path)
    if not files:
        raise DataError("no_frames", f"frame folder holds no images ({', '.join(IMAGE_SUFFIXES)})", path=path)
    w, h = probe_image(files[0])
    return VideoInfo(
        path=path,
        width=w,
        height=h,
        duration=len(files) / folder_fps,
        fps=float(folder_fps),
        num_frames=len(files),
        rotation=0,
        start_time=0.0,
        keyframe_interval=None,
        kind="frames",
        assigned_fps=float(folder_fps),
    )


def _uniform_indices(count: int, n: int) -> list[int]:
    """The official ``frame_sample(mode='uniform')``: all of ``count`` frames when ``n`` covers them, else
    ``np.linspace(0, count - 1, n, dtype=int)``."""
    if count <= n:
        return list(range(count))
    return np.linspace(0, count - 1, n, dtype=int).tolist()


def official_frame_indices(
    count: int, clock_fps: float, *, fps: float, max_frames: int, min_frames: int
) -> list[int]:
    """Frames (numbers among ``count``) the official code keeps of a frame folder or GIF whose clock is
    ``clock_fps`` (``videollama3/mm_utils.py``: ``load_video_from_ids`` + ``frame_sample``, commit 05cee23).

    Official rule: when the clip is shorter than ``max_frames`` seconds (``count / clock_fps < max_frames``), one
    frame per segment of ``floor(clock_fps / fps)`` frames, from the segment's middle:
    ``range(step // 2, count, step)`` -- 9 frames at 3 fps sampled at 1 fps keep frames 1, 4, 7 (0-based), shown
    at 0.33, 1.33, 2.33 s; else ``max_frames`` frames spread by ``linspace`` (:func:`_uniform_indices`).
    Where it differs: the step is at least 1 (the official code divides by zero when ``fps > clock_fps``), more
    than ``max_frames`` frames are thinned by ``linspace`` to ``max_frames`` (the official one can exceed it),
    and fewer than ``min(min_frames, count)`` frames are replaced by that many spread by ``linspace`` (the
    official code has no ``min_frames``).
    """
    if count < 1:
        return []
    if count / clock_fps < max_frames:
        step = max(1, min(math.floor(clock_fps / fps + 1e-9), count))
        indices = list(range(step // 2, count, step))
    else:
        indices = _uniform_indices(count, max_frames)
    if len(indices) > max_frames:
        indices = _uniform_indices(count, max_frames)
    if len(indices) < min(min_frames, count):
        indices = _uniform_indices(count, min(min_frames, count))
    return indices


def _sample_assigned_clock(
    info: VideoInfo, *, fps: float, max_frames: int, min_frames: int, start: float | None, end: float | None
) -> FrameSample:
    """:func:`sample_frames` of a frame folder or GIF with an assigned clock (``info.assigned_fps``).

    Frame ``i`` is at ``i / assigned_fps``; a clip ``[start, end]`` (on that clock) keeps the frames shown in it,
    numbered from 0, as for files. Indices by :func:`official_frame_indices`; ``times`` are where
    :func:`decode_video` finds them (``info.frame_times`` of a GIF: its real clock; ``i / info.fps`` for a
    folder); prompt timestamps ``index / assigned_fps`` from the clip's start.
    """
    rate = float(info.assigned_fps)
    n = info.num_frames
    clock = np.arange(n, dtype=np.float64) / rate
    first, count = 0, n
    if start is not None or end is not None:
        lo = 0.0 if start is None else max(0.0, float(start))
        hi = n / rate if end is None else min(float(end), n / rate)
        if hi <= lo:
            raise ValueError(f"empty time range [{start}, {end}] for {n} frames at {rate:g} fps: {info.path}")
        eps = min(1e-6, 0.25 / rate)
        first = max(0, int(np.searchsorted(clock, lo + eps, side="right")) - 1)
        count = max(1, int(np.searchsorted(clock, hi - eps, side="left")) - first)
    local = official_frame_indices(count, rate, fps=fps, max_frames=max_frames, min_frames=min_frames)
    decode_clock = info.frame_times if info.frame_times is not None else clock * (rate / info.fps)
    return FrameSample(
        indices=local,
        times=[float(decode_clock[first + j]) for j in local],
        timestamps=prompt_timestamps(local, rate),
    )


def _open_container(path: str) -> av.container.InputContainer:
    try:
        return av.open(path, "r")
    except av.FFmpegError as e:
        raise DataError("corrupt_video", f"cannot open container: {e}", path=path) from None


def _video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    streams = [s for s in container.streams.video if not (s.disposition & av.stream.Disposition.attached_pic)]
    if not streams:
        raise DataError("no_video_stream", "container has no video stream (audio only?)", path=path)
    return streams[0]


def _keyframe_interval(stream: av.video.stream.VideoStream, tb: float) -> float | None:
    """Mean seconds between keyframes, from the demuxer's index (mp4 sample table, mkv cues) when it has one."""
    entries = stream.index_entries
    n = len(entries)
    if n < 2:
        return None
    scanned = entries[: min(n, _INDEX_ENTRIES_SCANNED)]
    keys = [e.timestamp for e in scanned if e.is_keyframe]
    # An index of keyframes only (mkv cues) and an intra-only codec both give the spacing directly.
    if len(keys) >= 2:
        return (keys[-1] - keys[0]) * tb / (len(keys) - 1)
    if n <= _INDEX_ENTRIES_SCANNED:  # the whole index has one keyframe: seeking can never skip anything
        return math.inf
    return (scanned[-1].timestamp - scanned[0].timestamp) * tb  # at least this long


def _first_frame(container: av.container.InputContainer, stream, path: str):
    """Decode the first frame (for its rotation side data and true start pts); None if the stream has none."""
    try:
        for frame in container.decode(stream):
            return frame
    except av.FFmpegError as e:
        raise DataError("corrupt_video", f"cannot decode the first frame: {e}", path=path) from None
    return None


def _count_packets(container, stream, path: str) -> tuple[int, float | None]:
    """Frames and end time by demuxing (no decoding): used for GIFs, whose headers carry neither."""
    count, end = 0, None
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            count += 1
            if packet.pts is not None and stream.time_base is not None:
                t = float((packet.pts + (packet.duration or 0)) * stream.time_base)
                end = t if end is None else max(end, t)
    except av.FFmpegError as e:
        raise DataError("corrupt_video", f"cannot read packets: {e}", path=path) from None
    return count, end


def _scan_packets(container, stream, path: str) -> tuple[list[int], int, int]:
    """Presentation timestamps of every frame (sorted), and the first pts and ``max(pts + duration)``, from the
    packets alone (no decoding), as torchcodec's exact seek mode scans a file before it decodes any frame.

    Counted like torchcodec: every packet of the stream that the demuxer does not mark as discarded (edit lists),
    timed by its pts, or its dts when it has none. Raises DataError ``corrupt_video`` when the demuxer fails.
    """
    pts: list[int] = []
    end = None
    try:
        for packet in container.demux(stream):
            t = packet.pts if packet.pts is not None else packet.dts
            if t is None or packet.is_discard:  # PyAV's end-of-stream flush packet has neither
                continue
            pts.append(t)
            e = t + (packet.duration or 0)
            end = e if end is None else max(end, e)
    except av.FFmpegError as e:
        raise DataError("corrupt_video", f"cannot read packets: {e}", path=path) from None
    pts.sort()
    return pts, (pts[0] if pts else 0), (end if end is not None else 0)


def _pts_seconds(pts: int, time_base) -> float:
    """torchcodec's ``pts_to_seconds``: the multiplication before the division, in double."""
    return float(pts) * time_base.numerator / time_base.denominator


def probe_video(path: PathLike, *, folder_fps: float = 1.0, gif_fps: float | None = None) -> VideoInfo:
    """Describe a video file, GIF or frame folder without decoding it (one frame is decoded, for rotation).

    folder_fps: frame rate assigned to a directory of images (timestamps = index / folder_fps).
    gif_fps: frame rate assigned to a GIF instead of its own frame delays (``VideoInfo.assigned_fps``; the
        official code takes every GIF as 25 fps); None: the GIF's own timing, as a video file's.
    Raises DataError ``missing_file``, ``empty_file``, ``corrupt_video``, ``no_video_stream`` or ``no_frames``.
    """
    p = _check_file(path)
    if os.path.isdir(p):
        return _probe_frames_folder(p, folder_fps)
    with _open_container(p) as container:
        stream = _video_stream(container, p)
        tb = float(stream.time_base) if stream.time_base else None
        is_gif = container.format.name == "gif"
        keyframe_interval = _keyframe_interval(stream, tb) if tb else None
        rate = stream.average_rate or stream.guessed_rate
        frames = stream.frames or 0
        duration = None
        if stream.duration and tb:
            duration = stream.duration * tb
        elif container.duration:
            duration = container.duration / av.time_base
        first = _first_frame(container, stream, p)
        if first is None:
            raise DataError("no_frames", "video stream decodes to no frames", path=p)
        start = stream.start_time * tb if (stream.start_time is not None and tb) else 0.0
        if first.pts is not None and tb:
            start = first.pts * tb
        rotation = (-int(round(first.rotation))) % 360
        native_w, native_h = first.width, first.height
        if is_gif and (not frames or not duration):
            # The GIF demuxer reports no frame count; demuxing (not decoding) a GIF is cheap.
            container.seek(0)
            frames, end = _count_packets(container, stream, p)
            if end is not None:
                duration = end - start
        # Frame numbering and rate as the processor's decoder (torchcodec, exact mode) sees them: a packet scan.
        container.seek(0)
        scanned, first_pts, end_pts = _scan_packets(container, stream, p)
        header_rate = stream.base_rate or rate  # torchcodec falls back to r_frame_rate
        average_fps = float(header_rate) if header_rate else None
        frame_times = None
        if scanned and stream.time_base:
            span = _pts_seconds(end_pts, stream.time_base) - _pts_seconds(first_pts, stream.time_base)
            if span > 0:
                average_fps = len(scanned) / span
            frame_times = np.array([t * tb - start for t in scanned], dtype=np.float64)
            frames = len(scanned)
    if rotation not in (0, 90, 180, 270):
        rotation = (
            int(round(rotation / 90.0)) % 4 * 90
        )  # non-right angles are not supported: nearest quarter turn
    fps = float(rate) if rate else None
    if not fps and frames and duration:
        fps = frames / duration
    if not fps:
        fps = 25.0  # no rate anywhere in the container: FFmpeg's own fallback
    if not duration or duration <= 0:
        duration = frames / fps if frames else 1.0 / fps
    if not frames:
        frames = max(1, int(round(duration * fps)))
    w, h = (native_h, native_w) if rotation in (90, 270) else (native_w, native_h)
    return VideoInfo(
        path=p,
        width=w,
        height=h,
        duration=float(duration),
        fps=fps,
        num_frames=int(frames),
        rotation=rotation,
        start_time=float(start),
        keyframe_interval=keyframe_interval,
        kind="gif" if is_gif else "video",
        average_fps=average_fps or fps,
        frame_times=frame_times,
        assigned_fps=float(gif_fps) if is_gif and gif_fps is not None else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# frame sampling
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class FrameSample:
    """The frames :func:`sample_frames` keeps from one video (or clip of it), in sampling order."""

    indices: list[int]  # frame numbers, presentation order, counted from the clip's first frame
    times: list[float]  # seconds from the video's first frame at which each is shown: what decode_video takes
    timestamps: list[float]  # what the prompt writes: index / average_fps, float32 as in the processor


def processor_frame_indices(
    total_frames: int, video_fps: float, *, fps: float, min_frames: int, max_frames: int
) -> list[int]:
    """Frame numbers transformers' ``VideoLlama3VideoProcessor.sample_frames`` keeps (temporal patch 1), bit for bit.

    ``n = floor(min(max(total / video_fps * fps, min_frames), max_frames, total))``, then
    ``torch.arange(0, total, total / n).int()`` in float32, whose rounding is kept as is, with one exception: for
    some lengths (0.5% of them at fps 1, e.g. 230 frames at 30 fps: n = 7) the float32 range holds ``n + 1``
    values, the last equal to ``total``, and the processor fails at inference (torchcodec: "Invalid frame index").
    That out-of-range index is dropped here, leaving the ``n`` frames the rule means.
    """
    if total_frames < 1:
        return []
    cap = min(max_frames, total_frames)
    n = math.floor(min(max(total_frames / video_fps * fps, min_frames), cap, total_frames))
    return [i for i in torch.arange(0, total_frames, total_frames / n).int().tolist() if i < total_frames]


def prompt_timestamps(indices: list[int], video_fps: float) -> list[float]:
    """``VideoMetadata.timestamps`` as the processor computes them: an int32 index tensor divided by the fps (float32
    result), so ``f"{t:.1f}"`` rounds exactly as at inference (``0.25`` and ``0.2500001`` differ there)."""
    if not indices:
        return []
    return (torch.tensor(indices, dtype=torch.int32) / video_fps).tolist()


def sample_frames(
    info: VideoInfo,
    *,
    fps: float,
    max_frames: int,
    min_frames: int,
    start: float | None = None,
    end: float | None = None,
) -> FrameSample:
    """The frames of ``[start, end]`` a stage trains on: the processor's sampling rule, on the processor's numbering.

    Frames are numbered in presentation order as torchcodec's exact scan numbers them (``info.frame_times``; frame
    ``i`` at ``i / info.fps`` when the video was not scanned, e.g. a frame folder) and sampled with
    :func:`processor_frame_indices` at ``info.average_fps``; prompt timestamps are ``index / average_fps``
    (:func:`prompt_timestamps`). A clip ``[start, end]`` (which the processor cannot take) is sampled as if it were
    its own file: its frames are those shown from ``start`` until ``end``, numbered from 0.
    Media whose clock is assigned (``info.assigned_fps``: frame folders, GIFs with ``gif_fps``) are sampled as the
    official code samples them instead (:func:`official_frame_indices`, :func:`_sample_assigned_clock`).
    Raises ValueError on bad parameters or an empty range.
    """
    if fps <= 0 or min_frames < 1 or max_frames < min_frames:
        raise ValueError(
            f"need fps > 0 and 1 <= min_frames <= max_frames, got {fps}, {min_frames}, {max_frames}"
        )
    if info.assigned_fps is not None:  # frame folders, GIFs with gif_fps: the official code's rule and clock
        return _sample_assigned_clock(
            info, fps=fps, max_frames=max_frames, min_frames=min_frames, start=start, end=end
        )
    times = info.frame_times
    if times is None:
        times = np.arange(info.num_frames, dtype=np.float64) / info.fps
    video_fps = info.average_fps or info.fps
    first, count = 0, len(times)
    if start is not None or end is not None:
        lo = 0.0 if start is None else max(0.0, float(start))
        hi = info.duration if end is None else min(float(end), info.duration)
        if hi <= lo:
            raise ValueError(
                f"empty time range [{start}, {end}] for a {info.duration:.3f}s video ({info.path})"
            )
        eps = min(1e-6, 0.25 / video_fps)
        # the frame on screen at `lo` (the last one starting at or before it) up to the last one starting before `hi`
        first = max(0, int(np.searchsorted(times, lo + eps, side="right")) - 1)
        count = max(1, int(np.searchsorted(times, hi - eps, side="left")) - first)
    if count < 1:
        raise ValueError(f"no frame to sample in {info.path}")
    local = processor_frame_indices(count, video_fps, fps=fps, min_frames=min_frames, max_frames=max_frames)
    return FrameSample(
        indices=local,
        times=[float(times[first + j]) for j in local],
        timestamps=prompt_timestamps(local, video_fps),
    )


def sample_frame_times(
    info: VideoInfo,
    *,
    fps: float,
    max_frames: int,
    min_frames: int,
    start: float | None = None,
    end: float | None = None,
) -> list[float]:
    """Times (seconds from the video's first frame) of the frames :func:`sample_frames` keeps."""
    return sample_frames(
        info, fps=fps, max_frames=max_frames, min_frames=min_frames, start=start, end=end
    ).times


# ---------------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------------
def _rotate(a: np.ndarray, rotation: int) -> np.ndarray:
    """Turn an (H, W, 3) array clockwise by ``rotation`` degrees (np.rot90 turns counter-clockwise)."""
    return np.ascontiguousarray(np.rot90(a, k=-(rotation // 90))) if rotation else a


class _RGBConverter:
    """Decoded frame -> uint8 ``(H, W, 3)`` RGB, byte-identical to what torchcodec hands the processor.

    torchcodec converts on the CPU with an FFmpeg filter graph ending in ``format=rgb24`` (or, for widths that are
    multiples of 32, with swscale set up the same way); the same one-filter graph here reproduces its bytes, where
    PyAV's own ``to_ndarray(format="rgb24")`` differs on high-bit-depth input (up to 56 grey levels on 10-bit
    H.264). One graph per frame geometry and pixel format, rebuilt when they change mid-stream.
    """

    def __init__(self, time_base):
        self.time_base = time_base or "1/1000"  # the buffer source needs one; conversion does not use it
        self.key = None
        self.graph = None

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        key = (frame.width, frame.height, frame.format.name)
        if key != self.key:
            graph = av.filter.Graph()
            src = graph.add_buffer(
                width=frame.width, height=frame.height, format=frame.format, time_base=self.time_base
            )
            fmt = graph.add("format", "rgb24")
            sink = graph.add("buffersink")
            src.link_to(fmt)
            fmt.link_to(sink)
            graph.configure()
            self.key, self.graph = key, graph
        self.graph.push(frame)
        return self.graph.pull().to_ndarray()


def resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``(H, W, 3)`` -> uint8 ``size + (3,)``: torchvision bicubic with antialias on the uint8 tensor, the
    resize of transformers' image and video processors (so a frame resized here alone equals the processor's
    batched resize, byte for byte)."""
    if tuple(frame.shape[:2]) == tuple(size):
        return frame
    chw = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).contiguous()
    out = tvF.resize(chw[None], list(size), interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    return out[0].permute(1, 2, 0).numpy()


class _FrameSink:
    """Holds the output array and puts each decoded frame into its slot at the output size, one native frame at
    a time: exact RGB conversion (:class:`_RGBConverter`), upright, then the processor's resize
    (:func:`resize_frame`). With ``prescale_hw``, FFmpeg's bicubic scaler first shrinks the frame to that display
    size during conversion (faster, approximate: ``EncodeConfig.decode_scale``)."""

    def __init__(
        self,
        count: int,
        out_hw: tuple[int, int],
        rotation: int,
        time_base,
        prescale_hw: tuple[int, int] | None = None,
    ):
        self.rotation = rotation
        self.out_hw = out_hw
        self.convert = _RGBConverter(time_base)
        self.scale_hw = None
        if prescale_hw is not None:
            h, w = prescale_hw
            # Scale in stored orientation, then rotate the small result.
            self.scale_hw = (w, h) if rotation in (90, 270) else (h, w)
        h, w = out_hw
        self.frames = np.empty((count, h, w, 3), np.uint8)
        self.times = [0.0] * count
        self.filled = [False] * count

    def put(self, frame: av.VideoFrame, slots: list[int], t: float) -> None:
        if self.scale_hw is not None and (frame.height, frame.width) != self.scale_hw:
            sh, sw = self.scale_hw
            a = frame.to_ndarray(format="rgb24", width=sw, height=sh, interpolation="BICUBIC")
        else:
            a = self.convert(frame)
        a = resize_frame(_rotate(a, self.rotation), self.out_hw)
        for k, slot in enumerate(slots):
            self.frames[slot] = a if k == 0 else self.frames[slots[0]]
            self.times[slot] = t
            self.filled[slot] = True


class _StreamReader:
    """One request's decode state: the open stream, the sorted targets, the output sink and the loop budget."""

    def __init__(self, container, stream, info: VideoInfo, targets: list[float], sink: _FrameSink, path: str):
        self.container, self.stream, self.targets, self.sink, self.path = (
            container,
            stream,
            targets,
            sink,
            path,
        )
        self.tb = float(stream.time_base)
        self.start = info.start_time
        self.duration, self.fps = info.duration, info.fps
        # Containers round pts to their time base (matroska: 1 ms), so a frame at 2/12 s is stored at 0.167 s;
        # it must still count as "at or before 0.16667". A quarter period can never confuse two frames.
        self.eps = max(1e-6, min(self.tb, 0.25 / info.fps))
        # Loop bound: every frame the file can hold, plus a few keyframe intervals of re-decode per target.
        gop = (
            info.keyframe_interval
            if info.keyframe_interval and math.isfinite(info.keyframe_interval)
            else 10.0
        )
        self.budget = int(
            info.num_frames * 2 + len(targets) * (gop * info.fps + 2) * (_MAX_SEEK_RETRIES + 1) + 1000
        )

    def _time(self, frame: av.VideoFrame) -> float | None:
        pts = frame.pts if frame.pts is not None else frame.dts
        return None if pts is None else pts * self.tb - self.start

    def decode_forward(self, order: list[int], *, landing_limit: float | None = None) -> int | None:
        """Decode from the current position, filling every target in ``order`` (indices into ``targets``).

        A target ``t`` takes the last frame whose time is ``<= t``; a frame is converted only once the next frame
        shows it is the answer (or the stream ends). Returns how many targets were filled, or None, having filled
        none, when ``landing_limit`` is set and the first frame is later than it (a seek landed too late).
        """
        eps, targets = self.eps, self.targets
        pos = 0  # next unfilled position in `order`
        held = None  # (frame, time): the latest decoded frame, the candidate answer
        try:
            for frame in self.container.decode(self.stream):
                self.budget -= 1
                if self.budget < 0:
                    raise DataError(
                        "corrupt_video",
                        "decoder produced far more frames than the container holds",
                        path=self.path,
                    )
                t = self._time(frame)
                if t is None:
                    continue
                if held is None and landing_limit is not None and t > landing_limit + eps:
                    return None
                if held is not None and t < held[1] - eps:
                    continue  # broken timestamps going backwards: keep time monotonic
                # Every pending target before this frame belongs to the held frame (before any frame: this one).
                slots = []
                while pos < len(order) and targets[order[pos]] < t - eps:
                    slots.append(order[pos])
                    pos += 1
                if slots:
                    f, ft = held if held is not None else (frame, t)
                    self.sink.put(f, slots, ft)
                held = (frame, t)
                if pos >= len(order):
                    return pos
        except av.FFmpegError as e:
            raise DataError("corrupt_video", f"decode failed: {e}", path=self.path) from None
        if held is not None and pos < len(order):
            # Targets past the last frame take it, unless the stream stops well short of the duration the
            # container states: that is a truncated file, and repeating its last frame would hide it.
            slack = max(1.0, 4.0 / self.fps)
            if self.duration - held[1] > slack and targets[order[-1]] > held[1] + slack:
                raise DataError(
                    "corrupt_video",
                    f"frames stop at {held[1]:.2f}s but the container says {self.duration:.2f}s (truncated file?)",
                    path=self.path,
                )
            self.sink.put(held[0], list(order[pos:]), held[1])
            pos = len(order)
        return pos

    def seek_and_decode(self, order: list[int]) -> None:
        """Seek to the keyframe at or before the first target of ``order``, then decode the run forward.

        A demuxer may land after the wanted time (edit lists, B-frame pts shifts): then the first frame is later
        than the target, and we retry further back, finally from the very start, so the answer is always exact.
        """
        t = self.targets[order[0]]
        margin = 0.0
        for attempt in range(_MAX_SEEK_RETRIES + 1):
            final = attempt == _MAX_SEEK_RETRIES
            seek_t = 0.0 if final else max(0.0, t - margin)
            offset = int(math.floor((seek_t + self.start) / self.tb))
            try:
                self.container.seek(offset, stream=self.stream, backward=True, any_frame=False)
            except av.FFmpegError as e:
                raise DataError(
                    "corrupt_video", f"seek to {seek_t:.3f}s failed: {e}", path=self.path
                ) from None
            self.stream.codec_context.flush_buffers()  # PyAV's seek may leave old frames queued in the decoder
            if self.decode_forward(order, landing_limit=None if final else t) is not None:
                return
            margin = max(1.0, 2 * margin)


def _decode_folder(
    info: VideoInfo, times: list[float], size: tuple[int, int] | None
) -> tuple[np.ndarray, list[float]]:
    files = _frame_folder_images(info.path)
    if not files:
        raise DataError("no_frames", "frame folder holds no images", path=info.path)
    h, w = size if size is not None else (info.height, info.width)
    out = np.empty((len(times), h, w, 3), np.uint8)
    stamps = []
    cache: dict[int, int] = {}  # file index -> output row already holding it
    for k, t in enumerate(times):
        idx = min(len(files) - 1, max(0, int(math.floor(t * info.fps + 1e-6))))
        if idx in cache:
            out[k] = out[cache[idx]]
        else:
            img = load_image(files[idx])
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BICUBIC)
            out[k] = np.asarray(img)
            cache[idx] = k
        stamps.append(idx / info.fps)
    return out, stamps


def decode_video(
    path: PathLike,
    times: list[float],
    *,
    size: tuple[int, int] | None = None,
    info: VideoInfo | None = None,
    folder_fps: float = 1.0,
    prescale: tuple[int, int] | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Frames shown at ``times`` (seconds from the first frame) as ``(T, H, W, 3)`` uint8 RGB, and their timestamps.

    Each returned frame is the last one whose timestamp is ``<= t`` (the first frame if none); its timestamp comes
    from the stream's pts, so variable frame rate is exact. Frames come out upright (rotation applied), converted
    to RGB byte-identically to torchcodec (:class:`_RGBConverter`), and resized to ``size=(height, width)`` (default
    the display size) with the processor's resize (:func:`resize_frame`) as soon as each is decoded: the result
    equals torchcodec's frames resized by transformers' processor. ``prescale=(height, width)``: let FFmpeg's
    bicubic scaler shrink each frame to that display size during conversion first (faster, not exact).
    Works for video files, GIFs and frame folders (``folder_fps`` or ``info.fps`` for folders).

    Seeks to the keyframe before a target when the gap from the previous target exceeds the keyframe interval,
    else decodes forward; only kept frames are converted, and at most one native-size frame is held at a time.
    Raises DataError ``missing_file``, ``empty_file``, ``corrupt_video``, ``no_video_stream`` or ``no_frames``.
    """
    p = _check_file(path)
    if info is None:
        info = probe_video(p, folder_fps=folder_fps)
    if not times:
        h, w = size if size is not None else (info.height, info.width)
        return np.empty((0, h, w, 3), np.uint8), []
    if info.kind == "frames":
        return _decode_folder(info, list(times), size)
    targets = [float(t) for t in times]
    order = sorted(range(len(targets)), key=targets.__getitem__)
    out_hw = size if size is not None else (info.height, info.width)
    if prescale is not None and tuple(prescale) == (info.height, info.width):
        prescale = None
    seek_gap = info.keyframe_interval if info.keyframe_interval is not None else _DEFAULT_SEEK_GAP
    if info.kind == "gif":
        seek_gap = math.inf  # FFmpeg's GIF demuxer can only seek back to the start: always decode forward
    with _open_container(p) as container:
        stream = _video_stream(container, p)
        stream.thread_type = "AUTO"  # frame + slice threads; the decoder is flushed after every seek
        sink = _FrameSink(len(targets), out_hw, info.rotation, stream.time_base, prescale)
        reader = _StreamReader(container, stream, info, targets, sink, p)
        for first, last in _group_targets([targets[i] for i in order], seek_gap):
            run = order[first:last]
            # The first run starts from the file's beginning; seeking only pays when it is more than a GOP away.
            if first > 0 or targets[run[0]] > seek_gap:
                _seek_run(reader, run)
            else:
                reader.decode_forward(run)
    if not any(sink.filled):
        raise DataError("no_frames", "no frame could be decoded", path=p)
    if not all(sink.filled):  # cannot happen: decode_forward fills the tail from the last frame
        raise DataError("corrupt_video", "some requested frames were not decoded", path=p)
    return sink.frames, sink.times


def _group_targets(sorted_targets: list[float], seek_gap: float) -> list[tuple[int, int]]:
    """Split sorted targets into runs decoded forward; a new run (a seek) starts where the gap exceeds a GOP."""
    groups, begin = [], 0
    for i in range(1, len(sorted_targets)):
        if sorted_targets[i] - sorted_targets[i - 1] > seek_gap:
            groups.append((begin, i))
            begin = i
    groups.append((begin, len(sorted_targets)))
    return groups


def _seek_run(reader: _StreamReader, run: list[int]) -> None:
    """Seek path of ``decode_video`` (a module-level hook, so tests can tell which path ran)."""
    reader.seek_and_decode(run)


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "VideoInfo",
    "decode_video",
    "probe_image",
    "FrameSample",
    "probe_video",
    "official_frame_indices",
    "processor_frame_indices",
    "prompt_timestamps",
    "resize_frame",
    "resolve_media_path",
    "sample_frame_times",
    "sample_frames",
    "load_image",
]
