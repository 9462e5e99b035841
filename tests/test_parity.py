"""Train/serve parity: ``encode_record`` equals transformers' ``VideoLlama3Processor`` as inference calls it.

The processor is the one each stage exports (``run.build_stage_processor``, saved and reloaded with
``save_pretrained`` / ``AutoProcessor.from_pretrained``), called as the model's documentation calls it:
``apply_chat_template(conversation, fps=<the stage's fps>, tokenize=True, return_dict=True)`` with images and videos
given as file paths, so it decodes (torchcodec), samples, resizes and prunes by itself. For every stage's own
encode settings as `train` composes them (`config.compose`: every stage incl. `finetune`, with the 2B preset and with the `tiny` one) the two must give the
same ``input_ids``, grids, merge sizes and compression mask, and ``pixel_values`` within 1e-5.

Deliberate differences (the processor cannot do these) are tested as such in ``test_*_deviation``: a sample whose
items exceed ``max_visual_tokens`` together shares that budget (the processor sizes every item alone), and a
sample over ``max_length`` is rebudgeted (tested in test_encode.py).

Video tests need torchcodec (the processor's decoder); they skip without it, except under ``CI``, where they fail.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from mediagen import encoder_supports, make_video
from PIL import Image

from videollama3_train.data import DataError, EncodeConfig, encode_record, media
from videollama3_train.data.encode import plan_record, processor_settings
from videollama3_train.model.tokenizer import build_processor, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("encoder_adaptation", "alignment", "multitask_sft", "video_finetune", "finetune")


# ---------------------------------------------------------------------------------------------------------------
# stage configs and their exported processors
# ---------------------------------------------------------------------------------------------------------------
def stage_config(name: str) -> EncodeConfig:
    """``<stage>`` (the 2B preset) or ``<stage>+<model preset>``: the encode settings ``train`` composes (Hydra,
    ``config.compose``) for that stage and model, as a run gets them; composing builds no model."""
    from videollama3_train.config import compose

    stage, _, preset = name.partition("+")
    overrides = [f"stage={stage}", f"model={preset or 'videollama3_2b'}", "output_dir=/nonexistent/parity"]
    return compose("train", overrides).encode


CONFIGS = [*STAGES, *(f"{s}+tiny" for s in STAGES)]  # every stage x {2B, tiny}


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    """config name -> the processor that stage saves with its export, reloaded from disk."""
    from transformers import AutoProcessor

    from videollama3_train.run import build_stage_processor

    cache = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(name.replace("+", "_"))
            build_stage_processor(tok, stage_config(name)).save_pretrained(out)
            cache[name] = AutoProcessor.from_pretrained(out, local_files_only=True)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def torchcodec_ready():
    from transformers.utils.import_utils import is_torchcodec_usable

    if not is_torchcodec_usable(decode="video"):
        msg = "torchcodec (the processor's video decoder) is missing or cannot load FFmpeg"
        if os.environ.get("CI"):
            pytest.fail(msg + ": CI must run the video parity tests (scripts/setup_env.sh installs it)")
        pytest.skip(msg)


# ---------------------------------------------------------------------------------------------------------------
# media that look like photos and footage (smooth colour fields, hard edges, grain), made small
# ---------------------------------------------------------------------------------------------------------------
def _texture(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, h // 12), max(2, w // 12), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)
    for _ in range(3):  # hard-edged objects
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        img[y0 : y0 + max(1, h // 5), x0 : x0 + max(1, w // 6)] = rng.integers(0, 256, 3)
    img += rng.integers(-10, 11, img.shape, dtype=np.int16)  # sensor grain
    return np.clip(img, 0, 255).astype(np.uint8)


def photo(path: Path, w: int, h: int, seed: int = 0) -> Path:
    img = Image.fromarray(_texture(w, h, seed))
    img.save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
    return path


def footage(w: int, h: int, *, moving: bool = True, seed: int = 1):
    """Frame maker for ``make_video``: a still textured scene, with (``moving``) an object crossing it and its top
    quarter panning, so token pruning both keeps and drops tokens."""
    scene = _texture(2 * w, 2 * h, seed)

    def frame(i: int) -> np.ndarray:
        a = scene[:h, :w].copy()
        if not moving:
            return a
        band = max(1, h // 4)
        a[:band] = scene[:band, (3 * i) % w : (3 * i) % w + w]
        s = max(2, h // 4)
        x0 = (i * max(1, w // 10)) % max(1, w - s)
        a[h // 2 : h // 2 + s, x0 : x0 + s] = (230, 40, 40)
        return a

    return frame


# ---------------------------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------------------------
def _both(
    root: Path, items: list[tuple[str, str]], cfg_name: str, exported, question: str = "What is shown?"
):
    """Our sample and the processor's output for one user turn (``items``: (kind, file name) in order, then the
    question) and one assistant answer."""
    cfg = stage_config(cfg_name)
    proc = exported(cfg_name)
    ours_content = [{"type": k, k: name} for k, name in items] + [{"type": "text", "text": question}]
    conv_content = [{"type": k, k: str(root / name)} for k, name in items] + [
        {"type": "text", "text": question}
    ]
    answer = {"role": "assistant", "content": "A scene."}
    ours = encode_record(
        {"messages": [{"role": "user", "content": ours_content}, answer]},
        data_root=root,
        processor=proc,
        config=cfg,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on kwargs and deprecations, not ours
        ref = proc.apply_chat_template(
            [{"role": "user", "content": conv_content}, answer],
            fps=cfg.fps,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
    return ours, ref


def assert_same(ours: dict, ref) -> None:
    assert torch.equal(ours["input_ids"], ref["input_ids"][0]), "input_ids differ"
    for key in ("image_grid_thw", "image_merge_sizes", "video_grid_thw", "video_merge_sizes"):
        assert (key in ours) == (key in ref), key
        if key in ours:
            assert torch.equal(ours[key], ref[key].to(ours[key].dtype)), key
    if "video_compression_mask" in ref:
        assert torch.equal(ours["video_compression_mask"], ref["video_compression_mask"])
    for key in ("pixel_values", "pixel_values_videos"):
        assert (key in ours) == (key in ref), key
        if key in ours:
            assert ours[key].dtype == torch.float32 and ours[key].shape == ref[key].shape, key
            torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the exported processor samples as the stage trained
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_exported_processor_config(tok, exported, name):
    cfg = stage_config(name)
    vp, ip = exported(name).video_processor, exported(name).image_processor
    assert vp.do_sample_frames is True  # a video passed without `fps` is sampled, not taken whole
    assert (vp.fps, vp.max_frames, vp.min_frames) == (cfg.fps, cfg.max_frames, cfg.min_frames)
    assert vp.use_token_compression == cfg.use_token_compression
    assert (ip.merge_size, vp.merge_size) == (cfg.image_merge_size, cfg.video_merge_size)
    # the stage's processor is the one processor_settings describes (what encode_record sizes items by)
    ref = build_processor(tok, **processor_settings(cfg))
    assert vp.to_dict() == ref.video_processor.to_dict() and ip.to_dict() == ref.image_processor.to_dict()


def test_frame_sampling_rule_is_the_processors():
    """media.processor_frame_indices / prompt_timestamps equal VideoLlama3VideoProcessor.sample_frames and
    VideoMetadata.timestamps (formatted as the prompt writes them) over many videos and settings."""
    from transformers import VideoLlama3VideoProcessor
    from transformers.video_utils import VideoMetadata

    vp = VideoLlama3VideoProcessor()
    rng = np.random.default_rng(0)
    rates = [1.0, 5.0, 10.0, 23.976, 24.0, 25.0, 29.97, 30.0, 59.94, 7.3]
    for _ in range(400):
        total = int(rng.choice([1, 2, 3, 4, 5, 7, 9, 17, 30, 49, 97, 150, 299, 1000, 4321, 15200]))
        video_fps = float(rng.choice(rates))
        fps, lo = float(rng.choice([0.5, 1.0, 2.0, 3.0])), int(rng.choice([1, 2, 4, 8]))
        hi = int(rng.choice([lo, 8, 32, 180]))
        meta = VideoMetadata(total_num_frames=total, fps=video_fps)
        want = vp.sample_frames(meta, fps=fps, min_frames=lo, max_frames=hi)
        got = media.processor_frame_indices(total, video_fps, fps=fps, min_frames=lo, max_frames=hi)
        # the processor's only index past the last frame (it then fails at inference) is dropped
        assert got == [i for i in want.tolist() if i < total], (total, video_fps, fps, lo, hi)
        meta.frames_indices = want
        assert [f"{t:.1f}" for t in media.prompt_timestamps(got, video_fps)] == [
            f"{t:.1f}" for t in meta.timestamps
        ]


# ---------------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------------
IMAGES = [
    # (width, height, suffix, config): square, wide, tall, odd; below the minimum budget (scaled up); above the
    # maximum (scaled down: 2.1 MP at merge 1 for the full budget, 640x360 for the tiny preset); 200:1 exactly
    (64, 64, ".png", "encoder_adaptation"),
    (333, 97, ".jpg", "alignment"),
    (37, 150, ".png", "multitask_sft"),
    (10, 12, ".png", "video_finetune"),
    (10, 12, ".png", "encoder_adaptation+tiny"),
    (1920, 1092, ".jpg", "encoder_adaptation"),
    (640, 360, ".jpg", "multitask_sft+tiny"),
    (481, 271, ".jpg", "video_finetune+tiny"),
    (1000, 5, ".png", "alignment"),
    (6, 1200, ".png", "video_finetune"),
]


@pytest.mark.parametrize("case", IMAGES, ids=[f"{w}x{h}{s}-{c}" for w, h, s, c in IMAGES])
def test_image_parity(tmp_path, exported, case):
    w, h, suffix, name = case
    photo(tmp_path / f"a{suffix}", w, h)
    ours, ref = _both(tmp_path, [("image", f"a{suffix}")], name, exported)
    assert_same(ours, ref)


def test_aspect_over_200_refused_like_the_processor(tmp_path, exported):
    photo(tmp_path / "a.png", 1005, 5)
    with pytest.raises(DataError, match="bad_aspect_ratio"):
        _both(tmp_path, [("image", "a.png")], "alignment", exported)
    with pytest.raises(ValueError, match="aspect ratio"):
        exported("alignment").image_processor(images=[Image.open(tmp_path / "a.png")])


@pytest.mark.parametrize("name", ["alignment", "video_finetune", "multitask_sft+tiny"])
def test_multi_image_parity(tmp_path, exported, name):
    """Several images of one sample, together within max_visual_tokens: each gets the processor's size."""
    sizes = [(120, 40, ".jpg"), (30, 90, ".png"), (64, 64, ".jpg"), (90, 90, ".png")]
    for i, (w, h, s) in enumerate(sizes):
        photo(tmp_path / f"{i}{s}", w, h, seed=i)
    ours, ref = _both(tmp_path, [("image", f"{i}{s}") for i, (_, _, s) in enumerate(sizes)], name, exported)
    assert_same(ours, ref)


