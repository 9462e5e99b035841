"""What a video is and which of its frames a stage trains on: probing (PyAV packet scan, as torchcodec numbers
frames), frame folders and GIFs, and the processor's sampling rule. Decoding is :mod:`.decode`.

Time convention: every time here is seconds from the video's first frame (``VideoInfo.start_time`` is subtracted),
so the first frame of any video is at 0.0; a sub-clip ``[start, end]`` keeps that origin. Rotation:
``VideoInfo.rotation`` is the clockwise angle a player turns the stored frames by (FFmpeg's ``-autorotate``
convention); ``width``/``height`` are the display size.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import av
import numpy as np
import torch

from videollama3_train.data.errors import DataError
from videollama3_train.data.image import IMAGE_SUFFIXES, PathLike, probe_image, stat_file

# Keyframe statistics are read from at most this many index entries: enough to know the GOP, cheap on hour-long files.
_INDEX_ENTRIES_SCANNED = 4096


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
# video probing
# ---------------------------------------------------------------------------------------------------------------
def _natural_key(name: str) -> tuple[tuple[str | int, ...], str]:
    """Sort key that orders digit runs by value: ``frame_2`` before ``frame_10`` (plain ``sorted`` puts
    ``frame_10`` first); names equal by value (``f01`` / ``f1``) fall back to the name itself."""
    # text, digits, text, ...: the same kind at the same position in every key, so keys always compare
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def frame_folder_images(path: str) -> list[str]:
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
    files = frame_folder_images(path)
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


def open_container(path: str) -> av.container.InputContainer:
    """Open a media file for reading (the decoder's and the probe's one way); DataError ``corrupt_video``."""
    try:
        return av.open(path, "r")
    except av.FFmpegError as e:
        raise DataError("corrupt_video", f"cannot open container: {e}", path=path) from None


def video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    """The first real video stream (cover art left out); DataError ``no_video_stream`` when there is none."""
    streams = [s for s in container.streams.video if not (s.disposition & av.stream.Disposition.attached_pic)]
    if not streams:
        raise DataError("no_video_stream", "container has no video stream (audio only?)", path=path)
    return streams[0]


# AVIndexEntry flags (libavformat/avformat.h)
_INDEX_KEYFRAME, _INDEX_DISCARD = 0x1, 0x2


def index_table(stream: av.video.stream.VideoStream) -> np.ndarray:
    """The demuxer's index (mp4 sample table, mkv cues) as int64 ``(n, 2)``: timestamp and flags per entry, read
    once (PyAV makes an object per entry: two passes over a 750-entry index cost 0.26 ms, this one 0.2)."""
    rows = [(e.timestamp, e.flags) for e in stream.index_entries]
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def _keyframe_interval(table: np.ndarray, tb: float) -> float | None:
    """Mean seconds between keyframes, from the demuxer's index (:func:`index_table`) when it has one."""
    n = len(table)
    if n < 2:
        return None
    scanned = table[: min(n, _INDEX_ENTRIES_SCANNED)]
    keys = scanned[(scanned[:, 1] & _INDEX_KEYFRAME) != 0, 0]
    # An index of keyframes only (mkv cues) and an intra-only codec both give the spacing directly.
    if len(keys) >= 2:
        return int(keys[-1] - keys[0]) * tb / (len(keys) - 1)
    if n <= _INDEX_ENTRIES_SCANNED:  # the whole index has one keyframe: seeking can never skip anything
        return math.inf
    return int(scanned[-1, 0] - scanned[0, 0]) * tb  # at least this long


def _first_frame(container: av.container.InputContainer, stream, path: str):
    """Decode the first frame (for its rotation side data and true start pts); None if the stream has none.

    One decoder thread: FFmpeg's default frame threads cost more to start than one frame costs to decode (2.3 ms
    against 6.5 ms for a 320x240 H.264 clip, open included), and the frame is the same."""
    stream.codec_context.thread_count = 1
    try:
        for frame in container.decode(stream):
            return frame
    except av.FFmpegError as e:
        raise DataError("corrupt_video", f"cannot decode the first frame: {e}", path=path) from None
    return None


