"""The bad-data catalogue on the training path: every item is skipped, counted and logged, never fatal.

``tests/test_encode.py`` / ``tests/test_media.py`` check that each problem raises the right ``DataError``; here each
catalogue item rides in a micro-batch between two good samples through the real ``PackedLoader`` +
``DatasetEncoder(encode_record)``: the bad sample is dropped under its reason with one log line naming dataset,
record and file, and the good ones still come out. Items that must WORK (one-frame / VFR / rotated / 10-bit video,
unusual image modes) come out as samples. Then the aborting rule of ``data.build.build_train_data``.

The pre-pass normally keeps cost-detectable bad records out of the packing plan; the loader still has to survive
them (a media file replaced or deleted after the cost cache was written, or a truncated image, which only
decoding reveals), which is what these micro-batches simulate.

``build_catalogue`` is shared with ``tests/test_doctor.py``.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from mediagen import (
    encoder_supports,
    make_audio_only,
    make_corrupt,
    make_frame_folder,
    make_image,
    make_video,
)

from videollama3_train.data import DataError, EncodeConfig, encode_record
from videollama3_train.data.loader import DatasetEncoder, PackedLoader
from videollama3_train.data.packing import PackPlan

# One config for every micro-batch: `drop` makes an over-long sample fail instead of being shrunk.
CFG = dict(length_policy="drop", max_length=512, max_visual_tokens=64, max_frames=4, min_frames=1)


def conv(question: str, answer: str = "Fine.") -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@dataclass
class Item:
    name: str
    record: dict[str, Any]
    reason: str | None  # None: must encode
    file: str | None = None  # file name the error must mention


# ---------------------------------------------------------------------------------------------------------------
# generated media
# ---------------------------------------------------------------------------------------------------------------


def make_keyless_video(path: Path, source: Path) -> Path:
    """``source`` (H.264) remuxed without its keyframes: a valid container whose stream decodes to no frame."""
    with av.open(str(source)) as src, av.open(str(path), "w") as dst:
        ist = src.streams.video[0]
        ost = dst.add_stream_from_template(ist)
        for packet in src.demux(ist):
            if packet.size == 0 or packet.is_keyframe:
                continue
            packet.stream = ost
            dst.mux(packet)
    return path


def make_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width x height`` RGB pixels and holds none: the pixel guard must fire on the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def build_catalogue(root: Path) -> list[Item]:
    """Write every catalogue item's media under ``root`` (plus one file beside it) and return the items."""
    root.mkdir(parents=True, exist_ok=True)
    make_image(root / "good.png", size=(32, 24), pattern="noise")
    make_image(root / "big.jpg", size=(64, 64), pattern="noise")
    make_image(root / "big.png", size=(64, 64), pattern="noise")
    make_corrupt(root / "trunc.jpg", source=root / "big.jpg", keep=0.5)
    make_corrupt(root / "trunc.png", source=root / "big.png", keep=0.5)
    (root / "zero.jpg").write_bytes(b"")
    make_video(root / "good.mp4", 64, 48, seconds=2.0, fps=4.0, keyframe_interval_s=4.0)
    make_corrupt(root / "broken.mp4", source=root / "good.mp4", keep=0.5)
    make_audio_only(root / "audio.mp4")
    make_keyless_video(root / "keyless.mkv", root / "good.mp4")
    make_video(root / "one.mp4", 64, 48, seconds=0.1, fps=10.0)
    make_video(root / "vfr.mp4", 64, 48, seconds=2.0, fps=10.0, vfr=True)
    make_video(root / "rot.mp4", 64, 48, seconds=1.0, fps=4.0, rotation=90)
    make_frame_folder(root / "frames", n=6, size=(64, 48))
    for mode, name in (("L", "gray.png"), ("CMYK", "cmyk.jpg"), ("I;16", "i16.png"), ("RGBA", "rgba.png")):
        make_image(root / name, size=(40, 30), mode=mode, pattern="gradient")
    make_image(root / "palette.png", size=(40, 30), mode="P", pattern="gradient")
    make_image(root / "thin.png", size=(1, 4000), mode="L")
    make_png_header(root / "huge.png", 20000, 20000)
    (root.parent / "outside.png").write_bytes((root / "good.png").read_bytes())
    # a shared dataset folder elsewhere, linked into the media root (how clusters share datasets)
    shared = root.parent / "shared_datasets"
    shared.mkdir(exist_ok=True)
    make_image(shared / "linked.png", size=(32, 24), pattern="noise")
    (root / "shared").symlink_to(shared, target_is_directory=True)

    def img(name: str, reason: str | None, file: str | None = None) -> Item:
        return Item(
            name, {"image": file or name, "conversations": conv("<image>\nWhat?")}, reason, file or name
        )

    def vid(name: str, reason: str | None) -> Item:
        return Item(name, {"video": name, "conversations": conv("<video>\nWhat?")}, reason, name)

    items = [
        img("nope.png", "missing_file"),
        img("zero.jpg", "empty_file"),
        img("trunc.jpg", "corrupt_image"),
        img("trunc.png", "corrupt_image"),
        vid("broken.mp4", "corrupt_video"),
        vid("audio.mp4", "no_video_stream"),
        vid("keyless.mkv", "no_frames"),
        vid("one.mp4", None),
        vid("vfr.mp4", None),
        vid("rot.mp4", None),
        vid("frames", None),  # a frame folder: 6 files at 3 fps (the official clock) -> 2 frames at fps 1
        img("gray.png", None),
        img("cmyk.jpg", None),
        img("i16.png", None),
        img("rgba.png", None),
        img("palette.png", None),
        img("thin.png", "bad_aspect_ratio"),
        img("huge.png", "image_too_large"),
        Item(
            "outside",
            {"image": "../outside.png", "conversations": conv("<image>\nq")},
            "path_escapes_root",
            "outside.png",
        ),
        # a path inside the root through a link the dataset owner made: followed (data.follow_symlinks=true)
        img("linked", None, "shared/linked.png"),
        # `..` through the link climbs out of the root as written: refused whatever the link's target
        img("linked_escape", "path_escapes_root", "shared/../../outside.png"),
        Item(
            "placeholders",
            {"image": ["good.png", "good.png"], "conversations": conv("<image>\nonly one tag")},
            "placeholder_mismatch",
        ),
        Item(
            "empty_assistant",
            {"image": "good.png", "conversations": conv("<image>\nq", "  ")},
            "empty_assistant",
        ),
        Item(
            "unknown_role",
            {"conversations": [{"from": "robot", "value": "beep"}, {"from": "gpt", "value": "boop"}]},
            "unknown_role",
        ),
        Item("too_long", {"conversations": conv("word " * 2000)}, "too_long"),
        # the official code reads a folder under `image` as one image per file; not supported here
        Item(
            "image_folder",
            {"image": "frames", "conversations": conv("<image>\nWhat?")},
            "unsupported_image_folder",
            "frames",
        ),
        # the official code's streaming format (`_convert_stream`)
        Item(
            "streaming",
            {
                "video": ["good.mp4"],
                "stream": True,
                "start_time": 0.0,
                "end_time": 2.0,
                "conversation": [{"role": "user", "content": "Say when.", "time": 1.0}],
            },
            "unsupported_streaming",
        ),
    ]
    if encoder_supports("libx264", "yuv420p10le"):
        make_video(root / "ten.mp4", 64, 48, seconds=1.0, fps=4.0, pix_fmt="yuv420p10le")
        items.append(vid("ten.mp4", None))
    return items