def test_multi_image_over_budget_deviation(tmp_path, exported):
    """Named deviation: images exceeding max_visual_tokens together share it (official rule); the processor,
    which sizes each image alone, gives them more tokens than the sample's budget."""
    name = "multitask_sft+tiny"  # 256 visual tokens
    for i in range(3):
        photo(tmp_path / f"{i}.jpg", 300, 200, seed=i)
    ours, ref = _both(tmp_path, [("image", f"{i}.jpg") for i in range(3)], name, exported)
    budget = stage_config(name).max_visual_tokens
    assert (
        int(ours["image_grid_thw"].prod(dim=1).sum()) <= budget < int(ref["image_grid_thw"].prod(dim=1).sum())
    )


# ---------------------------------------------------------------------------------------------------------------
# videos
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class V:
    id: str
    config: str
    w: int = 64
    h: int = 48
    seconds: float = 3.0
    fps: float = 10.0
    moving: bool = True
    suffix: str = ".mp4"
    kw: dict = dataclasses.field(default_factory=dict)  # make_video keywords: codec, rotation, keyframes, ...


VIDEOS = [
    V("480x272-scaled-down", "multitask_sft", 480, 272, 6.0, 10.0),
    V("29.97fps", "video_finetune", 96, 64, 9.7, 29.97, kw={"keyframe_interval_s": 4.0}),
    V("24fps-bframes", "alignment", 64, 48, 4.0, 24.0, kw={"bframes": 2}),
    V("capped-at-max-frames", "multitask_sft+tiny", 112, 80, 12.0, 5.0),
    V("shorter-than-min-frames", "video_finetune", 64, 48, 0.3, 10.0),
    V("one-frame", "multitask_sft", 64, 48, 0.1, 10.0),
    V("static", "multitask_sft", 96, 72, 4.0, 5.0, moving=False),
    V("static-tiny", "video_finetune+tiny", 96, 72, 3.0, 4.0, moving=False),
    V("rotated-90", "video_finetune", 64, 48, 2.0, 5.0, kw={"rotation": 90}),
    V("rotated-270-tiny", "alignment+tiny", 80, 48, 2.0, 6.0, kw={"rotation": 270}),
    V("rotated-180", "encoder_adaptation", 64, 48, 2.0, 5.0, kw={"rotation": 180}),
    V("keyframe-every-frame", "multitask_sft", 64, 48, 3.0, 8.0, kw={"keyframe_interval_s": 0.125}),
    V("vfr", "video_finetune", 64, 48, 3.0, 10.0, kw={"vfr": True}),
    V("vp8-webm", "multitask_sft+tiny", 70, 40, 3.0, 6.0, suffix=".webm", kw={"codec": "libvpx"}),
    V("mkv-tall", "encoder_adaptation+tiny", 40, 80, 2.5, 12.0, suffix=".mkv"),
    V("10bit", "video_finetune", 66, 48, 2.0, 5.0, kw={"pix_fmt": "yuv420p10le"}),
    V("mpeg4-avi", "alignment", 64, 48, 3.0, 4.0, suffix=".avi", kw={"codec": "mpeg4"}),
]


