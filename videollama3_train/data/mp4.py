"""What an MP4 / MOV file's boxes say about a video's first frame, read without decoding it: the display matrix
FFmpeg's MOV demuxer gives the track (its rotation), and whether the first sample carries an H.264 display
orientation SEI message (which would rotate the decoded frame where the container says nothing).

The cost pass uses this to describe a video without decoding a frame (:func:`.video.probe_video`); anything not
read here with certainty returns None, and the caller decodes the first frame as before.
"""

from __future__ import annotations

import math
import struct

_IDENTITY = (1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30)
_MAX_BOXES = 4096  # boxes walked at one level before giving up (a damaged file must not loop long)
_H264_SEI, _SEI_DISPLAY_ORIENTATION = 6, 47


def _i32(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


def _boxes(f, start: int, end: int):
    """``(type, payload start, box end)`` of the boxes in ``[start, end)``; stops at a malformed header."""
    pos = start
    for _ in range(_MAX_BOXES):
        if pos + 8 > end:
            return
        f.seek(pos)
        head = f.read(8)
        if len(head) < 8:
            return
        size, kind = struct.unpack(">I4s", head)
        body = pos + 8
        if size == 1:  # 64-bit size
            ext = f.read(8)
            if len(ext) < 8:
                return
            size, body = struct.unpack(">Q", ext)[0], pos + 16
        elif size == 0:  # to the end of the enclosing box / file
            size = end - pos
        if size < body - pos or pos + size > end:
            return
        yield kind, body, pos + size
        pos += size


def _matrix(raw: bytes) -> tuple[int, ...]:
    return tuple(_i32(v) for v in struct.unpack(">9I", raw))


def _compose(track: tuple[int, ...], movie: tuple[int, ...]) -> tuple[int, ...]:
    """FFmpeg's ``mov_read_tkhd``: the track matrix times the movie header's, in 16.16 / 2.30 fixed point."""
    shifts = (16, 16, 30)
    out = []
    for i in range(3):
        for j in range(3):
            acc = 0
            for e in range(3):
                acc = _i32((acc + ((track[3 * i + e] * movie[3 * e + j]) >> shifts[e])) & 0xFFFFFFFF)
            out.append(acc)
    return tuple(out)


def display_matrix(f, file_size: int, track_id: int) -> tuple[int, ...] | None:
    """The 3x3 display matrix FFmpeg attaches to track ``track_id`` (``mvhd`` and ``tkhd`` composed), or None when
    the ``moov`` box or the track's ``tkhd`` cannot be read. ``f``: the file opened in binary mode."""
    movie = _IDENTITY
    for kind, body, end in _boxes(f, 0, file_size):
        if kind != b"moov":
            continue
        for sub, sbody, send in _boxes(f, body, end):
            if sub == b"mvhd":
                f.seek(sbody)
                head = f.read(4 + 44 + 36)
                if len(head) < 4 + 44 + 36:
                    return None
                at = 4 + (44 if head[0] == 1 else 32)
                movie = _matrix(head[at : at + 36])
            elif sub == b"trak":
                for box, tbody, _ in _boxes(f, sbody, send):
                    if box != b"tkhd":
                        continue
                    f.seek(tbody)
                    head = f.read(4 + 48 + 36)
                    v1 = head[:1] == b"\x01"
                    need = 4 + (48 if v1 else 36) + 36
                    if len(head) < need:
                        return None
                    tid = struct.unpack(">I", head[4 + (16 if v1 else 8) : 4 + (20 if v1 else 12)])[0]
                    if tid == track_id:
                        at = 4 + (48 if v1 else 36)
                        return _compose(_matrix(head[at : at + 36]), movie)
                    break
        return None  # FFmpeg reads the first moov only
    return None


def rotation_of(matrix: tuple[int, ...]) -> float:
    """``av_display_rotation_get``: counter-clockwise degrees of a display matrix (NaN when degenerate); the
    identity (no side data in FFmpeg) is 0."""
    if matrix == _IDENTITY:
        return 0.0
    a, b, c, d = (v / 65536.0 for v in (matrix[0], matrix[1], matrix[3], matrix[4]))
    scale0, scale1 = math.hypot(a, c), math.hypot(b, d)
    if scale0 == 0.0 or scale1 == 0.0:
        return math.nan
    return -math.atan2(b / scale1, a / scale0) * 180 / math.pi


def _unescape(nal: bytes) -> bytes:
    """A NAL unit's payload without its emulation prevention bytes (``00 00 03`` -> ``00 00``)."""
    return nal.replace(b"\x00\x00\x03", b"\x00\x00") if b"\x00\x00\x03" in nal else nal


def _sei_types(rbsp: bytes) -> list[int] | None:
    """Payload types of the SEI messages in an H.264 SEI NAL (after its header byte); None when malformed."""
    types, i, n = [], 1, len(rbsp)
    while i < n and not (rbsp[i] == 0x80 and i == n - 1):
        values = []
        for _ in range(2):  # payload type, then payload size: 0xFF-extended
            v = 0
            while i < n and rbsp[i] == 0xFF:
                v, i = v + 255, i + 1
            if i >= n:
                return None
            v, i = v + rbsp[i], i + 1
            values.append(v)
        types.append(values[0])
        i += values[1]
        if i > n:
            return None
    return types


def h264_orientation_sei(sample: bytes, length_size: int) -> bool | None:
    """Whether an H.264 sample (length-prefixed NAL units, as MP4 stores them) carries a display orientation SEI
    message; None when the sample cannot be parsed."""
    i, n = 0, len(sample)
    while i < n:
        if i + length_size > n:
            return None
        size = int.from_bytes(sample[i : i + length_size], "big")
        i += length_size
        if size == 0 or i + size > n:
            return None
        if sample[i] & 0x1F == _H264_SEI:
            types = _sei_types(_unescape(sample[i : i + size]))
            if types is None or _SEI_DISPLAY_ORIENTATION in types:
                return None if types is None else True
        i += size
    return False
