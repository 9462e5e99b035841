"""Media reading: images of every mode, guards, paths, and frame-exact video/GIF/folder decoding."""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from mediagen import (
    encoder_supports,
    expected_frame_times,
    frame_index,
    make_audio_only,
    make_corrupt,
    make_frame_folder,
    make_gif,
    make_image,
    make_video,
)
from PIL import Image

from videollama3_train.data import decode as decode_mod
from videollama3_train.data import media
from videollama3_train.data.errors import DataError
from videollama3_train.data.media import (
    VideoInfo,
    decode_video,
    load_image,
    probe_image,
    probe_video,
    resolve_media_path,
    sample_frame_times,
)


def _reason(exc_info) -> str:
    return exc_info.value.reason


# ---------------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,mode",
    [
        ("a.png", "RGB"),
        ("a.jpg", "RGB"),
        ("a.webp", "RGB"),
        ("a.png", "RGBA"),
        ("a.webp", "RGBA"),
        ("a.png", "LA"),
        ("a.png", "L"),
        ("a.jpg", "L"),
        ("a.png", "P"),
        ("a.gif", "P"),
        ("a.jpg", "CMYK"),
        ("a.png", "I;16"),
    ],
)
def test_every_mode_loads_as_rgb(tmp_path: Path, name: str, mode: str):
    path = make_image(tmp_path / name, size=(33, 17), mode=mode, pattern="gradient")
    assert probe_image(path) == (33, 17)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (33, 17)
    a = np.asarray(img).astype(int)
    # The gradient survives every mode: dark on the left, bright on the right.
    assert a[:, 0].mean() < 40 and a[:, -1].mean() > 200, (a[:, 0].mean(), a[:, -1].mean())


def test_alpha_is_composited_on_white(tmp_path: Path):
    path = make_image(tmp_path / "a.png", mode="RGBA", color=(200, 0, 0, 128))
    r, g, b = np.asarray(load_image(path))[0, 0].astype(int)
    # 128/255 of red over white: 200*a + 255*(1-a), 0*a + 255*(1-a)
    assert abs(r - 227) <= 1 and abs(g - 127) <= 1 and abs(b - 127) <= 1
    transparent = make_image(tmp_path / "t.png", mode="LA", color=(0, 0))
    assert np.asarray(load_image(transparent)).min() == 255


@pytest.mark.parametrize("value16,value8", [(0, 0), (25700, 100), (32768, 128), (65535, 255)])
def test_16bit_is_scaled_not_clipped(tmp_path: Path, value16: int, value8: int):
    path = make_image(tmp_path / "g.png", mode="I;16", color=value16)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file
    assert np.asarray(load_image(path))[0, 0].tolist() == [value8] * 3


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
def test_exif_orientation_6_rotates_clockwise(tmp_path: Path, suffix: str):
    path = make_image(tmp_path / f"o{suffix}", size=(40, 20), pattern="corner", exif_orientation=6)
    assert probe_image(path) == (20, 40)
    a = np.asarray(load_image(path)).astype(int)
    assert a.shape == (40, 20, 3)
    # The white block stored top-left is shown top-right after a quarter turn clockwise.
    assert a[:5, -3:].mean() > 200 and a[:5, :3].mean() < 50 and a[-5:, -3:].mean() < 50


def test_pixel_guard_before_decoding(tmp_path: Path):
    path = make_image(tmp_path / "a.png", size=(32, 24))
    for fn in (probe_image, load_image):
        with pytest.raises(DataError) as e:
            fn(path, max_pixels=32 * 24 - 1)
        assert _reason(e) == "image_too_large" and str(path) in str(e.value)
    assert load_image(path, max_pixels=32 * 24).size == (32, 24)


def test_huge_png_header_is_refused_without_decoding(tmp_path: Path):
    # A 20000x20000 PNG header with no pixel data: the guard must fire from the header alone.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    path = tmp_path / "huge.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    for fn in (probe_image, load_image):
        with pytest.raises(DataError) as e:
            fn(path)
        assert _reason(e) == "image_too_large"