GOOD_TEXT = {"conversations": conv("Hi?", "Hello.")}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> tuple[Path, dict[str, Item]]:
    root = tmp_path_factory.mktemp("catalogue") / "media"
    return root, {it.name: it for it in build_catalogue(root)}


def run_micro_batch(
    root: Path, record: dict, processor, caplog, **encode: Any
) -> tuple[list[dict], PackedLoader]:
    """One micro-batch ``[good text, record, good image]`` of dataset 'cat' through the training loader."""
    records = [GOOD_TEXT, record, {"image": "good.png", "conversations": conv("<image>\nq")}]
    encoder = DatasetEncoder(
        [records],
        [str(root)],
        ["cat"],
        encode_record,
        processor=processor,
        config=EncodeConfig(**CFG, **encode),
    )
    plan = PackPlan.from_slots(
        [[[0, 1, 2]]],
        costs=np.ones((3, 2), dtype=np.int64),
        max_tokens=4096,
        max_patches=4096,
        entries=[(0, 0), (0, 1), (0, 2)],
    )
    loader = PackedLoader(plan, 0, encoder, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="videollama3_train.data.loader"):
        batches = list(loader)
    return batches, loader


def _bad_names() -> list[str]:
    return [
        "nope.png",
        "zero.jpg",
        "trunc.jpg",
        "trunc.png",
        "broken.mp4",
        "audio.mp4",
        "keyless.mkv",
        "thin.png",
        "huge.png",
        "outside",
        "linked_escape",
        "placeholders",
        "empty_assistant",
        "unknown_role",
        "too_long",
        "image_folder",
        "streaming",
    ]


