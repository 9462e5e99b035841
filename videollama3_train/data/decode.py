"""Decoding the sampled frames of a video, GIF or frame folder into upright RGB arrays at their target size.

The official VideoLLaMA3 code decodes a whole video at native resolution in an ffmpeg subprocess and then keeps one
frame per second; here only the frames that are kept are converted, each is resized to its target size as soon as
it is decoded, and long gaps between kept frames are crossed by seeking to the preceding keyframe instead of
decoding everything in between. Each decoded frame becomes the RGB bytes torchcodec produces (an FFmpeg
``format=rgb24`` filter graph, :class:`_RGBConverter`) and is resized with the processor's own resize
(:func:`resize_frame`), so training sees what ``VideoLlama3Processor`` gives the model at inference.
"""

from __future__ import annotations

import math

import av
import numpy as np
import torch
import torchvision.transforms.v2.functional as tvF
from PIL import Image

from videollama3_train.data.errors import DataError
from videollama3_train.data.image import PathLike, check_file, load_image
from videollama3_train.data.video import (
    VideoInfo,
    frame_folder_images,
    open_container,
    probe_video,
    video_stream,
)

# Without a known keyframe interval, seek only across gaps longer than this (seconds). Typical GOPs are 0.5-10 s.
_DEFAULT_SEEK_GAP = 5.0
# Bounds on decode loops, so a broken file can never keep a worker busy forever.
_MAX_SEEK_RETRIES = 3


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
    files = frame_folder_images(info.path)
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
    p = check_file(path)
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
    with open_container(p) as container:
        stream = video_stream(container, p)
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