def test_extreme_aspect_ratio_loads(tmp_path: Path):
    path = make_image(tmp_path / "thin.png", size=(1, 4000), mode="L")
    assert load_image(path).size == (1, 4000)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_image_is_corrupt(tmp_path: Path, suffix: str):
    good = make_image(tmp_path / f"good{suffix}", size=(64, 64), pattern="noise")
    bad = make_corrupt(tmp_path / f"bad{suffix}", source=good, keep=0.5)
    probe_image(bad)  # the header is intact ...
    with pytest.raises(DataError) as e:  # ... the pixels are not
        load_image(bad)
    assert _reason(e) == "corrupt_image" and "bad" in str(e.value)


def test_garbage_image_is_corrupt(tmp_path: Path):
    bad = make_corrupt(tmp_path / "x.png")
    for fn in (probe_image, load_image):
        with pytest.raises(DataError) as e:
            fn(bad)
        assert _reason(e) == "corrupt_image"


def test_missing_and_empty_files(tmp_path: Path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for fn in (probe_image, load_image, probe_video):
        with pytest.raises(DataError) as e:
            fn(tmp_path / "nope.jpg")
        assert _reason(e) == "missing_file"
        with pytest.raises(DataError) as e:
            fn(empty)
        assert _reason(e) == "empty_file" and "empty.jpg" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("resolver", ["kernel", "portable"])
def test_resolve_media_path(tmp_path: Path, resolver, monkeypatch):
    """Both ways of resolving a path (the kernel's, through /proc/self/fd; ``os.path.realpath``) give the same."""
    from videollama3_train.data import image as image_mod

    if resolver == "portable":
        monkeypatch.setattr(image_mod, "_open_resolved", lambda path: None)
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    img = make_image(root / "sub" / "a.png")
    outside = make_image(tmp_path / "secret.png")
    assert resolve_media_path(root, "sub/a.png") == img.resolve()
    assert resolve_media_path(str(root), "sub/../sub/a.png") == img.resolve()
    (root / "inner_link.png").symlink_to(img)
    assert resolve_media_path(root, "inner_link.png") == img.resolve()
    (root / "out_link.png").symlink_to(outside)
    (root / "out_dir").symlink_to(tmp_path, target_is_directory=True)
    # links inside the root are the dataset owner's: followed by default, refused by the strict check
    assert resolve_media_path(root, "out_link.png") == outside.resolve()
    assert resolve_media_path(root, "out_dir/secret.png") == outside.resolve()
    for rel in ("out_link.png", "out_dir/secret.png"):
        with pytest.raises(DataError) as e:
            resolve_media_path(root, rel, follow_symlinks=False)
        assert _reason(e) == "path_escapes_root" and "follow_symlinks" in str(e.value), rel
    assert resolve_media_path(root, "inner_link.png", follow_symlinks=False) == img.resolve()
    # written paths may not leave the root, links or not ("out_dir/.." is the root's parent as written)
    for rel in ("../secret.png", str(outside), "sub/../../secret.png", "out_dir/../../secret.png"):
        for follow in (True, False):
            with pytest.raises(DataError) as e:
                resolve_media_path(root, rel, follow_symlinks=follow)
            assert _reason(e) == "path_escapes_root" and rel in str(e.value), rel
    # ".." is collapsed before links are followed: the file checked is the file opened
    assert resolve_media_path(root, "out_dir/../sub/a.png") == img.resolve()
    # an absolute path inside the root is accepted
    assert resolve_media_path(root, str(img)) == img.resolve()
    with pytest.raises(DataError) as e:
        resolve_media_path(root, "sub/missing.png")
    assert _reason(e) == "missing_file"
    (root / "zero.png").write_bytes(b"")
    with pytest.raises(DataError) as e:
        resolve_media_path(root, "zero.png")
    assert _reason(e) == "empty_file"
    assert resolve_media_path(root, "sub") == (root / "sub").resolve()  # frame folders are directories
    (root / "dangling.png").symlink_to(root / "nowhere.png")
    with pytest.raises(DataError) as e:
        resolve_media_path(root, "dangling.png")
    assert _reason(e) == "missing_file"
    os.mkfifo(root / "pipe.png")  # opened without blocking, refused as a 0-byte file
    with pytest.raises(DataError) as e:
        resolve_media_path(root, "pipe.png")
    assert _reason(e) == "empty_file"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="no /proc")
