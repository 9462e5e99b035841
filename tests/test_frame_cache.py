"""Frame cache (data/frame_cache.py), its preparation (data/prepare.py) and the prepare command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mediagen import frame_index, make_corrupt, make_video

from videollama3_train.data import frame_cache as fc
from videollama3_train.data import media
from videollama3_train.data.config import EncodeConfig
from videollama3_train.data.errors import DataError
from videollama3_train.data.prepare import frame_pixel_cap, prepare

SAMPLING = {"fps": 1.0, "max_frames": 180, "min_frames": 4}
# JPEG quality 95 with 4:4:4 chroma on these flat-band frames: measured mean |error| ~0.06 grey levels; the bound
# leaves room for other libjpeg builds while still catching a wrong frame (bands are 16 levels apart).
JPEG_MEAN_ABS_TOL = 1.5


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return make_video(
        tmp_path_factory.mktemp("v") / "clip.mp4", 96, 64, seconds=6, fps=10, keyframe_interval_s=2
    )


def _fresh(path, size=None, **sampling):
    info = media.probe_video(path)
    times = media.sample_frame_times(info, **{**SAMPLING, **sampling})
    return media.decode_video(path, times, size=size, info=info)


def _build(videos, cache, **kw):
    return fc.build_frame_cache(videos, cache, **SAMPLING, progress=False, **kw)


@pytest.mark.parametrize("codec", ["jpeg", "png", "npy"])
def test_cached_frames_match_fresh_decode(video, tmp_path, codec):
    counts = _build([(video, None, None)], tmp_path, codec=codec)
    assert counts["written"] == 1 and counts["failed"] == 0
    got = fc.lookup_frames(tmp_path, video, **SAMPLING)
    assert got is not None
    frames, stamps = got
    want, want_stamps = _fresh(video)
    assert stamps == pytest.approx(want_stamps, abs=1e-9)
    assert frames.shape == want.shape and frames.dtype == np.uint8
    if codec == "jpeg":
        diff = np.abs(frames.astype(np.int16) - want.astype(np.int16))
        assert diff.mean() < JPEG_MEAN_ABS_TOL
        assert [frame_index(f) for f in frames] == [frame_index(f) for f in want]
    else:  # lossless codecs give the decoder's output bit for bit
        np.testing.assert_array_equal(frames, want)


def test_sub_clip_and_resize_on_read(video, tmp_path):
    _build([(video, 2.0, 5.0)], tmp_path, codec="npy")
    key = fc.cache_key(video, **SAMPLING, start=2.0, end=5.0)
    frames, stamps = fc.read_cached_frames(tmp_path, key, size=(32, 48))
    want, want_stamps = _fresh(video, start=2.0, end=5.0)
    assert frames.shape == (len(want), 32, 48, 3)
    assert stamps == pytest.approx(want_stamps)
    assert [frame_index(f) for f in frames] == [frame_index(f) for f in want]
    # the whole-video entry is a different key, not built
    assert fc.lookup_frames(tmp_path, video, **SAMPLING) is None


def test_pixel_cap_and_refusal_to_enlarge(video, tmp_path):
    _build([(video, None, None)], tmp_path, max_pixels_per_frame=48 * 32)
    key = fc.cache_key(video, **SAMPLING)
    assert fc.cached_size(tmp_path, key) == (32, 48)
    # stored below native: a bigger request misses, so the caller decodes the sharper original instead
    assert fc.read_cached_frames(tmp_path, key, size=(64, 96)) is None
    assert fc.read_cached_frames(tmp_path, key, size=(16, 24))[0].shape[1:3] == (16, 24)


def test_stored_size_never_below_smart_resize_target():
    from videollama3_train.data.vision import target_size

    cfg = EncodeConfig()
    cap = frame_pixel_cap(cfg)
    for h, w in [(720, 1280), (1080, 1920), (1920, 1080), (480, 640), (2160, 3840)]:
        for n in (4, 30, 180):
            sh, sw = fc.stored_size(h, w, cap(n))
            tokens = 10240 // n
            th, tw = target_size(h, w, merge_size=2, max_tokens=tokens, min_tokens=16)
            assert sh * sw <= h * w
            assert (sh >= th or sh == h) and (sw >= tw or sw == w), (h, w, n)


def test_key_is_stable_and_tracks_file_and_params(video, tmp_path):
    base = fc.cache_key(video, **SAMPLING)
    assert fc.cache_key(video, fps=1, max_frames=180, min_frames=4) == base  # 1 == 1.0
    assert fc.cache_key(str(video), **SAMPLING, start=None, end=None) == base
    changed = [
        fc.cache_key(video, fps=2.0, max_frames=180, min_frames=4),
        fc.cache_key(video, fps=1.0, max_frames=64, min_frames=4),
        fc.cache_key(video, fps=1.0, max_frames=180, min_frames=8),
        fc.cache_key(video, **SAMPLING, start=1.0),
        fc.cache_key(video, **SAMPLING, end=3.0),
        fc.cache_key(video, **SAMPLING, max_side_or_pixels=50_000),
    ]
    assert len({base, *changed}) == len(changed) + 1

    copy = tmp_path / "copy.mp4"
    copy.write_bytes(video.read_bytes())
    os.utime(copy, ns=(1_000_000_000, 1_000_000_000))
    k1 = fc.cache_key(copy, **SAMPLING)
    assert k1 != base  # another file
    os.utime(copy, ns=(2_000_000_000, 2_000_000_000))
    k2 = fc.cache_key(copy, **SAMPLING)
    assert k2 != k1  # touched
    with open(copy, "ab") as f:
        f.write(b"\0")
    os.utime(copy, ns=(2_000_000_000, 2_000_000_000))
    assert fc.cache_key(copy, **SAMPLING) not in (k1, k2)  # same mtime, other size


def test_missing_entry_and_missing_video(tmp_path):
    assert fc.read_cached_frames(tmp_path, "ab" * 32) is None
    assert fc.cached_size(tmp_path, "ab" * 32) is None
    assert fc.lookup_frames(None, "whatever.mp4", **SAMPLING) is None  # caching off
    with pytest.raises(DataError) as e:
        fc.cache_key(tmp_path / "nope.mp4", **SAMPLING)
    assert e.value.reason == "missing_file"


def test_bad_videos_are_counted_not_fatal(video, tmp_path):
    corrupt = make_corrupt(tmp_path / "bad.mp4", source=video)
    missing = tmp_path / "missing.mp4"
    jobs = [(video, None, None), (corrupt, None, None), (missing, None, None), (video, None, None)]
    counts = _build(
        jobs, tmp_path / "cache", num_workers=2
    )  # two processes: failures cross the pool boundary
    assert counts["videos"] == 3  # the duplicate is done once
    assert counts["written"] == 1 and counts["failed"] == 2
    assert counts["error:corrupt_video"] == 1 and counts["error:missing_file"] == 1
    again = _build(jobs[:1], tmp_path / "cache")
    assert again["existing"] == 1 and again["written"] == 0


def test_write_is_atomic(video, tmp_path, monkeypatch):
    frames, stamps = _fresh(video)
    key = fc.cache_key(video, **SAMPLING)
    final = fc.cache_path(tmp_path, key)

    calls = []

    def failing_encode(frame, codec):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real_encode(frame, codec)

    real_encode = fc._encode_frame
    monkeypatch.setattr(fc, "_encode_frame", failing_encode)
    with pytest.raises(OSError, match="simulated"):
        fc.write_cached_frames(tmp_path, key, frames, stamps)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []  # no temporary file left either
    assert fc.read_cached_frames(tmp_path, key) is None

    # a failed rewrite leaves the previous complete entry untouched
    monkeypatch.setattr(fc, "_encode_frame", real_encode)
    fc.write_cached_frames(tmp_path, key, frames, stamps)
    before = final.read_bytes()
    calls.clear()
    monkeypatch.setattr(fc, "_encode_frame", failing_encode)
    with pytest.raises(OSError):
        fc.write_cached_frames(tmp_path, key, frames, stamps)
    assert final.read_bytes() == before
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_truncated_entry_is_a_named_error(video, tmp_path):
    frames, stamps = _fresh(video)
    key = fc.cache_key(video, **SAMPLING)
    path = fc.write_cached_frames(tmp_path, key, frames, stamps)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError) as e:
        fc.read_cached_frames(tmp_path, key)
    assert e.value.reason == "corrupt_cache"


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        fc.write_cached_frames(tmp_path, "ab" * 32, np.zeros((2, 4, 4, 3), np.float32), [0.0, 1.0])
    with pytest.raises(ValueError, match="timestamps"):
        fc.write_cached_frames(tmp_path, "ab" * 32, np.zeros((2, 4, 4, 3), np.uint8), [0.0])
    with pytest.raises(ValueError, match="codec"):
        fc.write_cached_frames(tmp_path, "ab" * 32, np.zeros((1, 4, 4, 3), np.uint8), [0.0], codec="webp")


def test_prepare_collects_both_schemas(video, tmp_path):
    root = video.parent
    official = tmp_path / "official.json"
    official.write_text(
        json.dumps(
            [
                {
                    "video": video.name,
                    "conversations": [
                        {"from": "human", "value": "<video>\nhi"},
                        {"from": "gpt", "value": "ok"},
                    ],
                },
                # a frame list: skipped, it is images already
                {
                    "video": ["a.jpg", "b.jpg"],
                    "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "ok"}],
                },
                {
                    "video": "gone.mp4",
                    "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "ok"}],
                },
                {"conversations": [{"from": "human", "value": "hi"}]},  # no assistant turn: a bad record
            ]
        )
    )
    messages = tmp_path / "messages.jsonl"
    clip = {"type": "video", "video": video.name, "start": 1.0, "end": 4.0}
    rows = [
        {
            "messages": [
                {"role": "user", "content": [clip, {"type": "text", "text": "q"}]},
                {"role": "assistant", "content": "a"},
            ]
        },
        # the same video again, whole: shares the official record's entry
        {
            "messages": [
                {"role": "user", "content": [{"type": "video", "path": video.name}]},
                {"role": "assistant", "content": "a"},
            ]
        },
    ]
    messages.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    cfg = EncodeConfig(**SAMPLING)
    counts = prepare(
        [(str(official), str(root)), (str(messages), str(root))], tmp_path / "cache", cfg, 1, progress=False
    )
    assert counts["records"] == 6 and counts["bad_records"] == 1
    assert counts["frame_lists"] == 1 and counts["error:missing_file"] == 1
    assert counts["videos"] == 2 and counts["written"] == 2 and counts["failed"] == 1
    assert fc.lookup_frames(tmp_path / "cache", video, **SAMPLING) is not None
    assert fc.lookup_frames(tmp_path / "cache", video, **SAMPLING, start=1.0, end=4.0) is not None


def test_prepare_command_line(video, tmp_path):
    """The command takes the train command's overrides (configs/prepare.yaml) and prints its counts as JSON."""
    from videollama3_train.config import compose

    annotation = tmp_path / "a.jsonl"
    row = {
        "video": video.name,
        "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "ok"}],
    }
    annotation.write_text(json.dumps(row) + "\n")
    overrides = [
        "data=file",
        f"data.path={annotation}",
        f"data.root={video.parent}",
        *(f"encode.{k}={v}" for k, v in SAMPLING.items()),
    ]
    argv = [*overrides, f"encode.frame_cache_dir={tmp_path / 'c'}", "prepare.workers=1"]
    proc = subprocess.run(
        [sys.executable, "-m", "videollama3_train.prepare", *argv, "prepare.max_pixels_per_frame=1536"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # it writes nothing but the cache: no Hydra run directory, no log file
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout[proc.stdout.index("{") :])["written"] == 1
    assert fc.cached_size(tmp_path / "c", fc.cache_key(video, **SAMPLING)) == (32, 48)
    # nothing but the cache, and training's cost table beside the annotations (prepare.cost_table)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if ".costs.npy" not in n] == ["a.jsonl", "c"]
    assert any(n.startswith(".a.jsonl.") and n.endswith(".costs.npy") for n in names)
    with pytest.raises(ValueError, match="encode.frame_cache_dir"):
        compose("prepare", overrides)  # the cache folder is required


def test_encode_record_reads_the_cache_instead_of_decoding(tmp_path, video, monkeypatch):
    """After `prepare`, training's encode_record takes the video's frames from the cache (decode_video is never
    called) and produces the same tokens and nearly the same pixels as decoding."""
    from videollama3_train.data.encode import encode_record
    from videollama3_train.model.tokenizer import build_processor, build_tiny_tokenizer

    root = video.parent
    ann = tmp_path / "ann.jsonl"
    record = {
        "video": video.name,
        "conversations": [{"from": "human", "value": "<video>\nWhere?"}, {"from": "gpt", "value": "left"}],
    }
    ann.write_text(json.dumps(record) + "\n")
    cfg = EncodeConfig(max_visual_tokens=256, min_frames=2, max_frames=8, fps=1.0)
    processor = build_processor(build_tiny_tokenizer())
    decoded = encode_record(record, data_root=root, processor=processor, config=cfg)

    cached_cfg = EncodeConfig(
        max_visual_tokens=256, min_frames=2, max_frames=8, fps=1.0, frame_cache_dir=str(tmp_path / "cache")
    )
    counts = prepare(
        [(str(ann), str(root))], cached_cfg.frame_cache_dir, cached_cfg, num_workers=0, progress=False
    )
    assert counts["written"] == 1

    def no_decode(*a, **k):
        raise AssertionError("decode_video called although the frame cache holds the video")

    monkeypatch.setattr(media, "decode_video", no_decode)
    from_cache = encode_record(record, data_root=root, processor=processor, config=cached_cfg)
    assert from_cache["input_ids"].tolist() == decoded["input_ids"].tolist()
    assert from_cache["video_grid_thw"].tolist() == decoded["video_grid_thw"].tolist()
    # JPEG storage: normalised pixels in [-1, 1] differ by a few grey levels at most on average
    diff = (from_cache["pixel_values_videos"] - decoded["pixel_values_videos"]).abs().mean()
    assert float(diff) < 4 / 127.5