def _make(tmp_path: Path, v: V) -> str:
    codec, pix_fmt = v.kw.get("codec", "libx264"), v.kw.get("pix_fmt", "yuv420p")
    if not encoder_supports(codec, pix_fmt):
        pytest.skip(f"{codec} / {pix_fmt} not available in this FFmpeg build")
    # frames are stored as made; a rotated video is displayed turned, so make them in stored orientation
    name = f"v{v.suffix}"
    make_video(
        tmp_path / name,
        v.w,
        v.h,
        seconds=v.seconds,
        fps=v.fps,
        frames=footage(v.w, v.h, moving=v.moving),
        **v.kw,
    )
    return name


@pytest.mark.parametrize("v", VIDEOS, ids=[v.id for v in VIDEOS])
def test_video_parity(tmp_path, exported, torchcodec_ready, v):
    name = _make(tmp_path, v)
    ours, ref = _both(tmp_path, [("video", name)], v.config, exported)
    assert_same(ours, ref)
    mask, t = ours["video_compression_mask"], int(ours["video_grid_thw"][0, 0])
    if stage_config(v.config).use_token_compression and t > 1:
        per_frame = mask.numel() // t
        kept_later = int(mask[per_frame:].sum())  # frame 0 is always kept whole
        if v.moving:
            assert kept_later > t - 1  # changed tokens are kept beyond the one-token floor
        else:
            assert kept_later < (t - 1) * per_frame  # a still scene loses tokens