def test_kernel_resolution_equals_realpath(tmp_path: Path):
    """``_open_resolved`` is ``(os.path.realpath, os.stat)`` on links to files and folders, relative links, link
    chains and links through linked folders."""
    from videollama3_train.data.image import _open_resolved

    (tmp_path / "d" / "e").mkdir(parents=True)
    f = make_image(tmp_path / "d" / "e" / "f.png")
    (tmp_path / "l1").symlink_to("d/e/f.png")
    (tmp_path / "l2").symlink_to(tmp_path / "l1")
    (tmp_path / "ld").symlink_to("d", target_is_directory=True)
    (tmp_path / "d" / "up").symlink_to("..", target_is_directory=True)
    for rel in ("d/e/f.png", "l1", "l2", "ld/e/f.png", "ld/up/l2", "d/e", "ld"):
        p = str(tmp_path / rel)
        got = _open_resolved(p)
        assert got is not None and got[0] == os.path.realpath(p), rel
        assert (got[1].st_ino, got[1].st_size) == (os.stat(p).st_ino, os.stat(p).st_size), rel
    assert _open_resolved(str(tmp_path / "missing")) is None
    assert f.exists()


# ---------------------------------------------------------------------------------------------------------------
# frame sampling (pure arithmetic on VideoInfo)
# ---------------------------------------------------------------------------------------------------------------
def _info(duration: float, fps: float = 30.0, num_frames: int | None = None) -> VideoInfo:
    n = num_frames if num_frames is not None else round(duration * fps)
    return VideoInfo("v.mp4", 64, 48, duration, fps, n, 0, 0.0, 2.0, "video")


def test_sample_at_rate():
    assert sample_frame_times(_info(10.0), fps=1, max_frames=180, min_frames=4) == [
        float(i) for i in range(10)
    ]
    assert sample_frame_times(_info(10.5), fps=2, max_frames=180, min_frames=4) == [i / 2 for i in range(21)]


def test_sample_capped_and_raised_are_even():
    capped = sample_frame_times(_info(600.0), fps=1, max_frames=180, min_frames=4)
    assert len(capped) == 180 and capped[0] == 0.0
    assert np.allclose(np.diff(capped), np.diff(capped)[0]) and capped[-1] < 600.0
    raised = sample_frame_times(_info(2.0), fps=1, max_frames=180, min_frames=4)
    assert len(raised) == 4 and raised[0] == 0.0 and raised[-1] <= 2.0 - 1 / 30 + 1e-9
    assert np.allclose(np.diff(raised), np.diff(raised)[0])


def test_sample_never_exceeds_existing_frames():
    assert sample_frame_times(_info(0.1, fps=10, num_frames=1), fps=1, max_frames=180, min_frames=4) == [0.0]
    three = sample_frame_times(_info(0.3, fps=10), fps=1, max_frames=180, min_frames=4)
    assert len(three) == 3
    many = sample_frame_times(_info(2.0, fps=5), fps=30, max_frames=180, min_frames=4)
    assert len(many) == 10


def test_sample_subclip():
    times = sample_frame_times(_info(10.0), fps=2, max_frames=180, min_frames=1, start=3.0, end=5.0)
    assert times == [3.0, 3.5, 4.0, 4.5]
    with pytest.raises(ValueError, match="empty time range"):
        sample_frame_times(_info(10.0), fps=1, max_frames=8, min_frames=1, start=12.0)


