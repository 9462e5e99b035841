"""The fast cost pass equals the exact one: token counts without tokenising, video frame times from the MP4 sample
table, and the whole cost table (failures included) against planning each record the slow way."""

from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from pathlib import Path

import av
import numpy as np
import pytest
from mediagen import make_audio_only, make_corrupt, make_image, make_video

from videollama3_train.data import video as video_mod
from videollama3_train.data.annotations import load_annotations
from videollama3_train.data.build import _cost_of
from videollama3_train.data.config import EncodeConfig
from videollama3_train.data.costs import compute_costs
from videollama3_train.data.encode import plan_record
from videollama3_train.data.text import TokenCounter

TEXTS = [
    "<|im_start|>user\nWhat's in the image? It's 3.14159 -- isn't it?<|im_end|>\n",
    "<|im_start|>assistant\n  leading and trailing spaces   \n\n\n\tTabs\r\nCRLF<|im_end|>\n",
    "Time 0.0s:<|video_pad|>,Time 1.0s:<|video_pad|>,Time 12.5s:<|video_pad|>\n",
    "WE'LL SEE, they've; I'm 'd 's:: ==>> [brackets] (x) 0123456789012345",
    "",
    " ",
    "<|im_start|><|im_end|><|image_pad|><|image_pad|>",
    "naïve café, 中文字符, emoji 🙂 and a control \x1f char",  # not ASCII: counted by the tokenizer itself
    "<|box_start|>(1,2)<|box_end|> a token the skeleton never writes",
]


def _tokenizers():
    from videollama3_train.model.tokenizer import build_qwen_tokenizer, build_tiny_tokenizer

    yield "tiny", build_tiny_tokenizer()
    try:
        qwen = build_qwen_tokenizer()
    except ImportError:
        return
    yield "qwen", qwen


@pytest.mark.parametrize("name", ["tiny", "qwen"])
def test_token_counter_equals_tokenizer(name):
    toks = dict(_tokenizers())
    if name not in toks:
        pytest.skip("the Qwen vocabulary is not installed")
    tok = toks[name]
    counter = TokenCounter.build(tok)
    assert counter is not None  # both shapes are replayed
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "42", "dogs", "barked", "loudly", "at", "7:30pm"]
    rng = np.random.default_rng(0)
    texts = TEXTS + [" ".join(rng.choice(words, int(rng.integers(1, 80)))) for _ in range(200)]
    for text in texts + texts:  # twice: the second pass counts from the memo
        assert counter(text) == len(tok(text, add_special_tokens=False)["input_ids"]), repr(text)


def test_token_counter_refuses_other_pipelines():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    assert TokenCounter.build(PreTrainedTokenizerFast(tokenizer_object=bpe)) is None
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.normalizer = normalizers.Lowercase()
    assert TokenCounter.build(PreTrainedTokenizerFast(tokenizer_object=bpe)) is None


# Every kind of video the suite generates (tests/mediagen.py): codecs, containers, B-frames, variable frame rate,
# rotation, audio, 10 bits, odd rates and sizes, one frame. `index`: whether the MP4 sample table is used (else the
# scan); `header`: whether the first frame is read from the MP4 boxes (else decoded).
VIDEOS = {
    "h264.mp4": ({}, True, True),
    "h264_gop.mp4": ({"seconds": 6.0, "keyframe_interval_s": 1.0}, True, True),
    "h264_b2.mp4": ({"bframes": 2}, False, False),
    "h264_vfr.mp4": ({"vfr": True}, True, True),
    "h264_vfr_b2.mp4": ({"vfr": True, "bframes": 2}, False, False),
    "h264_rot90.mp4": ({"rotation": 90}, True, True),
    "h264_rot180.mp4": ({"rotation": 180, "width": 66, "height": 38}, True, True),
    "h264_rot270.mov": ({"rotation": 270}, True, True),
    "h264_audio.mp4": ({"audio": True}, True, True),
    "h264_10bit.mp4": ({"pix_fmt": "yuv420p10le"}, True, True),
    "h264_230f.mp4": ({"seconds": 230 / 30, "fps": 30.0}, True, True),
    "h264_ntsc.mp4": ({"seconds": 2.0, "fps": 30000 / 1001}, True, True),
    "h264_1frame.mp4": ({"seconds": 0.1}, True, True),
    "h264.mov": ({}, True, True),
    "mpeg4.mp4": ({"codec": "mpeg4"}, True, True),
    "mpeg4_rot90.mp4": ({"codec": "mpeg4", "rotation": 90}, True, True),
    "mpeg4_b2.mp4": ({"codec": "mpeg4", "bframes": 2}, False, False),
    "h264.mkv": ({}, False, False),
    "vp8.webm": ({"codec": "libvpx"}, False, False),
}