@pytest.mark.parametrize("v", [VIDEOS[1], VIDEOS[4], VIDEOS[12]], ids=["29.97fps", "short", "vfr"])
def test_frames_and_timestamps_are_the_processors(tmp_path, exported, torchcodec_ready, v):
    """The frames we decode and the timestamps we write are the ones the processor picks (its metadata)."""
    name = _make(tmp_path, v)
    cfg = stage_config(v.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = exported(v.config).video_processor(videos=[str(tmp_path / name)], fps=cfg.fps)[
            "video_metadata"
        ][0]
    info = media.probe_video(tmp_path / name)
    sample = media.sample_frames(info, fps=cfg.fps, max_frames=cfg.max_frames, min_frames=cfg.min_frames)
    assert sample.indices == [int(i) for i in meta.frames_indices]
    assert info.num_frames == meta.total_num_frames and info.average_fps == meta.fps
    assert [f"{t:.1f}" for t in sample.timestamps] == [f"{t:.1f}" for t in meta.timestamps]
    plan = plan_record(
        {
            "video": name,
            "conversations": [{"from": "human", "value": "<video>\n?"}, {"from": "gpt", "value": "."}],
        },
        data_root=tmp_path,
        processor=exported(v.config),
        config=cfg,
    )
    assert plan.media[0].times == sample.times


def test_processor_index_past_the_end_deviation(tmp_path, exported, torchcodec_ready):
    """Named deviation: for some lengths the processor's float32 frame range ends on an index one past the last
    frame and inference fails (a 230-frame 30 fps clip at fps 1); training keeps the other, in-range frames."""
    make_video(tmp_path / "v.mp4", 64, 48, seconds=230 / 30, fps=30.0, frames=footage(64, 48))
    with warnings.catch_warnings(), pytest.raises(IndexError, match="Invalid frame index=230"):
        warnings.simplefilter("ignore")
        exported("multitask_sft").video_processor(videos=[str(tmp_path / "v.mp4")], fps=1.0)
    rec = {
        "video": "v.mp4",
        "conversations": [{"from": "human", "value": "<video>\n?"}, {"from": "gpt", "value": "."}],
    }
    ours = encode_record(
        rec, data_root=tmp_path, processor=exported("multitask_sft"), config=stage_config("multitask_sft")
    )
    assert int(ours["video_grid_thw"][0, 0]) == 7


@pytest.mark.parametrize("name", CONFIGS)
def test_image_video_text_parity(tmp_path, exported, torchcodec_ready, name):
    """One conversation with an image, a video and text, under every stage's settings."""
    photo(tmp_path / "a.jpg", 150, 100)
    make_video(tmp_path / "v.mp4", 96, 64, seconds=5.0, fps=8.0, frames=footage(96, 64))
    ours, ref = _both(tmp_path, [("image", "a.jpg"), ("video", "v.mp4")], name, exported, "Same scene?")
    assert_same(ours, ref)


def test_decode_scale_opt_in_keeps_layout(tmp_path, exported, torchcodec_ready):
    """decode_scale (opt-in) changes pixels a little, never sizes, frames or text; the default is exact."""
    make_video(tmp_path / "v.mp4", 480, 272, seconds=4.0, fps=10.0, frames=footage(480, 272))
    cfg = stage_config("video_finetune")
    assert cfg.decode_scale is False
    proc = exported("video_finetune")
    rec = {
        "video": "v.mp4",
        "conversations": [{"from": "human", "value": "<video>\n?"}, {"from": "gpt", "value": "."}],
    }
    off = dataclasses.replace(
        cfg, use_token_compression=False, max_visual_tokens=64
    )  # 84x140: under half size
    exact = encode_record(rec, data_root=tmp_path, processor=proc, config=off)
    fast = encode_record(
        rec, data_root=tmp_path, processor=proc, config=dataclasses.replace(off, decode_scale=True)
    )
    assert torch.equal(exact["input_ids"], fast["input_ids"])
    assert torch.equal(exact["video_grid_thw"], fast["video_grid_thw"])
    diff = (exact["pixel_values_videos"] - fast["pixel_values_videos"]).abs()
    assert 0 < float(diff.mean()) < 0.05 and math.isfinite(float(diff.max()))


# ---------------------------------------------------------------------------------------------------------------
# the decoded bytes themselves, before any resize
# ---------------------------------------------------------------------------------------------------------------
def _encode_tagged(
    path: Path, w: int, h: int, pix_fmt: str, codec: str = "libx264", colorspace=None, color_range=None
):
    """A short clip with explicit colour tags (make_video writes none)."""
    from fractions import Fraction

    import av

    frame_of = footage(w, h)
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=Fraction(5))
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if colorspace is not None:
            s.codec_context.colorspace = colorspace
        if color_range is not None:
            s.codec_context.color_range = color_range
        for i in range(6):
            f = av.VideoFrame.from_ndarray(frame_of(i), format="rgb24")
            f.pts = i
            for pkt in s.encode(f):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
    return path