def test_sample_frames_follow_the_processors_rule():
    """Indices are VideoLlama3VideoProcessor.sample_frames' (float32 arange), less the index past the last frame
    that its float32 range holds for some lengths (17 frames at n = 7: [0, 2, 4, 7, 9, 12, 14, 17]); prompt
    timestamps are index / fps in float32, as the processor's metadata computes them."""
    info = _info(17 / 30, num_frames=17)
    s = media.sample_frames(info, fps=1, max_frames=7, min_frames=7)
    assert s.indices == [0, 2, 4, 7, 9, 12, 14]
    assert s.times == [i / 30 for i in s.indices]
    assert s.timestamps == [float(np.float32(np.float32(i) / np.float32(30.0))) for i in s.indices]
    # a 29.97 fps clip: the float32 timestamps are what `Time {t:.1f}s` is written from
    odd = dataclasses.replace(_info(20.0, fps=29.97, num_frames=600), average_fps=29.97)
    s = media.sample_frames(odd, fps=1, max_frames=180, min_frames=4)
    assert len(s.indices) == 20 and s.timestamps == media.prompt_timestamps(s.indices, 29.97)


def test_sample_subclip_is_numbered_from_its_start():
    s = media.sample_frames(_info(10.0, fps=10), fps=2, max_frames=180, min_frames=1, start=3.0, end=5.0)
    assert s.indices == [0, 5, 10, 15] and s.times == pytest.approx([3.0, 3.5, 4.0, 4.5])
    assert s.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5])
    # a range between two frames still holds the frame on screen
    assert media.sample_frames(
        _info(10.0, fps=10), fps=1, max_frames=8, min_frames=1, start=3.04, end=3.06
    ).times == [pytest.approx(3.0)]


def test_probe_numbers_frames_by_packet_scan(tmp_path: Path):
    """num_frames / average_fps / frame_times come from a packet scan (torchcodec's exact mode): exact for
    matroska too, whose header stores no frame count, and for irregular timestamps."""
    mkv = probe_video(make_video(tmp_path / "a.mkv", seconds=1.3, fps=12.0))
    assert mkv.num_frames == 16 and len(mkv.frame_times) == 16
    assert mkv.average_fps == pytest.approx(12.0, abs=0.01)  # matroska times are whole milliseconds
    vfr = probe_video(make_video(tmp_path / "v.mp4", seconds=2.0, fps=10.0, vfr=True, bframes=2))
    assert np.allclose(vfr.frame_times, expected_frame_times(2.0, 10.0, vfr=True), atol=1e-6)
    s = media.sample_frames(vfr, fps=2.0, max_frames=180, min_frames=1)
    assert s.times == [float(vfr.frame_times[i]) for i in s.indices]
    frames, _ = decode_video(tmp_path / "v.mp4", s.times, info=vfr)
    assert _indices(frames) == s.indices


# ---------------------------------------------------------------------------------------------------------------
# videos
# ---------------------------------------------------------------------------------------------------------------
def _indices(frames: np.ndarray) -> list[int]:
    return [frame_index(f) for f in frames]