# Codecs whose decoder may rotate a frame from the bitstream itself, and how to look (H.264: a display orientation
# SEI message in the first sample); MPEG-4 part 2 carries no orientation. Other codecs: the first frame is decoded.
_HEADER_CODECS = ("h264", "mpeg4")


def header_first_frame(container, stream, path: str) -> tuple[int, int, int, float] | None:
    """``(pts, width, height, rotation)`` of the first frame :func:`_first_frame` would decode, read from an MP4 /
    MOV file's boxes instead (0.05 ms against ~1.2 ms for a 320x240 H.264 clip); None wherever they may not say
    what the decoded frame would.

    Taken only when the decoder's first frame is the first sample (a keyframe, no B-frame reordering, not
    discarded, at the stream's start) and the codec is one whose frames are rotated by the container only (H.264
    with no display orientation SEI in that sample, MPEG-4 part 2); the rotation is that of the display matrix
    FFmpeg's demuxer gives the track (:func:`.mp4.display_matrix`), the size the decoder's.
    ``tests/test_costing.py`` checks every generated test video agrees with the decoded frame, or falls back.
    """
    from . import mp4

    ctx = stream.codec_context
    if "mp4" not in container.format.name.split(",") or ctx.name not in _HEADER_CODECS or ctx.has_b_frames:
        return None
    entries = stream.index_entries
    if len(entries) == 0 or not ctx.width or not ctx.height:
        return None
    first = entries[0]
    if not first.is_keyframe or first.is_discard or first.timestamp != (stream.start_time or 0):
        return None
    try:
        with open(path, "rb", buffering=0) as f:
            matrix = mp4.display_matrix(f, os.fstat(f.fileno()).st_size, stream.id)
            if matrix is None:
                return None
            if ctx.name == "h264":
                extra = ctx.extradata
                if not extra or extra[0] != 1 or len(extra) < 5:  # not avcC: Annex B NAL units in MP4
                    return None
                f.seek(first.pos)
                if mp4.h264_orientation_sei(f.read(first.size), (extra[4] & 3) + 1) is not False:
                    return None
    except OSError:
        return None
    rotation = mp4.rotation_of(matrix)
    if math.isnan(rotation):
        return None
    return (
        first.timestamp,
        ctx.width,
        ctx.height,
        float(math.trunc(rotation)),
    )  # PyAV's frame.rotation: an int


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


def index_times(container, stream, first_pts: int | None, table: np.ndarray | None = None):
    """What :func:`_scan_packets` returns, read from an MP4 / MOV sample table instead of demuxing every packet
    (3 ms of a 10 ms probe for a 30-s 320x240 clip); None where the table may not say what the scan would.
    ``first_pts``: the first decoded frame's pts (or :func:`header_first_frame`'s); ``table``: the stream's
    :func:`index_table` when already read. Returns ``(pts, first pts, end pts)``, the pts an int64 array.

    The table is taken only when it holds one entry per frame the header counts, none discarded by an edit list,
    in strictly increasing time, the first at the first decoded frame's pts and at the stream's start, with no
    B-frame reordering (so each entry's decode time is its presentation time), and when the stream's duration
    covers them (the end of the last frame is then ``first + duration``, as the muxer sums the sample
    durations). ``tests/test_costing.py`` checks the result equals the scan on every generated test video and
    that the others fall back.
    """
    if "mp4" not in container.format.name.split(",") or stream.codec_context.has_b_frames:
        return None
    table = index_table(stream) if table is None else table
    n = len(table)
    if n == 0 or n != stream.frames or not stream.duration or first_pts is None:
        return None
    pts = table[:, 0]
    if (table[:, 1] & _INDEX_DISCARD).any() or pts[0] != first_pts or pts[0] != (stream.start_time or 0):
        return None
    if n > 1 and not (pts[1:] > pts[:-1]).all():
        return None
    end = int(pts[0]) + stream.duration
    if end <= pts[-1]:
        return None
    return pts, int(pts[0]), end


