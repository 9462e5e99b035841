"""Our encoder equals transformers' ``VideoLlama3Processor`` on the same frames and budgets.

The processor is built with budgets that make its sizes equal ours: images get ``max_pixels`` = our per-item token
budget times ``(14*merge)**2``; the video processor divides its pixel budget by the frame count, so it gets the
per-frame budget times T. Video frames are decoded at native size (``decode_scale=False``) with our decoder and
handed to the processor with a ``VideoMetadata`` whose timestamps equal ours.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mediagen import make_image, make_video
from transformers.video_utils import VideoMetadata

from videollama3_train.data import EncodeConfig, encode_record, media
from videollama3_train.data.annotations import normalize_record
from videollama3_train.data.text import render_chat
from videollama3_train.data.vision import per_item_tokens
from videollama3_train.model.tokenizer import build_processor, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _processor(tok, cfg: EncodeConfig, per_item: int, num_frames: int = 1):
    fi, fv = 14 * cfg.image_merge_size, 14 * cfg.video_merge_size
    return build_processor(
        tok,
        image_merge_size=cfg.image_merge_size,
        video_merge_size=cfg.video_merge_size,
        image_min_pixels=cfg.min_tokens_per_item * fi * fi,
        image_max_pixels=per_item * fi * fi,
        video_min_pixels=cfg.min_tokens_per_item * fv * fv,
        video_max_pixels=per_item * fv * fv * num_frames,
        use_token_compression=cfg.use_token_compression,
    )


def _reference(proc, record, data_root, cfg: EncodeConfig):
    """What transformers' processor makes of the record, fed the same decoded frames."""
    messages = normalize_record(record)["messages"]
    text = render_chat(messages)
    assert text == proc.tokenizer.apply_chat_template(messages, tokenize=False)
    images, videos, metas = [], [], []
    for m in messages:
        for it in m["content"]:
            if it["type"] == "image":
                images.append(media.load_image(data_root / it["path"]))
            elif it["type"] == "video":
                info = media.probe_video(data_root / it["path"])
                times = media.sample_frame_times(
                    info, fps=cfg.fps, max_frames=cfg.max_frames, min_frames=cfg.min_frames
                )
                frames, _ = media.decode_video(data_root / it["path"], times, info=info)
                videos.append(frames)
                # timestamps = frames_indices / fps: a fine clock makes them equal our sampled times
                metas.append(
                    VideoMetadata(
                        total_num_frames=info.num_frames,
                        fps=1000.0,
                        frames_indices=[round(t * 1000) for t in times],
                    )
                )
    kwargs = {}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs.update(videos=videos, video_metadata=metas, do_sample_frames=False)
    return proc(text=text, return_tensors="pt", **kwargs)


def _assert_same(ours: dict, ref) -> None:
    assert torch.equal(ours["input_ids"], ref["input_ids"][0])
    for key in ("image_grid_thw", "image_merge_sizes", "video_grid_thw", "video_merge_sizes"):
        assert (key in ours) == (key in ref), key
        if key in ours:
            assert torch.equal(ours[key], ref[key].to(ours[key].dtype)), key
    for key in ("pixel_values", "pixel_values_videos"):
        if key in ours:
            assert ours[key].dtype == torch.float32
            assert ours[key].shape == ref[key].shape, key
            torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=1e-5)
    if "video_compression_mask" in ours:
        assert torch.equal(ours["video_compression_mask"], ref["video_compression_mask"])


# (width, height): square, wide, tall, tiny (scaled up to the minimum), large (scaled down), odd sizes
IMAGE_SIZES = [(64, 64), (200, 50), (37, 150), (10, 12), (400, 300), (333, 97)]


@pytest.mark.parametrize("merge", [1, 2])
@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_single_image_parity(tmp_path, tok, size, merge):
    make_image(tmp_path / "a.png", size=size, pattern="noise")
    cfg = EncodeConfig(image_merge_size=merge, max_visual_tokens=64)
    rec = {
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Noise."}],
    }
    ours = encode_record(rec, data_root=tmp_path, processor=build_processor(tok), config=cfg)
    proc = _processor(tok, cfg, per_item_tokens(1, 64, cfg.min_tokens_per_item, cfg.max_tokens_per_item))
    _assert_same(ours, _reference(proc, rec, tmp_path, cfg))