@pytest.mark.parametrize(
    "name,seconds,fps,codec",
    [
        ("a.mp4", 2.0, 10.0, "libx264"),
        ("b.mp4", 1.0, 30.0, "libx264"),
        ("c.mp4", 3.0, 4.0, "mpeg4"),
        ("d.webm", 1.5, 8.0, "libvpx"),
        ("e.mkv", 1.0, 12.0, "libx264"),
    ],
)
def test_video_frames_and_timestamps(tmp_path: Path, name: str, seconds: float, fps: float, codec: str):
    if not encoder_supports(codec, "yuv420p"):
        pytest.skip(f"encoder {codec} missing in this FFmpeg build")
    path = make_video(tmp_path / name, seconds=seconds, fps=fps, codec=codec, keyframe_interval_s=0.5)
    truth = expected_frame_times(seconds, fps)
    info = probe_video(path)
    assert info.kind == "video" and (info.width, info.height) == (64, 48) and info.rotation == 0
    assert abs(info.fps - fps) < 1e-6 and abs(info.duration - seconds) < 1.5 / fps
    assert abs(info.num_frames - len(truth)) <= 1  # exact for mp4; matroska stores no count, so an estimate
    # Exactly at each frame, and 0.6 of a period later (still the same frame).
    for shift in (0.0, 0.6 / fps):
        frames, stamps = decode_video(path, [t + shift for t in truth], info=info)
        assert frames.shape == (len(truth), 48, 64, 3) and frames.dtype == np.uint8
        assert _indices(frames) == list(range(len(truth)))
        assert np.allclose(stamps, truth, atol=1e-3)


def test_decode_order_of_requests_is_kept(tmp_path: Path):
    path = make_video(tmp_path / "a.mp4", seconds=2.0, fps=10.0)
    frames, stamps = decode_video(path, [1.5, 0.0, 1.5, 0.3])
    assert _indices(frames) == [15, 0, 15, 3]
    assert np.allclose(stamps, [1.5, 0.0, 1.5, 0.3])


def test_times_past_the_end_give_the_last_frame(tmp_path: Path):
    path = make_video(tmp_path / "a.mp4", seconds=1.0, fps=10.0)
    frames, stamps = decode_video(path, [-1.0, 50.0])
    assert _indices(frames) == [0, 9] and np.allclose(stamps, [0.0, 0.9])


def test_vfr_timestamps_are_exact(tmp_path: Path):
    path = make_video(tmp_path / "v.mp4", seconds=2.0, fps=10.0, vfr=True)
    truth = expected_frame_times(2.0, 10.0, vfr=True)
    assert len(set(np.round(np.diff(truth), 4))) > 2  # really irregular
    info = probe_video(path)
    frames, stamps = decode_video(path, truth, info=info)
    assert _indices(frames) == list(range(len(truth)))
    assert np.allclose(stamps, truth, atol=1e-3)
    # Halfway between two frames still shows the earlier one.
    mids = [(a + b) / 2 for a, b in zip(truth, truth[1:], strict=False)]
    frames, stamps = decode_video(path, mids, info=info)
    assert _indices(frames) == list(range(len(mids)))
    assert np.allclose(stamps, truth[:-1], atol=1e-3)


