"""Reading images, videos, GIFs and frame folders into RGB arrays, with every failure a named ``DataError``.

Images go through Pillow: header-only probing (size after EXIF orientation), a decompression-bomb guard checked
before any pixel is decoded, and one well-defined conversion of every mode to 8-bit RGB.

Videos go through PyAV (FFmpeg). The official VideoLLaMA3 code decodes a whole video at native resolution in an
ffmpeg subprocess and then keeps one frame per second (REFERENCE §4); here only the frames that are kept are
converted, FFmpeg's scaler shrinks them during conversion, and long gaps between kept frames are crossed by seeking
to the preceding keyframe instead of decoding everything in between.

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
import warnings
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
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


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparency (RGBA, LA, P with a transparent index, ...) is composited on white, as transformers'
    ``convert_to_rgb`` does (documents and icons are drawn for a white page; dropping alpha would show whatever
    colour the transparent pixels happen to store). 16/32-bit integer greys are scaled to 8 bits
    (``round(v * 255 / 65535)``) rather than clipped, which is what Pillow's own ``convert("L")`` does.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.int64)
        a = np.clip(a, 0, 65535)
        grey = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
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
def _frame_folder_images(path: str) -> list[str]:
    names = sorted(
        n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")
    )
    return [os.path.join(path, n) for n in names]


def _probe_frames_folder(path: str, folder_fps: float) -> VideoInfo:
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


def probe_video(path: PathLike, *, folder_fps: float = 1.0) -> VideoInfo:
    """Describe a video file, GIF or frame folder without decoding it (one frame is decoded, for rotation).

    folder_fps: frame rate assigned to a directory of images (timestamps = index / folder_fps).
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
    )


# ---------------------------------------------------------------------------------------------------------------
# frame sampling
# ---------------------------------------------------------------------------------------------------------------
def sample_frame_times(
    info: VideoInfo,
    *,
    fps: float,
    max_frames: int,
    min_frames: int,
    start: float | None = None,
    end: float | None = None,
) -> list[float]:
    """Times (seconds from the video's first frame) of the frames to keep from ``[start, end]``.

    ``n = clamp(floor(length * fps), min_frames, max_frames)``, never more than the frames the range holds.
    When ``n`` is the uncapped count, times are ``start + i / fps`` (so a 1 fps prompt reads 0.0s, 1.0s, ...);
    when capped or raised, ``n`` times are spread evenly from ``start`` to the last frame of the range.
    """
    if fps <= 0 or min_frames < 1 or max_frames < min_frames:
        raise ValueError(
            f"need fps > 0 and 1 <= min_frames <= max_frames, got {fps}, {min_frames}, {max_frames}"
        )
    lo = 0.0 if start is None else max(0.0, float(start))
    hi = info.duration if end is None else min(float(end), info.duration)
    if hi <= lo:
        raise ValueError(f"empty time range [{start}, {end}] for a {info.duration:.3f}s video ({info.path})")
    length = hi - lo
    frame_period = 1.0 / info.fps
    if start is None and end is None:
        available = info.num_frames
    else:
        available = max(1, int(math.floor(length * info.fps + 1e-6)))
    at_rate = int(math.floor(length * fps + 1e-6))
    n = min(max(at_rate, min_frames), max_frames, available)
    if n == at_rate:
        return [lo + i / fps for i in range(n)]
    if n == 1:
        return [lo]
    last = max(lo, hi - frame_period)
    return [float(t) for t in np.linspace(lo, last, n)]


# ---------------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------------
def _rotate(a: np.ndarray, rotation: int) -> np.ndarray:
    """Turn an (H, W, 3) array clockwise by ``rotation`` degrees (np.rot90 turns counter-clockwise)."""
    return np.ascontiguousarray(np.rot90(a, k=-(rotation // 90))) if rotation else a


class _FrameSink:
    """Holds the output array and converts a decoded frame straight into its slot (one native frame at a time)."""

    def __init__(self, count: int, out_hw: tuple[int, int], rotation: int):
        self.rotation = rotation
        h, w = out_hw
        # Scale in stored orientation, then rotate the small result.
        self.scale_hw = (w, h) if rotation in (90, 270) else (h, w)
        self.frames = np.empty((count, h, w, 3), np.uint8)
        self.times = [0.0] * count
        self.filled = [False] * count

    def put(self, frame: av.VideoFrame, slots: list[int], t: float) -> None:
        sh, sw = self.scale_hw
        kwargs = {"format": "rgb24"}
        if (frame.height, frame.width) != (sh, sw):
            kwargs.update(width=sw, height=sh, interpolation="BICUBIC")
        a = _rotate(frame.to_ndarray(**kwargs), self.rotation)
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
) -> tuple[np.ndarray, list[float]]:
    """Frames shown at ``times`` (seconds from the first frame) as ``(T, H, W, 3)`` uint8 RGB, and their timestamps.

    Each returned frame is the last one whose timestamp is ``<= t`` (the first frame if none); its timestamp comes
    from the stream's pts, so variable frame rate is exact. ``size=(height, width)`` is the display size to scale
    to (FFmpeg's bicubic scaler, at conversion); default the display size. Frames come out upright (rotation
    applied). Works for video files, GIFs and frame folders (``folder_fps`` or ``info.fps`` for folders).

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
    sink = _FrameSink(len(targets), out_hw, info.rotation)
    seek_gap = info.keyframe_interval if info.keyframe_interval is not None else _DEFAULT_SEEK_GAP
    if info.kind == "gif":
        seek_gap = math.inf  # FFmpeg's GIF demuxer can only seek back to the start: always decode forward
    with _open_container(p) as container:
        stream = _video_stream(container, p)
        stream.thread_type = "AUTO"  # frame + slice threads; the decoder is flushed after every seek
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
    "probe_video",
    "resolve_media_path",
    "sample_frame_times",
    "load_image",
]