def test_multi_image_parity(tmp_path, tok):
    sizes = [(120, 40), (30, 90), (64, 64)]
    for i, s in enumerate(sizes):
        make_image(tmp_path / f"{i}.jpg", size=s, pattern="gradient" if i % 2 else "noise")
    cfg = EncodeConfig(max_visual_tokens=120)
    rec = {
        "image": [f"{i}.jpg" for i in range(3)],
        "conversations": [
            {"from": "human", "value": "<image>\nfirst <image>\nsecond and <image> third"},
            {"from": "gpt", "value": "Three pictures."},
        ],
    }
    ours = encode_record(rec, data_root=tmp_path, processor=build_processor(tok), config=cfg)
    per = per_item_tokens(3, 120, cfg.min_tokens_per_item, cfg.max_tokens_per_item)
    _assert_same(ours, _reference(_processor(tok, cfg, per), rec, tmp_path, cfg))


VIDEO_CASES = [
    # width, height, seconds, fps, sampling fps, compression
    (64, 48, 5.0, 4.0, 1.0, False),
    (64, 48, 5.0, 4.0, 1.0, True),
    (96, 32, 3.0, 10.0, 2.0, True),
    (40, 80, 2.0, 6.0, 1.0, True),  # fewer seconds than min_frames: frames spread evenly
    (112, 112, 12.0, 2.0, 1.0, True),  # capped by max_frames
]


@pytest.mark.parametrize("case", VIDEO_CASES)
def test_video_parity(tmp_path, tok, case):
    w, h, seconds, fps, sample_fps, compress = case
    make_video(tmp_path / "v.mp4", w, h, seconds=seconds, fps=fps)
    cfg = EncodeConfig(
        max_visual_tokens=200,
        fps=sample_fps,
        max_frames=8,
        use_token_compression=compress,
        decode_scale=False,
    )
    rec = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "What moves?"}],
            },
            {"role": "assistant", "content": "A red square."},
        ]
    }
    ours = encode_record(rec, data_root=tmp_path, processor=build_processor(tok), config=cfg)
    t = int(ours["video_grid_thw"][0, 0])
    per = per_item_tokens(t, 200, cfg.min_tokens_per_item, cfg.max_tokens_per_item)
    _assert_same(ours, _reference(_processor(tok, cfg, per, num_frames=t), rec, tmp_path, cfg))
    if compress:  # a moving square on static bands: some tokens of later frames are pruned
        assert not bool(ours["video_compression_mask"].all())


def test_image_and_video_parity(tmp_path, tok):
    make_image(tmp_path / "a.png", size=(50, 70), pattern="corner")
    make_video(tmp_path / "v.webm", 64, 48, seconds=4.0, fps=5.0, codec="libvpx")
    cfg = EncodeConfig(max_visual_tokens=160, decode_scale=False, use_token_compression=True, max_frames=4)
    rec = {
        "image": "a.png",
        "video": "v.webm",
        "conversations": [
            {"from": "human", "value": "<video>\nand <image>\nsame scene?"},
            {"from": "gpt", "value": "No."},
        ],
    }
    ours = encode_record(rec, data_root=tmp_path, processor=build_processor(tok), config=cfg)
    t = int(ours["video_grid_thw"][0, 0])
    per = per_item_tokens(1 + t, 160, cfg.min_tokens_per_item, cfg.max_tokens_per_item)
    _assert_same(ours, _reference(_processor(tok, cfg, per, num_frames=t), rec, tmp_path, cfg))


def test_decode_scale_keeps_layout(tmp_path, tok):
    """Decode-time scaling changes pixels slightly, never sizes, ids or counts."""
    make_video(tmp_path / "v.mp4", 320, 240, seconds=4.0, fps=4.0)
    rec = {
        "video": "v.mp4",
        "conversations": [{"from": "human", "value": "<video>\n?"}, {"from": "gpt", "value": "Bands."}],
    }
    proc = build_processor(tok)
    exact = encode_record(
        rec, data_root=tmp_path, processor=proc, config=EncodeConfig(max_visual_tokens=64, decode_scale=False)
    )
    scaled = encode_record(rec, data_root=tmp_path, processor=proc, config=EncodeConfig(max_visual_tokens=64))
    assert torch.equal(exact["input_ids"], scaled["input_ids"])
    assert torch.equal(exact["video_grid_thw"], scaled["video_grid_thw"])
    diff = (exact["pixel_values_videos"] - scaled["pixel_values_videos"]).abs()
    # values are in [-1, 1]; two bicubic scalers agree to a few grey levels on smooth content
    assert float(diff.mean()) < 0.05
    assert np.isfinite(diff.numpy()).all()