@pytest.mark.parametrize("name", _bad_names())
def test_bad_item_is_skipped_counted_and_logged(catalogue, tiny_processor, caplog, name):
    root, items = catalogue
    item = items[name]
    batches, loader = run_micro_batch(root, item.record, tiny_processor, caplog)
    # the good samples of the same micro-batch still come out, in one packed row
    assert len(batches) == 1 and not batches[0].get("empty")
    assert [m["index"] for m in batches[0]["meta"]] == [0, 2]
    assert loader.skipped == {item.reason: 1}
    lines = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert len(lines) == 1, lines
    line = lines[0]
    assert f"[{item.reason}]" in line and "dataset 'cat'" in line and "record 1" in line, line
    if item.file is not None:  # record-level problems (roles, turns, length) concern no media file
        assert item.file in line, line


@pytest.mark.parametrize("name", ["one.mp4", "vfr.mp4", "rot.mp4", "ten.mp4", "frames"])
def test_unusual_video_works(catalogue, tiny_processor, caplog, name):
    root, items = catalogue
    if name not in items:
        pytest.skip("libx264 with yuv420p10le is not available in this FFmpeg build")
    batches, loader = run_micro_batch(root, items[name].record, tiny_processor, caplog)
    assert loader.skipped == {}
    batch = batches[0]
    assert [m["index"] for m in batch["meta"]] == [0, 1, 2]
    t, h, w = batch["video_grid_thw"][0].tolist()
    if name == "one.mp4":
        assert t == 1  # a single frame is a valid (short) video, not a failure
    if name == "frames":
        assert t == 2  # 6 files are 2 s at the official 3 fps: files 1 and 4 at fps 1
    if name == "rot.mp4":
        assert h > w  # stored 64x48 with a 90 degree display matrix: the sample is the upright 48x64 portrait
    else:
        assert w > h


@pytest.mark.parametrize("name", ["gray.png", "cmyk.jpg", "i16.png", "rgba.png", "palette.png"])
def test_unusual_image_mode_works(catalogue, tiny_processor, caplog, name):
    root, items = catalogue
    batches, loader = run_micro_batch(root, items[name].record, tiny_processor, caplog)
    assert loader.skipped == {}
    batch = batches[0]
    assert [m["index"] for m in batch["meta"]] == [0, 1, 2]
    assert batch["pixel_values"].dtype == torch.float32 and batch["image_grid_thw"].shape == (2, 3)
    assert bool(batch["pixel_values"].isfinite().all())


def test_symlinked_dataset_folder(catalogue, tiny_processor, caplog):
    """A folder linked into the media root is followed by default; data.follow_symlinks=false refuses it as
    path_escapes_root, naming the record's file (today's strict check)."""
    root, items = catalogue
    record = items["linked"].record
    batches, loader = run_micro_batch(root, record, tiny_processor, caplog)
    assert loader.skipped == {} and [m["index"] for m in batches[0]["meta"]] == [0, 1, 2]
    caplog.clear()
    batches, loader = run_micro_batch(root, record, tiny_processor, caplog, follow_symlinks=False)
    assert loader.skipped == {"path_escapes_root": 1}
    assert [m["index"] for m in batches[0]["meta"]] == [0, 2]
    (line,) = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert "shared/linked.png" in line and "record 1" in line, line


def test_all_bad_micro_batch_yields_an_empty_marker(catalogue, tiny_processor, caplog):
    root, items = catalogue
    records = [items["nope.png"].record, items["trunc.png"].record]
    encoder = DatasetEncoder(
        [records], [str(root)], ["cat"], encode_record, processor=tiny_processor, config=EncodeConfig(**CFG)
    )
    plan = PackPlan.from_slots(
        [[[0, 1]]], np.ones((2, 2), dtype=np.int64), 4096, 4096, entries=[(0, 0), (0, 1)]
    )
    loader = PackedLoader(plan, 0, encoder, num_workers=0)
    (batch,) = list(loader)
    # ranks stay in lock-step: the trainer gets a marker, not a silently substituted sample
    assert batch["empty"] and batch["num_skipped"] == 2
    assert loader.skipped == {"missing_file": 1, "corrupt_image": 1}


def test_non_utf8_annotation_names_the_line(tmp_path):
    from videollama3_train.data import load_annotations

    path = tmp_path / "ann.jsonl"
    good = json.dumps({"conversations": conv("Hi?")}).encode()
    path.write_bytes(good + b"\n" + good.replace(b"Hi?", b"H\xff\xfei?") + b"\n")
    with pytest.raises(Exception) as e:
        load_annotations(path, cache_dir=str(tmp_path / "cache"))
    chain, err = [], e.value
    while err is not None:  # datasets may wrap the generator's error
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert any(isinstance(x, DataError) and x.reason == "bad_text" and "line 2" in str(x) for x in chain)