def _fast_paths(path) -> tuple[bool, bool]:
    """(sample table used, first frame read from the boxes)."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        header = video_mod.header_first_frame(c, s, str(path))
        first = next(c.decode(s))
        return video_mod.index_times(c, s, first.pts) is not None, header is not None


def _assert_same_info(fast, exact) -> None:
    for f in dataclasses.fields(fast):
        a, b = getattr(fast, f.name), getattr(exact, f.name)
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            assert a is not None and b is not None and np.array_equal(a, b), f.name
        else:
            assert a == b, f.name


@pytest.mark.parametrize("name", list(VIDEOS))
def test_video_metadata_agrees_with_packet_scan(tmp_path, name):
    """The probe from the sample table and the MP4 boxes equals the packet scan + decoded first frame."""
    kwargs, expect_index, expect_header = VIDEOS[name]
    path = make_video(tmp_path / name, **{"seconds": 2.0, "fps": 10.0, **kwargs})
    _assert_same_info(video_mod.probe_video(path), video_mod.probe_video(path, index=False))
    assert _fast_paths(path) == (expect_index, expect_header)


def _set_matrix(path, box: bytes, degrees: int) -> None:
    """Overwrite the display matrix of the first ``mvhd`` / ``tkhd`` box of an MP4 file in place (version 0)."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.index(box) + 4 + 4 + (32 if box == b"mvhd" else 36)
    one, zero = 1 << 16, 0
    cos, sin = {90: (zero, one), 180: (-one, zero), 270: (zero, -one)}[degrees]
    data[at : at + 36] = struct.pack(">9i", cos, sin, 0, -sin, cos, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("movie, track", [(90, None), (90, 90), (270, 180)])
def test_display_matrix_of_movie_and_track_composed_as_ffmpeg_does(tmp_path, movie, track):
    """FFmpeg multiplies the track matrix by the movie header's; the boxes' rotation equals the decoded frame's."""
    path = make_video(tmp_path / "m.mp4", width=66, height=38, seconds=1.0, fps=10.0)
    _set_matrix(path, b"mvhd", movie)
    if track is not None:
        _set_matrix(path, b"tkhd", track)
    fast, exact = video_mod.probe_video(path), video_mod.probe_video(path, index=False)
    _assert_same_info(fast, exact)
    assert _fast_paths(path) == (True, True)
    assert fast.rotation == (movie + (track or 0)) % 360


def test_h264_orientation_sei_found_or_unknown():
    """A display orientation SEI (payload type 47) in the first sample sends the probe to decoding."""
    from videollama3_train.data import mp4

    sei = lambda *msgs: bytes([0x06, *(b for t, p in msgs for b in (t, len(p), *p)), 0x80])  # noqa: E731
    nal = lambda body: len(body).to_bytes(4, "big") + body  # noqa: E731
    slice_nal = nal(bytes([0x65, 0x88, 0x84]))
    assert mp4.h264_orientation_sei(nal(sei((5, b"x264"))) + slice_nal, 4) is False
    assert (
        mp4.h264_orientation_sei(nal(sei((5, b"abc"), (47, b"\x00\x00\x03\x01\x02"))) + slice_nal, 4) is True
    )
    assert mp4.h264_orientation_sei(nal(sei((47, b"\x80"))), 4) is True
    assert mp4.h264_orientation_sei(nal(sei((5, b"abc")))[:-2], 4) is None  # truncated: unknown
    assert mp4.h264_orientation_sei(nal(bytes([0x06, 5, 200, 1])), 4) is None  # a payload past the NAL's end


def _write_mixed_set(root) -> tuple:
    """A small mixed dataset of every record kind, bad ones included; returns (annotation file, n)."""
    (root / "m").mkdir()
    recs = []
    conv = lambda tag, q, a: [{"from": "human", "value": tag + q}, {"from": "gpt", "value": a}]  # noqa: E731
    for k, (size, mode, exif) in enumerate(
        [((300, 200), "RGB", None), ((1000, 720), "RGB", 6), ((64, 700), "L", None), ((40, 30), "RGBA", None)]
    ):
        suffix = ".png" if mode == "RGBA" else ".jpg"
        make_image(root / "m" / f"i{k}{suffix}", size, mode, pattern="gradient", exif_orientation=exif)
        recs.append(
            {"image": f"m/i{k}{suffix}", "conversations": conv("<image>\n", "What is it?", "A ramp. " * k)}
        )
    for name, (kwargs, _, _) in VIDEOS.items():
        make_video(root / "m" / name, **{"seconds": 2.0, "fps": 10.0, **kwargs})
        recs.append({"video": [f"m/{name}"], "conversations": conv("<video>\n", "Describe.", "It moves.")})
    recs.append(
        {"video": ["m/h264.mp4"], "start": 0.5, "end": 1.5, "conversations": conv("<video>\n", "Q", "A")}
    )
    for i in range(12):
        recs.append({"conversations": conv("", f"question {i} " * (i + 1), "answer, it's " * (3 * i + 1))})
    recs.append({"conversations": conv("", "naïve café 中文", "ünïcode answer")})
    # bad records: every reason the cost pass can meet
    make_corrupt(root / "m" / "bad.jpg", source=root / "m" / "i0.jpg", keep=0.01)
    make_corrupt(root / "m" / "bad.mp4", source=root / "m" / "h264.mp4", keep=0.3)
    make_audio_only(root / "m" / "sound.mp4")
    (root / "m" / "empty.jpg").write_bytes(b"")
    for path, kind in [
        ("m/bad.jpg", "image"),
        ("m/bad.mp4", "video"),
        ("m/sound.mp4", "video"),
        ("m/empty.jpg", "image"),
        ("m/missing.jpg", "image"),
        ("../outside.jpg", "image"),
    ]:
        recs.append(
            {kind: path if kind == "image" else [path], "conversations": conv(f"<{kind}>\n", "Q", "A")}
        )
    recs.append({"image": "m/i0.jpg", "conversations": conv("", "no placeholder", "A")})
    recs.append({"conversations": [{"from": "human", "value": "only a question"}]})
    recs.append({"conversations": conv("", "long " * 3000, "answer")})  # over max_length
    ann = root / "train.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return ann, len(recs)


def _slow_cost(row, *, root, processor, config):
    """Today's cost, planned the slow way: the text tokenised, every video's packets scanned."""
    return plan_record(row, data_root=root, processor=processor, config=config, dataset="d").cost


@pytest.fixture(scope="module")
def mixed_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    ann, n = _write_mixed_set(root)
    return root, load_annotations(ann, cache_dir=str(root / "hf")), n


@pytest.mark.parametrize("policy", ["rebudget", "truncate", "drop"])
def test_cost_table_equals_slow_planning(mixed_set, tiny_processor, monkeypatch, policy):
    tmp_path, ds, n = mixed_set
    enc = EncodeConfig(max_length=2048, length_policy=policy, max_visual_tokens=1024)
    fast = compute_costs(
        ds,
        partial(_cost_of, root=tmp_path, processor=tiny_processor, config=enc, dataset="d"),
        progress=False,
    )
    monkeypatch.setattr(video_mod, "index_times", lambda *a: None)
    monkeypatch.setattr(video_mod, "header_first_frame", lambda *a: None)
    slow = compute_costs(
        ds, partial(_slow_cost, root=tmp_path, processor=tiny_processor, config=enc), progress=False
    )
    assert fast.costs.shape == (n, 2)
    np.testing.assert_array_equal(fast.costs, slow.costs)
    assert fast.failures == slow.failures  # same records, same reasons, same messages
    reasons = set(fast.reason_counts())
    assert {"corrupt_image", "corrupt_video", "no_video_stream", "empty_file", "missing_file"} <= reasons
    assert (fast.costs[:, 0] > 0).sum() >= n - len(fast.failures)


def test_cost_pass_split_over_two_ranks_equals_one_process(mixed_set, tiny_processor, tmp_path):
    """2 processes (torchrun, gloo) each cost half the records; both end with the one-process table and
    failures, one cache file is written, and a second pass reads it on both ranks."""
    from helpers import torchrun

    root, ds, n = mixed_set
    ann = root / "train.jsonl"
    enc = EncodeConfig(max_length=2048, max_visual_tokens=1024)
    one = compute_costs(
        ds, partial(_cost_of, root=root, processor=tiny_processor, config=enc, dataset="d"), progress=False
    )
    torchrun(2, ["tests/costs_worker.py", str(ann), str(root), str(tmp_path)], timeout=300)
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"table_rank{rank}.npy"), one.costs)
        failures = json.loads((tmp_path / f"failures_rank{rank}.json").read_text())
        assert {int(i): tuple(v) for i, v in failures.items()} == one.failures
        assert (tmp_path / f"hit_rank{rank}").read_text() == "1"
    assert len(list((tmp_path / "cache").glob("*.costs.npy"))) == 1
    costed = [int((tmp_path / f"costed_rank{rank}").read_text()) for rank in (0, 1)]
    assert sum(costed) == n and max(costed) < n  # once per job: each record costed by one rank