FORMATS = [
    # (id, width, height, pix_fmt, codec, colorspace, color_range, suffix); widths off and on a multiple of 32
    # (torchcodec converts those with swscale, others with a filter graph)
    ("420-bt709", 70, 48, "yuv420p", "libx264", 1, 1, ".mp4"),
    ("420-bt709-w64", 64, 48, "yuv420p", "libx264", 1, 1, ".mp4"),
    ("full-range", 70, 48, "yuvj420p", "libx264", None, None, ".mp4"),
    ("444", 64, 48, "yuv444p", "libx264", None, None, ".mp4"),
    ("422-bt601", 70, 48, "yuv422p", "libx264", 5, 1, ".mp4"),
    ("10bit-bt2020", 64, 48, "yuv420p10le", "libx264", 9, 1, ".mp4"),
    ("10bit", 66, 48, "yuv420p10le", "libx264", None, None, ".mp4"),
    ("vp9", 70, 48, "yuv420p", "libvpx-vp9", None, None, ".webm"),
    ("mjpeg", 64, 48, "yuvj420p", "mjpeg", None, None, ".avi"),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=[f[0] for f in FORMATS])
def test_decoded_frames_are_torchcodecs(tmp_path, torchcodec_ready, fmt):
    """Every frame decode_video returns at native size is byte-identical to torchcodec's (what the processor
    resizes): pixel formats, ranges and colour matrices, both torchcodec conversion paths."""
    from torchcodec.decoders import VideoDecoder

    name, w, h, pix_fmt, codec, colorspace, color_range, suffix = fmt
    if not encoder_supports(codec, pix_fmt):
        pytest.skip(f"{codec} / {pix_fmt} not available in this FFmpeg build")
    path = _encode_tagged(tmp_path / f"v{suffix}", w, h, pix_fmt, codec, colorspace, color_range)
    decoder = VideoDecoder(str(path), seek_mode="exact")
    info = media.probe_video(path)
    assert info.num_frames == decoder.metadata.num_frames and info.average_fps == decoder.metadata.average_fps
    theirs = decoder.get_frames_at(indices=list(range(info.num_frames))).data.permute(0, 2, 3, 1).numpy()
    ours, _ = media.decode_video(path, list(info.frame_times), info=info)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("name", ["alignment", "video_finetune+tiny"])