def probe_video(
    path: PathLike, *, folder_fps: float = 1.0, gif_fps: float | None = None, index: bool = True
) -> VideoInfo:
    """Describe a video file, GIF or frame folder without decoding it (the first frame is decoded for its rotation
    and size, unless the MP4 boxes give them: :func:`header_first_frame`).

    folder_fps: frame rate assigned to a directory of images (timestamps = index / folder_fps).
    gif_fps: frame rate assigned to a GIF instead of its own frame delays (``VideoInfo.assigned_fps``; the
        official code takes every GIF as 25 fps); None: the GIF's own timing, as a video file's.
    index: read frame times from an MP4 sample table where it agrees with the packet scan (:func:`index_times`)
        and the first frame from the MP4 boxes where they agree with decoding it; False always scans the packets
        and decodes the first frame.
    Raises DataError ``missing_file``, ``empty_file``, ``corrupt_video``, ``no_video_stream`` or ``no_frames``.
    """
    p, is_dir = stat_file(path)
    if is_dir:
        return _probe_frames_folder(p, folder_fps)
    with open_container(p) as container:
        stream = video_stream(container, p)
        tb = float(stream.time_base) if stream.time_base else None
        is_gif = container.format.name == "gif"
        table = index_table(stream)
        keyframe_interval = _keyframe_interval(table, tb) if tb else None
        rate = stream.average_rate or stream.guessed_rate
        frames = stream.frames or 0
        duration = None
        if stream.duration and tb:
            duration = stream.duration * tb
        elif container.duration:
            duration = container.duration / av.time_base
        # the first frame's pts, size and rotation: from the MP4 boxes where they agree with decoding it
        first = header_first_frame(container, stream, p) if index else None
        if first is None:
            frame = _first_frame(container, stream, p)
            if frame is None:
                raise DataError("no_frames", "video stream decodes to no frames", path=p)
            first = (frame.pts, frame.width, frame.height, frame.rotation)
        first_pts, native_w, native_h, frame_rotation = first
        start = stream.start_time * tb if (stream.start_time is not None and tb) else 0.0
        if first_pts is not None and tb:
            start = first_pts * tb
        rotation = (-int(round(frame_rotation))) % 360
        if is_gif and (not frames or not duration):
            # The GIF demuxer reports no frame count; demuxing (not decoding) a GIF is cheap.
            container.seek(0)
            frames, end = _count_packets(container, stream, p)
            if end is not None:
                duration = end - start
        # Frame numbering and rate as the processor's decoder (torchcodec, exact mode) sees them: the container's
        # sample table where it is known to give the same answer, else a packet scan.
        indexed = index_times(container, stream, first_pts, table) if index else None
        if indexed is not None:
            scanned, scan_first, end_pts = indexed
        else:
            container.seek(0)
            scanned, scan_first, end_pts = _scan_packets(container, stream, p)
        header_rate = stream.base_rate or rate  # torchcodec falls back to r_frame_rate
        average_fps = float(header_rate) if header_rate else None
        frame_times = None
        if len(scanned) and stream.time_base:
            span = _pts_seconds(end_pts, stream.time_base) - _pts_seconds(scan_first, stream.time_base)
            if span > 0:
                average_fps = len(scanned) / span
            # int -> double, times tb, minus start: the same IEEE operations as per element in Python
            frame_times = np.asarray(scanned, dtype=np.int64).astype(np.float64) * tb - start
            frames = len(scanned)
    if rotation not in (0, 90, 180, 270):
        # non-right angles are not supported: nearest quarter turn
        rotation = int(round(rotation / 90.0)) % 4 * 90
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