def test_cost_cache_falls_back_to_run_dir_when_read_only(tmp_path, monkeypatch):
    from videollama3_train.data.costs import cost_cache

    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    ann = data / "train.jsonl"
    ann.write_text("{}\n")
    tok = type("Tok", (), {"__len__": lambda self: 10})()
    beside, key = cost_cache(ann, EncodeConfig(), tok, fallback_dir=run)
    assert beside.parent == data
    # a read-only folder (root ignores permission bits, so the check itself is made to say so)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == data else real_access(p, mode))
    moved, key2 = cost_cache(ann, EncodeConfig(), tok, fallback_dir=run)
    assert moved == run / beside.name and key2 == key
    beside.write_bytes(
        b""
    )  # a table already beside the annotations (written before the folder became read-only)
    assert cost_cache(ann, EncodeConfig(), tok, fallback_dir=run)[0] == beside
    assert (
        cost_cache(ann, EncodeConfig(), tok, cache_dir=tmp_path / "c", fallback_dir=run)[0].parent
        == tmp_path / "c"
    )


@pytest.mark.parametrize("size", [(28, 56), (56, 28)])  # at the frames' size, and resized
def test_normalized_patches_equal_two_step_form(size):
    """The one-float-copy encode path (``normalized_patches``) is bit-identical to normalising then patchifying,
    over chunk boundaries (11 frames, chunks of 4) and on a permuted (non-contiguous) view."""
    import torch

    from videollama3_train.data.vision import normalized_patches, patchify, resize_and_normalize

    g = torch.Generator().manual_seed(0)
    hwc = torch.randint(0, 256, (11, 28, 56, 3), dtype=torch.uint8, generator=g)
    frames = hwc.permute(0, 3, 1, 2)  # a view, as encode passes decoded frames
    mean, std = (0.48, 0.45, 0.4), (0.27, 0.26, 0.28)
    want = patchify(resize_and_normalize(frames.contiguous(), size, mean=mean, std=std), merge_size=2)
    got = normalized_patches(frames, size, mean=mean, std=std, merge_size=2, chunk=4)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_token_counter_forgets_at_its_limit(tiny_tokenizer, monkeypatch):
    from videollama3_train.data import text

    monkeypatch.setattr(text, "_MEMO_LIMIT", 3)
    counter = TokenCounter.build(tiny_tokenizer)
    for t in TEXTS[:4] * 2:
        assert counter(t) == len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"])
    assert len(counter._memo) <= 3