def test_system_and_multi_turn_parity(tmp_path, exported, torchcodec_ready, name):
    """A system turn, then two user turns (an image, then a video, each with a question) and two answers: the ids,
    grids, mask and pixels of the whole conversation equal the processor's rendering of it."""
    photo(tmp_path / "a.jpg", 150, 100)
    make_video(tmp_path / "v.mp4", 96, 64, seconds=5.0, fps=8.0, frames=footage(96, 64))
    cfg, proc = stage_config(name), exported(name)

    def conversation(media) -> list[dict]:
        return [
            {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
            {
                "role": "user",
                "content": [media("image", "a.jpg"), {"type": "text", "text": "What is shown?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A scene."}]},
            {"role": "user", "content": [media("video", "v.mp4"), {"type": "text", "text": "Same scene?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        ]

    ours = encode_record(
        {"messages": conversation(lambda k, f: {"type": k, k: f})},
        data_root=tmp_path,
        processor=proc,
        config=cfg,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = proc.apply_chat_template(
            conversation(lambda k, f: {"type": k, k: str(tmp_path / f)}),
            fps=cfg.fps,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
    assert_same(ours, ref)
    text = proc.tokenizer.decode(ours["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.count("<|im_start|>assistant\n") == 2


# ---------------------------------------------------------------------------------------------------------------
# the frame cache of `prepare` under token pruning
# ---------------------------------------------------------------------------------------------------------------
def _still_scene_with_square(w: int, h: int):
    """A still textured scene with a small red square crossing it: most tokens never change, so pruning drops
    them (a decoded still region is bit-identical from frame to frame), while the square's tokens are kept."""
    scene = _texture(w, h, seed=3)

    def frame(i: int) -> np.ndarray:
        a = scene.copy()
        s = h // 6
        x0 = (4 * i) % (w - s)
        a[h // 3 : h // 3 + s, x0 : x0 + s] = (230, 40, 40)
        return a

    return frame


@pytest.fixture
def pruned_clip(tmp_path, exported, torchcodec_ready):
    """(root, record, stage config, our direct-decode sample, the processor's output) for a stage-3 clip that the
    processor prunes to about half its tokens."""
    make_video(
        tmp_path / "v.mp4",
        96,
        72,
        seconds=4.0,
        fps=10.0,
        frames=_still_scene_with_square(96, 72),
        crf=4,
        keyframe_interval_s=4.0,
    )
    ours, ref = _both(tmp_path, [("video", "v.mp4")], "multitask_sft", exported)
    cfg = stage_config("multitask_sft")
    assert cfg.use_token_compression
    mask = ref["video_compression_mask"]
    per_frame = mask.numel() // int(ref["video_grid_thw"][0, 0])
    # not vacuous: the processor drops a good share of tokens, and keeps more than frame 0 + one per frame
    assert per_frame + 3 < int(mask.sum()) <= 0.75 * mask.numel()
    record = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "What is shown?"}],
            },
            {"role": "assistant", "content": "A scene."},
        ]
    }
    return tmp_path, record, cfg, ours, ref


def _encode_from_cache(root, record, cfg, proc, cache_dir, monkeypatch, *, decode_allowed: bool):
    """``encode_record`` with ``cfg`` reading ``cache_dir``: (sample, how many times the video was decoded)."""
    calls = []
    decode = media.decode_video

    def counted(*a, **k):
        if not decode_allowed:
            raise AssertionError("decode_video called although the frame cache holds the video")
        calls.append(1)
        return decode(*a, **k)

    monkeypatch.setattr(media, "decode_video", counted)
    cached_cfg = dataclasses.replace(cfg, frame_cache_dir=str(cache_dir))
    out = encode_record(record, data_root=root, processor=proc, config=cached_cfg)
    monkeypatch.setattr(media, "decode_video", decode)
    return out, len(calls)


def test_frame_cache_under_pruning_keeps_the_processors_tokens(pruned_clip, exported, monkeypatch):
    """`prepare` for a pruning stage stores lossless frames, so the compression mask and ids read from the cache
    equal the processor's (and direct decoding's). JPEG at quality 95 flipped 21 of 80 tokens on this clip."""
    from videollama3_train.data import frame_cache as fc
    from videollama3_train.data.prepare import prepare

    root, record, cfg, ours, ref = pruned_clip
    ann = root / "ann.jsonl"
    ann.write_text(json.dumps(record) + "\n")
    counts = prepare([(str(ann), str(root))], root / "cache", cfg, num_workers=0, progress=False)
    assert counts["written"] == 1
    key = fc.cache_key(root / "v.mp4", fps=cfg.fps, max_frames=cfg.max_frames, min_frames=cfg.min_frames)
    assert fc.cached_codec(root / "cache", key) in fc.LOSSLESS_CODECS
    cached, decodes = _encode_from_cache(
        root, record, cfg, exported("multitask_sft"), root / "cache", monkeypatch, decode_allowed=False
    )
    assert_same(cached, ref)
    assert torch.equal(cached["video_compression_mask"], ours["video_compression_mask"])


def test_pruning_stage_decodes_instead_of_reading_a_jpeg_entry(pruned_clip, exported, monkeypatch):
    """A JPEG entry (written for a stage without pruning) misses for a pruning stage, which decodes the video and
    so keeps the processor's tokens; then `prepare` for the pruning stage replaces the entry with a lossless one."""
    from videollama3_train.data.prepare import prepare

    root, record, cfg, _ours, ref = pruned_clip
    ann = root / "ann.jsonl"
    ann.write_text(json.dumps(record) + "\n")
    counts = prepare(
        [(str(ann), str(root))], root / "cache", cfg, num_workers=0, progress=False, codec="jpeg"
    )
    assert counts["written"] == 1
    cached, decodes = _encode_from_cache(
        root, record, cfg, exported("multitask_sft"), root / "cache", monkeypatch, decode_allowed=True
    )
    assert_same(cached, ref)  # read from the JPEG entry, 21 of the 80 tokens flip
    assert decodes == 1
    counts = prepare([(str(ann), str(root))], root / "cache", cfg, num_workers=0, progress=False)
    assert counts["written"] == 1  # the JPEG entry is upgraded, not kept as "existing"
    cached, _ = _encode_from_cache(
        root, record, cfg, exported("multitask_sft"), root / "cache", monkeypatch, decode_allowed=False
    )
    assert_same(cached, ref)