# ---------------------------------------------------------------------------------------------------------------
# the aborting rule of build_train_data
# ---------------------------------------------------------------------------------------------------------------


def _run_config(tmp_path: Path, ann: Path, root: Path, max_bad_fraction: float):
    from videollama3_train.config import RunConfig
    from videollama3_train.data.config import DataConfig, DatasetConfig
    from videollama3_train.model.core import ModelConfig

    return RunConfig(
        stage="multitask_sft",
        output_dir=str(tmp_path / "out"),
        model=ModelConfig(preset="tiny", tokenizer="tiny"),
        encode=EncodeConfig(**CFG),
        data=DataConfig(
            datasets={"cat": DatasetConfig(path=str(ann), root=str(root))},
            max_tokens=2048,
            max_patches=4096,
            num_workers=0,
            cost_workers=0,
            cost_cache=False,
            max_bad_fraction=max_bad_fraction,
        ),
    )


@pytest.fixture(scope="module")
def mixed_annotations(catalogue, tmp_path_factory) -> Path:
    """8 good records, a truncated PNG (only decoding finds it) and two cost-detectable bad records."""
    root, items = catalogue
    good = [GOOD_TEXT, {"image": "good.png", "conversations": conv("<image>\nq")}] * 4
    bad = [items["trunc.png"].record, items["nope.png"].record, items["unknown_role"].record]
    ann = tmp_path_factory.mktemp("ann") / "mixed.jsonl"
    ann.write_text("\n".join(json.dumps(r) for r in good + bad) + "\n")
    return ann


def test_build_train_data_aborts_above_max_bad_fraction(
    catalogue, mixed_annotations, tmp_path, tiny_processor
):
    from videollama3_train.data.build import build_train_data

    root, _ = catalogue
    cfg = _run_config(tmp_path, mixed_annotations, root, max_bad_fraction=0.1)  # 2 of 11 fail the pre-pass
    with pytest.raises(RuntimeError) as e:
        build_train_data(
            cfg.data,
            cfg.encode,
            tiny_processor,
            grad_accum=cfg.trainer.grad_accum,
            rank=0,
            world_size=1,
            is_main=True,
        )
    msg = str(e.value)
    assert "'cat'" in msg and "missing_file" in msg and "unknown_role" in msg and "max_bad_fraction" in msg


def test_build_train_data_below_threshold_trains_on_the_good(
    catalogue, mixed_annotations, tmp_path, tiny_processor, caplog
):
    from videollama3_train.data.build import build_train_data

    root, _ = catalogue
    cfg = _run_config(tmp_path, mixed_annotations, root, max_bad_fraction=0.5)
    bundle = build_train_data(
        cfg.data,
        cfg.encode,
        tiny_processor,
        grad_accum=cfg.trainer.grad_accum,
        rank=0,
        world_size=1,
        is_main=True,
    )
    assert bundle.failures == {"cat": {"missing_file": 1, "unknown_role": 1}}
    with caplog.at_level(logging.WARNING, logger="videollama3_train.data.loader"):
        batches = list(bundle.loader)
    seen = sorted(m["index"] for b in batches for m in b["meta"])
    # every good record is trained on; the truncated PNG passed the header-only pre-pass and is skipped at decode
    assert seen == list(range(8))
    assert bundle.loader.skipped == {"corrupt_image": 1}
    assert any("trunc.png" in r.getMessage() and "record 8" in r.getMessage() for r in caplog.records)


def test_loader_aborts_once_failures_pass_max_bad_fraction(catalogue, tiny_processor):
    """A few bad files are skipped; a broken dataset stops the run with a message naming the reasons and the
    config key, instead of training on what is left."""
    root, items = catalogue
    good = items["gray.png"].record
    bad = items["nope.png"].record
    records = [good, bad, good, bad, good, good]
    encoder = DatasetEncoder(
        [records], [str(root)], ["cat"], encode_record, processor=tiny_processor, config=EncodeConfig(**CFG)
    )
    plan = PackPlan.from_slots(
        [[[0, 1], [2, 3], [4, 5]]],
        np.ones((6, 2), dtype=np.int64),
        4096,
        4096,
        entries=[(0, i) for i in range(6)],
    )
    tolerant = PackedLoader(plan, 0, encoder, max_bad_fraction=0.5, min_samples_before_abort=2)
    assert len(list(tolerant)) == 3 and tolerant.skipped == {"missing_file": 2}
    strict = PackedLoader(plan, 0, encoder, max_bad_fraction=0.2, min_samples_before_abort=2)
    with pytest.raises(RuntimeError, match=r"1 of 2 samples failed.*missing_file.*data.max_bad_fraction=0.2"):
        list(strict)
