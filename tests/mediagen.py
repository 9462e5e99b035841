"""Tiny synthetic media for tests: images, videos, GIFs, frame folders and broken files.

Import from any test module as ``from mediagen import make_video`` (pytest's default ``prepend`` import mode puts
``tests/`` on ``sys.path``; no conftest needed). Every generator writes one file (or folder) and returns its path.

Frame content is *index-coded* so a test can tell which source frame a decoder returned: the top half of frame
``i`` is the grey level ``level_hi(i)`` and the bottom half ``level_lo(i)`` (16 levels each, 16 apart, so 256 distinct
indices survive lossy compression); :func:`frame_index` reads the index back from an RGB array. A small white
marker sits in the top-left corner (to check orientation) and a red square moves left to right (real motion).

Encoders used here (PyAV 18 / FFmpeg 8 in this environment): ``libx264`` (8- and 10-bit), ``mpeg4``, ``libvpx``
(VP8, webm), ``aac`` for audio; :func:`available_encoder` picks the first one present so the suite degrades when a
build lacks one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

PathLike = str | os.PathLike

# Relative display durations of consecutive frames in a VFR video (mean 1.0, so the average rate is `fps`).
VFR_PATTERN = (0.5, 1.5, 1.0, 0.25, 1.75)
VFR_TIME_BASE = Fraction(1, 1000)


# ---------------------------------------------------------------------------------------------------------------
# index-coded frames
# ---------------------------------------------------------------------------------------------------------------
def level_hi(i: int) -> int:
    """Grey level of the top half of frame ``i`` (encodes ``i // 16``)."""
    return (i // 16) % 16 * 16 + 8


def level_lo(i: int) -> int:
    """Grey level of the bottom half of frame ``i`` (encodes ``i % 16``)."""
    return i % 16 * 16 + 8


def index_frame(i: int, width: int, height: int, *, marker: bool = True, square: bool = True) -> np.ndarray:
    """RGB uint8 array ``(height, width, 3)`` that encodes ``i`` (0..255) as two grey bands.

    ``marker`` draws a white block in the top-left corner (1/8 of each side); ``square`` draws a red block that
    moves one step right per frame through the middle rows. Both cover well under half of a band, so the band
    medians read by :func:`frame_index` are unaffected.
    """
    a = np.empty((height, width, 3), np.uint8)
    a[: height // 2] = level_hi(i)
    a[height // 2 :] = level_lo(i)
    mh, mw = max(1, height // 8), max(1, width // 8)
    if marker:
        a[:mh, :mw] = 255
    if square:
        x = (i * mw) % max(1, width - mw)
        y0 = height // 2 - mh // 2
        a[y0 : y0 + mh, x : x + mw] = (255, 0, 0)
    return a


def frame_index(frame: np.ndarray) -> int:
    """Read back the index drawn by :func:`index_frame` from an upright RGB frame ``(H, W, 3)``."""
    h = frame.shape[0]
    g = frame.astype(np.float32).mean(axis=2)
    hi = float(np.median(g[: h // 2]))
    lo = float(np.median(g[h // 2 :]))
    return int(round((hi - 8) / 16)) * 16 + int(round((lo - 8) / 16))


def expected_frame_times(seconds: float, fps: float, *, vfr: bool = False) -> list[float]:
    """Presentation times (seconds, first frame at 0) of the frames :func:`make_video` writes for these arguments."""
    n = max(1, round(seconds * fps))
    if not vfr:
        return [i / fps for i in range(n)]
    return [pts * float(VFR_TIME_BASE) for pts in _vfr_pts(n, fps)]


def _vfr_pts(n: int, fps: float) -> list[int]:
    base = 1.0 / fps / float(VFR_TIME_BASE)  # one nominal frame period in time-base units
    pts, t = [], 0
    for i in range(n):
        pts.append(t)
        t += max(1, round(base * VFR_PATTERN[i % len(VFR_PATTERN)]))
    return pts


# ---------------------------------------------------------------------------------------------------------------
# encoders
# ---------------------------------------------------------------------------------------------------------------
def available_encoder(*names: str) -> str | None:
    """First of ``names`` that this FFmpeg build can encode with, else None."""
    for name in names:
        try:
            av.codec.Codec(name, "w")
        except (av.codec.codec.UnknownCodecError, ValueError):
            continue
        return name
    return None


def encoder_supports(codec: str, pix_fmt: str) -> bool:
    """Whether encoder ``codec`` exists and accepts pixel format ``pix_fmt`` (e.g. ``yuv420p10le``)."""
    if available_encoder(codec) is None:
        return False
    formats = av.codec.Codec(codec, "w").video_formats or []
    return any(f.name == pix_fmt for f in formats)


def make_video(
    path: PathLike,
    width: int = 64,
    height: int = 48,
    seconds: float = 2.0,
    fps: float = 10.0,
    *,
    keyframe_interval_s: float = 2.0,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    frames: Callable[[int], np.ndarray] | None = None,
    vfr: bool = False,
    rotation: int = 0,
    audio: bool = False,
    bframes: int = 0,
    crf: int | None = None,
) -> Path:
    """Encode ``round(seconds * fps)`` frames (at least one) into ``path`` (container from the suffix).

    frames: ``callable(i) -> (height, width, 3) uint8 RGB``; default :func:`index_frame`.
    keyframe_interval_s: fixed GOP (scene-cut keyframes disabled for x264), so seeking is exercised.
    vfr: irregular presentation times following :data:`VFR_PATTERN` (see :func:`expected_frame_times`).
    rotation: clockwise degrees a player turns the stored frames (0/90/180/270), written as a display matrix
        (the modern form of the old ``rotate`` tag: a phone's portrait video stores landscape frames + 90).
    audio: also write a 1 kHz AAC track of the same length.
    bframes: B-frames between references (libx264 / mpeg4), so decode order differs from display order.
    crf: libx264 quality (0 lossless ... 51); None = x264's default 23. A low value (with mbtree off, one thread)
        keeps a still region bit-identical from frame to frame, as token pruning needs to drop it.
    Width/height must be even for 4:2:0 formats.
    """
    path = Path(path)
    n = max(1, round(seconds * fps))
    frames = frames or (lambda i: index_frame(i, width, height))
    rate = Fraction(fps).limit_denominator(1000)
    gop = max(1, round(keyframe_interval_s * fps))
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.gop_size = gop
        if codec == "libx264":
            stream.options = {
                "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}",
                "preset": "ultrafast",
            }
            if crf is not None:
                stream.options = {
                    "x264-params": stream.options["x264-params"] + ":mbtree=0:threads=1",
                    "preset": "ultrafast",
                    "crf": str(crf),
                }
        elif bframes:
            stream.codec_context.max_b_frames = bframes
        if vfr:
            stream.codec_context.time_base = VFR_TIME_BASE
            stream.time_base = VFR_TIME_BASE
        if rotation % 360:
            # PyAV takes counter-clockwise degrees (av_display_rotation_set); players rotate by the opposite.
            stream.set_display_rotation(-(rotation % 360))
        astream = container.add_stream("aac", rate=16000) if audio else None
        pts = _vfr_pts(n, fps) if vfr else list(range(n))
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames(i)), format="rgb24")
            frame.pts = pts[i]
            if vfr:
                frame.time_base = VFR_TIME_BASE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if astream is not None:
            _write_tone(container, astream, n / fps)
    return path


def _write_tone(container: av.container.OutputContainer, stream, seconds: float, rate: int = 16000) -> None:
    total = max(1024, int(seconds * rate))
    t = np.arange(total, dtype=np.float32) / rate
    samples = (0.2 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    for start in range(0, total, 1024):
        chunk = samples[start : start + 1024][None, :]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def make_audio_only(path: PathLike, seconds: float = 1.0) -> Path:
    """An mp4/m4a/mkv with one AAC audio stream and no video stream."""
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        _write_tone(container, stream, seconds)
    return path


def make_corrupt(path: PathLike, *, source: PathLike | None = None, keep: float = 0.5, seed: int = 0) -> Path:
    """A broken file: the first ``keep`` fraction of ``source`` (truncated), or 4 KiB of random bytes if no source.

    Truncating an mp4 written by :func:`make_video` cuts off its ``moov`` index (written last), so it cannot be
    opened; truncating a JPEG/PNG cuts its entropy-coded data, so the header parses but decoding fails.
    """
    path = Path(path)
    if source is not None:
        data = Path(source).read_bytes()
        path.write_bytes(data[: max(1, int(len(data) * keep))])
    else:
        path.write_bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def make_frame_folder(
    directory: PathLike, n: int = 5, size: tuple[int, int] = (64, 48), *, suffix: str = ".png"
) -> Path:
    """Folder of ``n`` index-coded images ``frame_00000<suffix>``... of ``size=(width, height)``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(n):
        Image.fromarray(index_frame(i, w, h)).save(directory / f"frame_{i:05d}{suffix}")
    return directory


def make_gif(
    path: PathLike, n: int = 5, size: tuple[int, int] = (64, 48), duration_ms: int | Sequence[int] = 100
) -> Path:
    """Animated GIF of ``n`` index-coded frames (``size=(width, height)``), ``duration_ms`` per frame (or a list).

    Frames are drawn without the red square (GIF's palette would dither it) and stored with a grey palette, so
    every level decodes exactly.
    """
    path = Path(path)
    w, h = size
    imgs = [Image.fromarray(index_frame(i, w, h, square=False)).convert("L").convert("P") for i in range(n)]
    durations = list(duration_ms) if isinstance(duration_ms, Sequence) else duration_ms
    imgs[0].save(
        path, save_all=True, append_images=imgs[1:], duration=durations, loop=0, optimize=False, disposal=1
    )
    return path


# ---------------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------------
def _pattern_rgb(size: tuple[int, int], pattern: str | None, color: tuple[int, ...]) -> np.ndarray:
    w, h = size
    if pattern is None:
        return np.broadcast_to(np.array(color[:3], np.uint8), (h, w, 3)).copy()
    if pattern == "gradient":
        ramp = np.linspace(0, 255, w, dtype=np.float32).round().astype(np.uint8)
        return np.repeat(np.broadcast_to(ramp[None, :, None], (h, w, 1)), 3, axis=2).copy()
    if pattern == "corner":
        a = np.zeros((h, w, 3), np.uint8)
        a[: max(1, h // 4), : max(1, w // 4)] = 255
        return a
    if pattern == "noise":
        return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    raise ValueError(f"unknown pattern {pattern!r} (None, 'gradient', 'corner', 'noise')")


def make_image(
    path: PathLike,
    size: tuple[int, int] = (32, 24),
    mode: str = "RGB",
    color: int | tuple[int, ...] | None = None,
    pattern: str | None = None,
    *,
    exif_orientation: int | None = None,
) -> Path:
    """Write an image of ``size=(width, height)`` in Pillow ``mode``; format from the suffix (png/jpg/webp/gif).

    mode: RGB, RGBA, LA, L, P (palette), CMYK (jpeg only), I;16 (16-bit png).
    color: a solid colour in the mode's own terms (a tuple of its bands, or one int for L / I;16); default mid grey
        (alpha modes: half transparent). Ignored when ``pattern`` is set.
    pattern: None (solid), "gradient" (black to white left to right), "corner" (white top-left quarter block on
        black, to check orientation) or "noise".
    exif_orientation: EXIF Orientation tag (1-8; 6 means "rotate 90 clockwise to display").
    """
    path = Path(path)
    if pattern is not None:
        rgb = Image.fromarray(_pattern_rgb(size, pattern, (0, 0, 0)))
        if mode == "I;16":
            grey = np.asarray(rgb.convert("L"), np.uint16) * 257  # full 16-bit range
            img = Image.fromarray(grey)
        elif mode == "P":
            img = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
        else:
            img = rgb.convert(mode)
    else:
        if color is None:
            color = {
                "RGB": (128, 128, 128),
                "RGBA": (200, 0, 0, 128),
                "LA": (100, 128),
                "L": 128,
                "CMYK": (0, 128, 255, 0),
                "I;16": 32768,
                "P": (128, 128, 128),
            }.get(mode, 128)
        if mode == "P":
            img = Image.new("RGB", size, color).convert("P", palette=Image.Palette.ADAPTIVE)
        elif mode == "I;16":
            img = Image.fromarray(np.full((size[1], size[0]), int(color), np.uint16))
        else:
            img = Image.new(mode, size, color)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    img.save(path, **kwargs)
    return path