@pytest.mark.parametrize(
    "rotation,corner",
    [(90, (0, -1)), (180, (-1, -1)), (270, (-1, 0))],
)
def test_rotated_video_comes_out_upright(tmp_path: Path, rotation: int, corner: tuple[int, int]):
    path = make_video(tmp_path / "r.mp4", width=64, height=48, seconds=0.5, fps=10.0, rotation=rotation)
    info = probe_video(path)
    assert info.rotation == rotation
    display = (48, 64) if rotation in (90, 270) else (64, 48)
    assert (info.width, info.height) == display
    frames, _ = decode_video(path, [0.0], info=info)
    assert frames.shape == (1, display[1], display[0], 3)
    # The white marker stored at the top-left ends up in the corner a clockwise turn of `rotation` takes it to.
    g = frames[0].astype(int).mean(axis=2)
    r, c = corner
    patch = (
        g[:4, :4]
        if (r, c) == (0, 0)
        else g[slice(-4, None) if r else slice(0, 4), slice(-4, None) if c else slice(0, 4)]
    )
    assert patch.mean() > 220 and g[:4, :4].mean() < 200
    small, _ = decode_video(path, [0.0], info=info, size=(display[1] // 2, display[0] // 2))
    assert small.shape == (1, display[1] // 2, display[0] // 2, 3)


def test_10bit_video(tmp_path: Path):
    if not encoder_supports("libx264", "yuv420p10le"):
        pytest.skip("libx264 with yuv420p10le is not available in this FFmpeg build")
    path = make_video(tmp_path / "t.mp4", seconds=1.0, fps=10.0, pix_fmt="yuv420p10le")
    frames, stamps = decode_video(path, expected_frame_times(1.0, 10.0))
    assert frames.dtype == np.uint8 and _indices(frames) == list(range(10))


def test_one_frame_video(tmp_path: Path):
    path = make_video(tmp_path / "one.mp4", seconds=0.1, fps=10.0)
    info = probe_video(path)
    assert info.num_frames == 1
    times = sample_frame_times(info, fps=1.0, max_frames=180, min_frames=4)
    assert times == [0.0]
    frames, stamps = decode_video(path, times, info=info)
    assert frames.shape[0] == 1 and _indices(frames) == [0] and stamps == [0.0]


def test_audio_track_is_ignored_and_audio_only_is_refused(tmp_path: Path):
    path = make_video(tmp_path / "av.mp4", seconds=1.0, fps=10.0, audio=True)
    frames, _ = decode_video(path, [0.0, 0.55])
    assert _indices(frames) == [0, 5]
    audio = make_audio_only(tmp_path / "sound.m4a")
    for call in (lambda: probe_video(audio), lambda: decode_video(audio, [0.0])):
        with pytest.raises(DataError) as e:
            call()
        assert _reason(e) == "no_video_stream" and "sound.m4a" in str(e.value)


def test_corrupt_video(tmp_path: Path):
    good = make_video(tmp_path / "good.mp4", seconds=1.0, fps=10.0)
    truncated = make_corrupt(tmp_path / "trunc.mp4", source=good, keep=0.6)
    garbage = make_corrupt(tmp_path / "garbage.mp4")
    for bad in (truncated, garbage):
        for call in (lambda b=bad: probe_video(b), lambda b=bad: decode_video(b, [0.0])):
            with pytest.raises(DataError) as e:
                call()
            assert _reason(e) == "corrupt_video" and bad.name in str(e.value)


def test_truncated_stream_is_not_padded_with_its_last_frame(tmp_path: Path):
    # Matroska keeps its header (and duration) at the front, so a cut file opens but its frames stop early.
    good = make_video(tmp_path / "long.mkv", seconds=6.0, fps=10.0, keyframe_interval_s=1.0)
    cut = make_corrupt(tmp_path / "cut.mkv", source=good, keep=0.5)
    info = probe_video(cut)
    frames, _ = decode_video(cut, [0.0, 1.0], info=info)  # the intact part still decodes
    assert _indices(frames) == [0, 10]
    with pytest.raises(DataError) as e:
        decode_video(cut, [0.0, 5.5], info=info)
    assert _reason(e) == "corrupt_video" and "truncated" in str(e.value)


@pytest.mark.parametrize("bframes", [0, 2])
def test_seek_and_sequential_paths_agree(tmp_path: Path, monkeypatch, bframes: int):
    path = make_video(tmp_path / "long.mp4", seconds=12.0, fps=5.0, keyframe_interval_s=1.0, bframes=bframes)
    info = probe_video(path)
    assert info.keyframe_interval == pytest.approx(1.0, abs=0.01)
    times = [0.0, 3.1, 6.5, 6.7, 9.9, 11.8]
    seeks = []
    real_seek = decode_mod._seek_run
    monkeypatch.setattr(
        decode_mod, "_seek_run", lambda reader, run: seeks.append(run) or real_seek(reader, run)
    )
    seek_frames, seek_stamps = decode_video(path, times, info=info)
    assert len(seeks) >= 3  # the seek path really ran
    seeks.clear()
    sequential_info = dataclasses.replace(info, keyframe_interval=math.inf)
    seq_frames, seq_stamps = decode_video(path, times, info=sequential_info)
    assert not seeks
    assert np.array_equal(seek_frames, seq_frames) and seek_stamps == seq_stamps
    assert _indices(seq_frames) == [math.floor(t * 5 + 1e-6) for t in times]


def test_size_resizes_each_frame_as_the_processor(tmp_path: Path):
    """``size``: every frame is resized as soon as it is decoded, with the processor's resize; equal to resizing
    the native frames afterwards in one batch. ``prescale`` (decode_scale) lets FFmpeg shrink first: close."""
    import torch
    import torchvision.transforms.v2.functional as tvF

    path = make_video(tmp_path / "a.mp4", width=128, height=96, seconds=1.0, fps=10.0)
    frames, _ = decode_video(path, [0.0, 0.5], size=(24, 32))
    assert frames.shape == (2, 24, 32, 3)
    assert _indices(frames) == [0, 5]
    native, _ = decode_video(path, [0.0, 0.5])
    batch = torch.from_numpy(native).permute(0, 3, 1, 2).contiguous()
    batched = tvF.resize(batch, [24, 32], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    assert np.array_equal(frames, batched.permute(0, 2, 3, 1).numpy())
    fast, _ = decode_video(path, [0.0, 0.5], size=(24, 32), prescale=(48, 64))
    assert fast.shape == frames.shape and _indices(fast) == [0, 5]
    assert 0 < np.abs(fast.astype(int) - frames.astype(int)).mean() < 3


def test_resize_frame_equals_batched_resize():
    import torch
    import torchvision.transforms.v2.functional as tvF

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 61, 93, 3), dtype=np.uint8)
    for size in ((28, 42), (70, 98), (61, 93)):
        batch = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
        want = tvF.resize(batch, list(size), interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        got = np.stack([media.resize_frame(f, size) for f in frames])
        assert np.array_equal(got, want.permute(0, 2, 3, 1).numpy())


def test_subclip_decode(tmp_path: Path):
    path = make_video(tmp_path / "a.mp4", seconds=4.0, fps=10.0)
    info = probe_video(path)
    times = sample_frame_times(info, fps=2.0, max_frames=180, min_frames=1, start=1.0, end=3.0)
    assert times == [1.0, 1.5, 2.0, 2.5]
    frames, stamps = decode_video(path, times, info=info)
    assert _indices(frames) == [10, 15, 20, 25] and np.allclose(stamps, times)


def test_gif(tmp_path: Path):
    durations = [100, 200, 100, 50, 100]
    path = make_gif(tmp_path / "a.gif", n=5, size=(40, 30), duration_ms=durations)
    info = probe_video(path)
    assert info.kind == "gif" and (info.width, info.height) == (40, 30)
    assert info.num_frames == 5 and info.duration == pytest.approx(0.55)
    starts = np.cumsum([0, *durations[:-1]]) / 1000
    frames, stamps = decode_video(path, [t + 0.01 for t in starts], info=info)
    assert _indices(frames) == [0, 1, 2, 3, 4] and np.allclose(stamps, starts)


def test_frame_folder(tmp_path: Path):
    folder = make_frame_folder(tmp_path / "frames", n=6, size=(40, 30))
    (folder / "notes.txt").write_text("not a frame")
    info = probe_video(folder)
    assert info.kind == "frames" and info.num_frames == 6 and info.fps == 1.0 and info.duration == 6.0
    frames, stamps = decode_video(folder, [0.0, 2.5, 5.0, 2.0], info=info)
    assert (
        frames.shape == (4, 30, 40, 3) and _indices(frames) == [0, 2, 5, 2] and stamps == [0.0, 2.0, 5.0, 2.0]
    )
    fast, stamps = decode_video(folder, [0.0, 1.0], folder_fps=2.0, size=(15, 20))
    assert fast.shape == (2, 15, 20, 3) and _indices(fast) == [0, 2] and stamps == [0.0, 1.0]
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        probe_video(empty)
    assert _reason(e) == "no_frames"
