"""Official-format annotations read as the official training code reads them (DAMO-NLP-SG/VideoLLaMA3 @ 05cee23,
``videollama3/train.py`` ``_convert_normal`` / ``_convert_stream`` and ``videollama3/mm_utils.py``
``load_video_from_ids``), where that is sane; the deliberate differences are in docs/data_format.md.

Frame folders run on an assigned clock (3 fps unless configured) and are sampled by the official rule; GIFs keep
their own timing unless ``gif_fps`` assigns one; leading assistant turns are dropped and counted; a folder under
``image`` and streaming records are rejected with their own reasons; unpadded frame names are read in natural order.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from mediagen import frame_index, index_frame, make_frame_folder, make_gif, make_image
from PIL import Image

from videollama3_train.data import DataError, EncodeConfig, annotations, encode_record, media, plan_record
from videollama3_train.data import video as video_mod
from videollama3_train.data.annotations import leading_turns_dropped, normalize_record
from videollama3_train.data.config import DataConfig, DatasetConfig
from videollama3_train.data.text import IGNORE_INDEX

# fps 1 sampling with no min_frames floor: the official code's setting (it has no min_frames)
OFFICIAL = dict(fps=1.0, min_frames=1, max_frames=180, max_visual_tokens=256)


def conv(question: str, answer: str = "Fine.") -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _video(root: Path, record: dict, proc, **cfg):
    """The one video of ``record`` as planned, and the planned text: ``(MediaPlan, str)``."""
    plan = plan_record(record, data_root=root, processor=proc, config=EncodeConfig(**cfg))
    (m,) = [m for m in plan.media if m.kind == "video"]
    return m, proc.tokenizer.decode(plan.ids)


def _decoded_indices(m) -> list[int]:
    frames, _ = media.decode_video(m.paths[0], m.times, info=m.info)
    return [frame_index(f) for f in frames]


# ---------------------------------------------------------------------------------------------------------------
# frame folders: the official clock (3 fps) and sampling rule
# ---------------------------------------------------------------------------------------------------------------


def test_frame_folder_runs_at_3fps_sampled_as_the_official_code(tmp_path, tiny_processor):
    make_frame_folder(tmp_path / "f", n=9, size=(56, 56))
    rec = {"video": ["f"], "conversations": conv("<video>\nWhat happens?")}
    m, text = _video(tmp_path, rec, tiny_processor, **OFFICIAL)
    # official: vid_fps 3, segments of 3 frames, the middle one of each: files 1, 4, 7 (0-based) at i / 3 s
    assert m.info.kind == "frames" and m.info.assigned_fps == 3.0
    assert _decoded_indices(m) == [1, 4, 7]
    assert m.timestamps == pytest.approx([1 / 3, 4 / 3, 7 / 3])
    assert "Time 0.3s:" in text and "Time 1.3s:" in text and "Time 2.3s:" in text
    assert "Time 0.0s:" not in text and "Time 8.0s:" not in text  # not 9 frames at 1 fps (the old clock)
    assert media.official_frame_indices(9, 3.0, fps=1.0, max_frames=180, min_frames=1) == [1, 4, 7]


def test_frame_folder_min_and_max_frames(tmp_path, tiny_processor):
    make_frame_folder(tmp_path / "f", n=9, size=(56, 56))
    rec = {"video": "f", "conversations": conv("<video>\nWhat happens?")}
    # min_frames (ours, the official code has none): 3 frames < 4, so 4 spread by linspace over the 9 files
    m, _ = _video(tmp_path, rec, tiny_processor, **{**OFFICIAL, "min_frames": 4})
    assert _decoded_indices(m) == [0, 2, 5, 8] and m.timestamps == pytest.approx([0, 2 / 3, 5 / 3, 8 / 3])
    # sampling faster than the folder's clock takes every frame (the official code divides by zero there)
    assert media.official_frame_indices(9, 3.0, fps=5.0, max_frames=180, min_frames=1) == list(range(9))
    # longer than max_frames seconds: max_frames frames by linspace, as the official code
    assert media.official_frame_indices(30, 3.0, fps=1.0, max_frames=4, min_frames=1) == [0, 9, 19, 29]
    # a clip [1 s, 3 s] of the folder is sampled as its own folder: files 3..8, of which 4 and 7, at 1/3 and 4/3 s
    info = media.probe_video(tmp_path / "f", folder_fps=3.0)
    clip = media.sample_frames(info, fps=1.0, max_frames=180, min_frames=1, start=1.0, end=3.0)
    assert clip.indices == [1, 4] and clip.times == pytest.approx([4 / 3, 7 / 3])
    assert clip.timestamps == pytest.approx([1 / 3, 4 / 3])


def test_frame_folder_fps_per_dataset(tmp_path, tiny_processor):
    make_frame_folder(tmp_path / "f", n=9, size=(56, 56))
    rec = {"video": "f", "conversations": conv("<video>\nWhat happens?")}
    base = EncodeConfig(**OFFICIAL)
    assert DatasetConfig(path="a.json").encode_config(base) is base  # nothing set: the stage's config
    one = DatasetConfig(path="a.json", frame_folder_fps=1.0).encode_config(base)
    assert one.frame_folder_fps == 1.0 and one.fps == base.fps
    plan = plan_record(rec, data_root=tmp_path, processor=tiny_processor, config=one)
    assert plan.media[0].timestamps == pytest.approx(list(range(9)))  # folders extracted at 1 fps: every file
    with pytest.raises(ValueError, match="frame_folder_fps must be positive"):
        DatasetConfig(path="a.json", frame_folder_fps=0.0)
    with pytest.raises(ValueError, match="must be positive"):
        EncodeConfig(gif_fps=-1.0)


def test_build_train_data_encodes_each_dataset_on_its_own_clock(tmp_path, tiny_processor):
    """``data.datasets.<name>.frame_folder_fps`` reaches the cost pass and the encoder of that dataset only."""
    from videollama3_train.data.build import build_train_data

    make_frame_folder(tmp_path / "f", n=9, size=(28, 28))
    ann = tmp_path / "ann.jsonl"
    ann.write_text(json.dumps({"video": "f", "conversations": conv("<video>\nWhat happens?")}) + "\n")
    data = DataConfig(
        datasets={
            "three": DatasetConfig(path=str(ann)),
            "one": DatasetConfig(path=str(ann), frame_folder_fps=1.0),
        },
        max_tokens=4096,
        max_patches=8192,
        num_workers=0,
        cost_workers=0,
        cost_cache=False,
    )
    enc = EncodeConfig(**{**OFFICIAL, "max_length": 1024, "max_visual_tokens": 64})
    bundle = build_train_data(data, enc, tiny_processor, grad_accum=1, rank=0, world_size=1, is_main=True)
    frames = {}
    for batch in bundle.loader:
        for meta, thw in zip(batch["meta"], batch["video_grid_thw"].tolist()):
            frames[meta["dataset"]] = thw[0]
    assert frames == {"three": 3, "one": 9}


# ---------------------------------------------------------------------------------------------------------------
# GIFs: their own timing, or an assigned clock
# ---------------------------------------------------------------------------------------------------------------


def test_gif_keeps_its_own_timing_unless_gif_fps_is_set(tmp_path, tiny_processor):
    make_gif(tmp_path / "a.gif", n=10, size=(28, 28), duration_ms=100)  # 10 fps by its frame delays
    rec = {"video": "a.gif", "conversations": conv("<video>\nWhat happens?")}
    cfg = {**OFFICIAL, "fps": 2.0}
    # default: the file's own clock (as transformers' processor reads it): 1 s at 10 fps, sampled at 2 fps
    m, text = _video(tmp_path, rec, tiny_processor, **cfg)
    assert m.info.kind == "gif" and m.info.assigned_fps is None
    assert _decoded_indices(m) == [0, 5] and m.timestamps == pytest.approx([0.0, 0.5])
    # gif_fps=5: frame i at i / 5 s, sampled by the official rule (segments of floor(5 / 2) = 2 frames)
    m, text = _video(tmp_path, rec, tiny_processor, **cfg, gif_fps=5.0)
    assert m.info.assigned_fps == 5.0
    assert _decoded_indices(m) == [1, 3, 5, 7, 9]
    assert m.timestamps == pytest.approx([0.2, 0.6, 1.0, 1.4, 1.8])
    assert "Time 1.8s:" in text
    # the official code's own setting, every GIF at 25 fps: 10 frames are 0.4 s, one segment, its middle frame
    m, _ = _video(tmp_path, rec, tiny_processor, **cfg, gif_fps=25.0)
    assert _decoded_indices(m) == [5] and m.timestamps == pytest.approx([5 / 25])


# ---------------------------------------------------------------------------------------------------------------
# conversations: leading assistant turns, streaming records
# ---------------------------------------------------------------------------------------------------------------


def _labels(record: dict, root: Path, proc) -> tuple[torch.Tensor, torch.Tensor]:
    s = encode_record(record, data_root=root, processor=proc, config=EncodeConfig(), dataset="d", index=0)
    return s["input_ids"], s["labels"]


def test_leading_gpt_turn_is_dropped_and_counted(tmp_path, tiny_processor, monkeypatch, caplog):
    monkeypatch.setattr(annotations, "_DROPPED", {"records": 0, "turns": 0})
    lead = [{"from": "gpt", "value": "Welcome back! Ask me anything."}, {"from": "gpt", "value": "Really."}]
    rec = {"conversations": lead + conv("Hi?", "Hello.")}
    with caplog.at_level(logging.WARNING, logger="videollama3_train.data.annotations"):
        ids, labels = _labels(rec, tmp_path, tiny_processor)
    # counted, and logged with the running count
    assert leading_turns_dropped() == {"records": 1, "turns": 2}
    lines = [r.getMessage() for r in caplog.records if "leading assistant turn" in r.getMessage()]
    assert len(lines) == 1 and "dropped 2 leading assistant turn(s)" in lines[0]
    assert "'Welcome back! Ask me anything.'" in lines[0] and "1 record(s), 2 turn(s)" in lines[0]
    # trained as the record without its leading turns: only "Hello." and its <|im_end|> carry loss
    ref_ids, ref_labels = _labels({"conversations": conv("Hi?", "Hello.")}, tmp_path, tiny_processor)
    assert torch.equal(ids, ref_ids) and torch.equal(labels, ref_labels)
    assert tiny_processor.tokenizer.decode(labels[labels != IGNORE_INDEX]) == "Hello.<|im_end|>"
    # logged the 1st, 2nd, 4th, 8th, ... time, not once per record
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="videollama3_train.data.annotations"):
        for _ in range(4):
            assert [m["role"] for m in normalize_record(rec)["messages"]] == ["user", "assistant"]
    assert leading_turns_dropped() == {"records": 5, "turns": 10}
    counts = [r.getMessage().split("); ")[1][:11] for r in caplog.records]
    assert counts == ["2 record(s)", "4 record(s)"]
    # a system turn starts the conversation too; only assistant turns are dropped
    sys_first = {"conversations": [{"from": "system", "value": "Be brief."}, *conv("Hi?")]}
    assert [m["role"] for m in normalize_record(sys_first)["messages"]] == ["system", "user", "assistant"]
    with pytest.raises(DataError) as e:
        normalize_record({"conversations": [{"from": "gpt", "value": "Alone."}]})
    assert e.value.reason == "bad_schema" and "only assistant turns" in str(e.value)


@pytest.mark.parametrize(
    "record",
    [
        {
            "video": ["clip.mp4"],
            "stream": True,
            "start_time": 0.0,
            "end_time": 8.0,
            "conversation": [{"role": "user", "content": "Tell me when.", "time": 1.0}],
        },
        {"video": ["clip.mp4"], "conversation": [{"role": "user", "content": "Hi", "time": 0.0}]},
        {"video": "clip.mp4", "start_time": 1.0, "end_time": 4.0, "conversations": conv("<video>\nq")},
    ],
    ids=["stream", "conversation", "start_time"],
)
def test_streaming_record_is_rejected(record, tmp_path, tiny_processor):
    with pytest.raises(DataError) as e:
        normalize_record(record)
    assert e.value.reason == "unsupported_streaming" and "not supported" in str(e.value)
    with pytest.raises(DataError) as e:  # before any media is touched (clip.mp4 does not exist)
        encode_record(record, data_root=tmp_path, processor=tiny_processor, config=EncodeConfig(), index=3)
    assert e.value.reason == "unsupported_streaming" and "record 3" in str(e.value)


def test_stream_false_is_an_ordinary_record():
    rec = {"stream": False, "conversations": conv("Hi?")}
    assert [m["role"] for m in normalize_record(rec)["messages"]] == ["user", "assistant"]


# ---------------------------------------------------------------------------------------------------------------
# folders under `image`, unpadded frame names
# ---------------------------------------------------------------------------------------------------------------


def test_folder_under_image_is_rejected_with_what_to_do(tmp_path, tiny_processor):
    make_frame_folder(tmp_path / "frames", n=3, size=(28, 28))

    def encode(rec):
        return encode_record(
            rec, data_root=tmp_path, processor=tiny_processor, config=EncodeConfig(), index=5
        )

    # one tag: found when the path is opened (not "Is a directory" / corrupt_image)
    with pytest.raises(DataError) as e:
        encode({"image": "frames", "conversations": conv("<image>\nWhat?")})
    assert e.value.reason == "unsupported_image_folder" and e.value.path.endswith("frames")
    assert "folder under 'image'" in str(e.value) and "under 'video'" in str(e.value)
    # a trailing slash says "folder" without looking at the disk
    with pytest.raises(DataError) as e:
        normalize_record({"image": "frames/", "conversations": conv("<image>\nWhat?")})
    assert e.value.reason == "unsupported_image_folder"
    # the official form, one tag per file: still a tag mismatch here, but the message names the likely cause
    with pytest.raises(DataError) as e:
        normalize_record({"image": "frames", "conversations": conv("<image><image><image>\nWhat?")})
    assert e.value.reason == "placeholder_mismatch" and "'frames' has no image file extension" in str(e.value)
    # what the message suggests works
    s = encode({"video": "frames", "conversations": conv("<video>\nWhat?")})
    assert s["meta"]["modality"] == "video"


def test_unpadded_frame_names_are_read_in_natural_order(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    # frame_1 ... frame_12: plain sorting reads frame_1, frame_10, frame_11, frame_12, frame_2, ...
    for k in range(1, 13):
        Image.fromarray(index_frame(k - 1, 32, 32)).save(folder / f"frame_{k}.png")
    Image.fromarray(index_frame(200, 32, 32)).save(folder / ".hidden.png")
    (folder / "notes.txt").write_text("not a frame")
    names = [Path(p).name for p in video_mod.frame_folder_images(str(folder))]
    assert names == [f"frame_{k}.png" for k in range(1, 13)]
    info = media.probe_video(folder, folder_fps=1.0)
    frames, stamps = media.decode_video(folder, [float(i) for i in range(12)], info=info)
    assert [frame_index(f) for f in frames] == list(range(12)) and stamps == [float(i) for i in range(12)]
    # mixed padding and case: ordered by number, then by name
    assert sorted(["b10.png", "B2.png", "b02.png", "a.png", "b2.png"], key=video_mod._natural_key) == [
        "B2.png",
        "a.png",
        "b02.png",
        "b2.png",
        "b10.png",
    ]


def test_frame_list_keeps_every_frame_at_the_stage_fps(tmp_path, tiny_processor):
    """A frame list (not an official form) keeps every listed frame, at ``i / fps``: unchanged."""
    make_image(tmp_path / "a.png", size=(28, 28))
    rec = {"video": ["a.png", "a.png", "a.png"], "conversations": conv("<video>\nq")}
    plan = plan_record(rec, data_root=tmp_path, processor=tiny_processor, config=EncodeConfig(**OFFICIAL))
    assert plan.media[0].frame_indices == [0, 1, 2] and plan.media[0].timestamps == [0.0, 1.0, 2.0]
