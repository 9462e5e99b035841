"""encode_record / estimate_cost / load_annotations / normalize_record on tiny generated media."""

from __future__ import annotations

import json

import pytest
import torch
from mediagen import make_audio_only, make_corrupt, make_frame_folder, make_image, make_video

from videollama3_train.data import DataError, EncodeConfig, encode_record, estimate_cost, load_annotations
from videollama3_train.data.annotations import normalize_record, record_at
from videollama3_train.data.vision import processor_budgets, processor_frame_size, processor_image_size
from videollama3_train.model.tokenizer import build_processor, build_tiny_tokenizer

FORWARD_KEYS = {
    "input_ids",
    "labels",
    "pixel_values",
    "image_grid_thw",
    "image_merge_sizes",
    "pixel_values_videos",
    "video_grid_thw",
    "video_merge_sizes",
    "video_compression_mask",
    "meta",
}


@pytest.fixture(scope="module")
def proc():
    return build_processor(build_tiny_tokenizer())


def _conv(question: str, answer: str = "Fine.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _encode(rec, root, proc, **cfg):
    return encode_record(
        rec, data_root=root, processor=proc, config=EncodeConfig(**cfg), dataset="ds", index=7
    )


def _check_consistent(s: dict, proc) -> None:
    """Invariants every sample must satisfy: keys, dtypes, pad counts equal t*h*w/m^2 (kept, for videos)."""
    assert set(s) <= FORWARD_KEYS
    assert s["input_ids"].dtype == torch.long and s["input_ids"].shape == s["labels"].shape
    n_img = int((s["input_ids"] == proc.image_token_id).sum())
    n_vid = int((s["input_ids"] == proc.video_token_id).sum())
    if "image_grid_thw" in s:
        g, m = s["image_grid_thw"], s["image_merge_sizes"]
        assert n_img == int((g.prod(dim=1) // m**2).sum())
        assert s["pixel_values"].shape == (int(g.prod(dim=1).sum()), 588)
    else:
        assert n_img == 0 and "pixel_values" not in s
    if "video_grid_thw" in s:
        g, m = s["video_grid_thw"], s["video_merge_sizes"]
        assert s["video_compression_mask"].dtype == torch.bool
        assert s["video_compression_mask"].numel() == int((g.prod(dim=1) // m**2).sum())
        assert n_vid == int(s["video_compression_mask"].sum())
        assert s["pixel_values_videos"].shape == (int(g.prod(dim=1).sum()), 588)
    else:
        assert n_vid == 0
    assert s["meta"]["num_tokens"] == s["input_ids"].numel()


# ---------------------------------------------------------------------------------------------------------------
# modalities
# ---------------------------------------------------------------------------------------------------------------


def test_text_only(tmp_path, proc):
    s = _encode({"conversations": _conv("Hi?", "Hello.")}, tmp_path, proc)
    _check_consistent(s, proc)
    assert set(s) == {"input_ids", "labels", "meta"}
    assert s["meta"] == {
        "dataset": "ds",
        "index": 7,
        "modality": "text",
        "num_tokens": s["input_ids"].numel(),
        "num_patches": 0,
        "num_label_tokens": int((s["labels"] != -100).sum()),
    }
    assert (
        proc.tokenizer.decode(s["input_ids"])
        == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    )


def test_system_prompt_from_config(tmp_path, proc):
    s = _encode({"conversations": _conv("Hi?")}, tmp_path, proc, system_prompt="Be nice.")
    assert proc.tokenizer.decode(s["input_ids"]).startswith(
        "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user"
    )


def test_multi_image(tmp_path, proc):
    for i, size in enumerate([(40, 30), (100, 20), (28, 28)]):
        make_image(tmp_path / f"{i}.png", size=size, pattern="noise")
    rec = {"image": ["0.png", "1.png", "2.png"], "conversations": _conv("<image><image>\n<image>\nThree?")}
    s = _encode(rec, tmp_path, proc, max_visual_tokens=90)
    _check_consistent(s, proc)
    assert s["meta"]["modality"] == "image"
    assert s["image_grid_thw"].shape == (3, 3) and s["image_merge_sizes"].tolist() == [1, 1, 1]


def test_image_and_video(tmp_path, proc):
    make_image(tmp_path / "a.png", size=(64, 48), pattern="noise")
    make_video(tmp_path / "v.mp4", 64, 48, seconds=5.0, fps=4.0)
    rec = {"image": "a.png", "video": "v.mp4", "conversations": _conv("<video>\n<image>\nSame?")}
    s = _encode(rec, tmp_path, proc, max_visual_tokens=200)
    _check_consistent(s, proc)
    assert s["meta"]["modality"] == "mixed"
    assert s["video_grid_thw"][0, 0] == 5  # 5 s at 1 fps
    text = proc.tokenizer.decode(s["input_ids"])
    assert text.index("Time 0.0s:") < text.index("<|image_pad|>")  # the record's order is kept
    assert "Time 4.0s:" in text and "Time 5.0s:" not in text


def test_media_without_placeholder_goes_first(tmp_path, proc):
    make_image(tmp_path / "a.png", size=(28, 28))
    s = _encode({"image": "a.png", "conversations": _conv("What is it?")}, tmp_path, proc)
    assert proc.tokenizer.decode(s["input_ids"]).startswith("<|im_start|>user\n<|image_pad|>")


def test_official_frames_as_image_tags(tmp_path, proc):
    """A `video` given as frame images, each marked by one <image> tag: one video, not N images."""
    folder = make_frame_folder(tmp_path / "frames", n=4, size=(56, 56))
    frames = [f"frames/frame_{i:05d}.png" for i in range(4)]
    rec = {"video": frames, "conversations": _conv("<image>\n<image>\n<image>\n<image>\nWhat changes?")}
    norm = normalize_record(rec)
    assert [it["type"] for it in norm["messages"][0]["content"]] == ["video", "text"]
    assert norm["messages"][0]["content"][1]["text"] == "What changes?"
    s = _encode(rec, tmp_path, proc)
    _check_consistent(s, proc)
    assert s["meta"]["modality"] == "video" and s["video_grid_thw"][0, 0] == 4
    assert "Time 3.0s:" in proc.tokenizer.decode(s["input_ids"])
    # the same frames as a folder at 1 fps (a list's frames are all kept, at i / fps), and as a list under one
    # <video> tag, give the same tokens
    folder_rec = {"video": "frames", "conversations": _conv("<video>\nWhat changes?")}
    as_folder = _encode(folder_rec, tmp_path, proc, frame_folder_fps=1.0)
    as_list = _encode({"video": frames, "conversations": _conv("<video>\nWhat changes?")}, tmp_path, proc)
    assert torch.equal(as_folder["input_ids"], s["input_ids"]) and torch.equal(
        as_list["input_ids"], s["input_ids"]
    )
    assert folder.is_dir()


# ---------------------------------------------------------------------------------------------------------------
# budget, compression, cost
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [64, 256, 1000])
def test_budget_processor_sizes_else_shared(tmp_path, proc, budget):
    """Items get the processor's own sizes while they fit max_visual_tokens together; else the budget is shared
    equally over all images and frames (official rule)."""
    make_image(tmp_path / "a.png", size=(300, 200), pattern="noise")
    make_image(tmp_path / "b.png", size=(90, 400), pattern="noise")
    make_video(tmp_path / "v.mp4", 160, 120, seconds=4.0, fps=2.0)
    rec = {
        "image": ["a.png", "b.png"],
        "video": "v.mp4",
        "conversations": _conv("<image>\n<image>\n<video>\n?"),
    }
    cfg = EncodeConfig(max_visual_tokens=budget, min_tokens_per_item=4, image_merge_size=2)
    s = encode_record(rec, data_root=tmp_path, processor=proc, config=cfg)
    _check_consistent(s, proc)
    img_tokens = (s["image_grid_thw"].prod(dim=1) // s["image_merge_sizes"] ** 2).tolist()
    g = s["video_grid_thw"][0]
    frame_tokens = int(g[1] * g[2]) // 4
    assert min(img_tokens + [frame_tokens]) >= 4
    b = processor_budgets(
        patch_size=14,
        image_merge_size=2,
        video_merge_size=2,
        max_visual_tokens=budget,
        min_tokens_per_item=4,
        max_tokens_per_item=cfg.max_tokens_per_item,
    )
    alone = [processor_image_size(h, w, merge_size=2, budgets=b) for h, w in ((200, 300), (400, 90))]
    alone.append(processor_frame_size(120, 160, int(g[0]), merge_size=2, budgets=b))
    alone_tokens = [h * w // 28**2 for h, w in alone]
    if sum(alone_tokens[:2]) + int(g[0]) * alone_tokens[2] <= budget:  # 256, 1000: what the processor makes
        assert img_tokens + [frame_tokens] == alone_tokens
        assert s["image_grid_thw"][:, 1:].tolist() == [[h // 14, w // 14] for h, w in alone[:2]]
    else:  # 64: shared equally over 2 images + 4 frames
        assert sum(img_tokens) + int(g[0]) * frame_tokens <= budget
        assert max(img_tokens + [frame_tokens]) <= budget // 6


def test_compression_on_off(tmp_path, proc):
    make_video(tmp_path / "v.mp4", 112, 112, seconds=4.0, fps=2.0)
    rec = {"video": "v.mp4", "conversations": _conv("<video>\n?")}
    off = _encode(rec, tmp_path, proc, use_token_compression=False)
    on = _encode(rec, tmp_path, proc, use_token_compression=True)
    _check_consistent(off, proc)
    _check_consistent(on, proc)
    assert bool(off["video_compression_mask"].all())
    per_frame = int(on["video_grid_thw"][0, 1] * on["video_grid_thw"][0, 2]) // 4
    mask = on["video_compression_mask"].view(-1, per_frame)
    assert bool(mask[0].all()) and not bool(mask.all()) and bool((mask.sum(dim=1) >= 1).all())
    assert on["input_ids"].numel() < off["input_ids"].numel()
    # a huge threshold keeps only frame 0 plus one token per later frame
    tight = _encode(rec, tmp_path, proc, use_token_compression=True, compression_threshold=1e9)
    assert tight["video_compression_mask"].view(-1, per_frame).sum(dim=1).tolist() == [per_frame] + [1] * (
        mask.shape[0] - 1
    )


def test_estimate_cost_equals_encode(tmp_path, proc):
    make_image(tmp_path / "a.jpg", size=(123, 77), pattern="noise")
    make_image(tmp_path / "b.png", size=(20, 300), pattern="gradient")
    make_video(tmp_path / "v.mp4", 96, 64, seconds=6.0, fps=3.0)
    make_video(tmp_path / "w.webm", 48, 64, seconds=2.0, fps=5.0, codec="libvpx")
    records = [
        {"conversations": _conv("Just text, no media at all.")},
        {"image": "a.jpg", "conversations": _conv("<image>\n?")},
        {
            "image": ["a.jpg", "b.png"],
            "video": ["v.mp4", "w.webm"],
            "conversations": _conv("<video><image><video><image>"),
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "video", "video": "v.mp4", "start": 1.0, "end": 5.0}]},
                {"role": "assistant", "content": "ok"},
            ]
        },
    ]
    for cfg in (
        EncodeConfig(max_visual_tokens=300),
        EncodeConfig(max_visual_tokens=40, image_merge_size=2, max_frames=4),
        EncodeConfig(max_length=250, min_tokens_per_item=4, length_policy="rebudget"),
        EncodeConfig(max_length=120, length_policy="truncate"),
    ):
        encoded = 0
        for rec in records:
            try:
                s = encode_record(rec, data_root=tmp_path, processor=proc, config=cfg)
            except DataError as err:  # then the pre-pass rejects the record for the same reason
                with pytest.raises(DataError) as e2:
                    estimate_cost(rec, data_root=tmp_path, processor=proc, config=cfg)
                assert e2.value.reason == err.reason == "too_long"
                continue
            encoded += 1
            _check_consistent(s, proc)
            assert s["meta"]["num_tokens"] <= cfg.max_length
            assert estimate_cost(rec, data_root=tmp_path, processor=proc, config=cfg) == (
                s["meta"]["num_tokens"],
                s["meta"]["num_patches"],
            )
        assert encoded >= 2


def test_plan_record_is_the_cost_and_encodes_without_replanning(tmp_path, proc, monkeypatch):
    """One plan serves both: its cost is estimate_cost's, and encode_record given it reads no header again."""
    from videollama3_train.data import encode as enc_mod
    from videollama3_train.data.encode import plan_record

    make_image(tmp_path / "a.png", size=(64, 48), pattern="noise")
    make_video(tmp_path / "v.mp4", 64, 48, seconds=5.0, fps=4.0)
    rec = {"image": "a.png", "video": "v.mp4", "conversations": _conv("<video>\n<image>\nSame?")}
    cfg = EncodeConfig(max_visual_tokens=200)
    plan = plan_record(rec, data_root=tmp_path, processor=proc, config=cfg)
    assert plan.cost == estimate_cost(rec, data_root=tmp_path, processor=proc, config=cfg)
    assert plan.cost[0] == plan.text_tokens + plan.visual_tokens
    fresh = encode_record(rec, data_root=tmp_path, processor=proc, config=cfg)

    def no_probe(*a, **k):
        raise AssertionError("planned again")

    monkeypatch.setattr(enc_mod, "_probe", no_probe)
    reused = encode_record(rec, data_root=tmp_path, processor=proc, config=cfg, plan=plan)
    assert set(reused) == set(fresh)
    for k in fresh:
        if k != "meta":
            assert torch.equal(reused[k], fresh[k]), k
    assert (reused["meta"]["num_tokens"], reused["meta"]["num_patches"]) == plan.cost
    with pytest.raises(ValueError, match="another EncodeConfig"):
        encode_record(rec, data_root=tmp_path, processor=proc, config=EncodeConfig(), plan=plan)
    with pytest.raises(DataError) as e:
        plan_record(
            {"conversations": []}, data_root=tmp_path, processor=proc, config=cfg, dataset="d", index=3
        )
    assert e.value.reason == "bad_schema" and "dataset 'd', record 3" in str(e.value)


def test_video_clip_timestamps_relative_to_start(tmp_path, proc):
    make_video(tmp_path / "v.mp4", 64, 48, seconds=8.0, fps=2.0)
    rec = {
        "messages": [
            {"role": "user", "content": [{"type": "video", "path": "v.mp4", "start": 3.0, "end": 8.0}]},
            {"role": "assistant", "content": "ok"},
        ]
    }
    text = proc.tokenizer.decode(_encode(rec, tmp_path, proc)["input_ids"])
    assert "Time 0.0s:" in text and "Time 4.0s:" in text and "Time 5.0s:" not in text


# ---------------------------------------------------------------------------------------------------------------
# length policy
# ---------------------------------------------------------------------------------------------------------------


def test_length_rebudget_drop_truncate(tmp_path, proc):
    make_image(tmp_path / "a.png", size=(280, 280), pattern="noise")
    rec = {
        "image": "a.png",
        "conversations": _conv("<image>\nDescribe.", "The quick brown fox jumps over the lazy dog. " * 8),
    }
    full = _encode(rec, tmp_path, proc, max_visual_tokens=400)
    n_text = full["input_ids"].numel() - int(full["image_grid_thw"].prod())
    limit = n_text + 100
    small = _encode(rec, tmp_path, proc, max_visual_tokens=400, max_length=limit)  # rebudget is the default
    assert small["input_ids"].numel() <= limit and int(small["image_grid_thw"].prod()) < int(
        full["image_grid_thw"].prod()
    )
    with pytest.raises(DataError) as e:
        _encode(rec, tmp_path, proc, max_visual_tokens=400, max_length=limit, length_policy="drop")
    assert e.value.reason == "too_long" and "'ds'" in str(e.value) and "record 7" in str(e.value)
    # truncate: cut after the last visual token, labels that remain are kept
    n_vis = int(full["image_grid_thw"].prod())
    cut = n_vis + 30
    t = _encode(rec, tmp_path, proc, max_visual_tokens=400, max_length=cut, length_policy="truncate")
    assert t["input_ids"].numel() == cut and torch.equal(t["input_ids"], full["input_ids"][:cut])
    assert (
        estimate_cost(
            rec,
            data_root=tmp_path,
            processor=proc,
            config=EncodeConfig(max_visual_tokens=400, max_length=cut, length_policy="truncate"),
        )[0]
        == cut
    )
    with pytest.raises(DataError, match="never cuts inside visual tokens"):
        _encode(rec, tmp_path, proc, max_visual_tokens=400, max_length=n_vis, length_policy="truncate")
    with pytest.raises(DataError) as e:  # even the minimum budget does not fit
        _encode(rec, tmp_path, proc, max_visual_tokens=400, max_length=n_text)
    assert e.value.reason == "too_long"


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


def _bad_media(tmp_path):
    make_image(tmp_path / "good.png", size=(64, 64), pattern="noise")
    make_corrupt(tmp_path / "trunc.png", source=tmp_path / "good.png", keep=0.5)
    (tmp_path / "zero.png").write_bytes(b"")
    make_video(tmp_path / "good.mp4", 64, 48, seconds=2.0, fps=4.0)
    make_corrupt(tmp_path / "broken.mp4", source=tmp_path / "good.mp4", keep=0.5)
    make_audio_only(tmp_path / "audio.mp4")
    make_image(tmp_path / "thin.png", size=(402, 2))
    (tmp_path.parent / "outside.png").write_bytes((tmp_path / "good.png").read_bytes())


FILE_ERRORS = [
    ({"image": "nope.png"}, "<image>\n?", "missing_file", "nope.png"),
    ({"image": "zero.png"}, "<image>\n?", "empty_file", "zero.png"),
    ({"image": "trunc.png"}, "<image>\n?", "corrupt_image", "trunc.png"),
    ({"video": "broken.mp4"}, "<video>\n?", "corrupt_video", "broken.mp4"),
    ({"video": "audio.mp4"}, "<video>\n?", "no_video_stream", "audio.mp4"),
    ({"image": "../outside.png"}, "<image>\n?", "path_escapes_root", "outside.png"),
    ({"image": "thin.png"}, "<image>\n?", "bad_aspect_ratio", "thin.png"),
]


@pytest.mark.parametrize("media_keys,question,reason,name", FILE_ERRORS, ids=[c[2] for c in FILE_ERRORS])
def test_bad_file_raises_located_error(tmp_path, proc, media_keys, question, reason, name):
    root = tmp_path / "root"
    root.mkdir()
    _bad_media(root)
    rec = {**media_keys, "conversations": _conv(question)}
    with pytest.raises(DataError) as e:
        _encode(rec, root, proc)
    err = e.value
    assert err.reason == reason
    msg = str(err)
    assert "dataset 'ds'" in msg and "record 7" in msg and name in msg, msg
    # the cost pre-pass finds header-level problems too (a truncated image only shows when decoded)
    if reason != "corrupt_image":
        with pytest.raises(DataError) as e2:
            estimate_cost(rec, data_root=root, processor=proc, config=EncodeConfig(), dataset="ds", index=7)
        assert e2.value.reason == reason


RECORD_ERRORS = [
    ({"image": ["a.png", "b.png"], "conversations": _conv("<image>\nonly one tag")}, "placeholder_mismatch"),
    ({"video": "v.mp4", "conversations": _conv("<video><video>")}, "placeholder_mismatch"),
    ({"conversations": _conv("Hi", "   ")}, "empty_assistant"),
    ({"conversations": [{"from": "human", "value": "Hi"}]}, "empty_assistant"),
    ({"conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "x"}]}, "unknown_role"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
    ({"conversations": [{"from": "human", "value": 42}, {"from": "gpt", "value": "x"}]}, "bad_text"),
    ({"conversations": _conv("bad \udcff surrogate")}, "bad_text"),
    ({"conversations": _conv("sneaky <|im_end|> token")}, "bad_text"),
    ({"something": "else"}, "bad_schema"),
]


@pytest.mark.parametrize(
    "rec,reason", RECORD_ERRORS, ids=[f"{c[1]}-{i}" for i, c in enumerate(RECORD_ERRORS)]
)
def test_bad_record_raises_located_error(tmp_path, proc, rec, reason):
    with pytest.raises(DataError) as e:
        _encode(rec, tmp_path, proc)
    assert e.value.reason == reason
    assert "dataset 'ds'" in str(e.value) and "record 7" in str(e.value)


def test_error_survives_pickling(tmp_path, proc):
    import pickle

    with pytest.raises(DataError) as e:
        _encode({"image": "nope.png", "conversations": _conv("<image>")}, tmp_path, proc)
    again = pickle.loads(pickle.dumps(e.value))
    assert str(again) == str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# annotations
# ---------------------------------------------------------------------------------------------------------------

MIXED = [
    {"image": "a.png", "conversations": _conv("<image>\nq")},
    {"image": ["a.png", "b.png"], "conversations": _conv("<image><image>")},
    {"conversations": _conv("text only"), "extra": {"nested": [1, "two"]}},
    {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "a.png"}]},
            {"role": "assistant", "content": "x"},
        ]
    },
]


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_load_annotations_mixed_types(tmp_path, fmt):
    path = tmp_path / f"ann.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(MIXED))
    else:
        path.write_text("\n".join(json.dumps(r) for r in MIXED) + "\n\n")
    ds = load_annotations(path, cache_dir=str(tmp_path / "cache"))
    assert len(ds) == len(MIXED)
    assert [record_at(ds, i) for i in range(len(ds))] == MIXED
    # an edited file is re-read, not served from the cache
    path.write_text(json.dumps(MIXED[:2]) if fmt == "json" else json.dumps(MIXED[0]) + "\n")
    assert len(load_annotations(path, cache_dir=str(tmp_path / "cache"))) == (2 if fmt == "json" else 1)


def test_encode_accepts_dataset_rows(tmp_path, proc):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps([{"conversations": _conv("Hi?", "Hello.")}]))
    ds = load_annotations(path, cache_dir=str(tmp_path / "cache"))
    from_row = _encode(ds[0], tmp_path, proc)
    assert torch.equal(from_row["input_ids"], _encode(record_at(ds, 0), tmp_path, proc)["input_ids"])


def test_load_annotations_bad_line(tmp_path):
    path = tmp_path / "ann.jsonl"
    path.write_text(json.dumps(MIXED[0]) + "\n{not json\n")
    with pytest.raises(Exception) as e:
        load_annotations(path, cache_dir=str(tmp_path / "cache"))
    # datasets may wrap generator errors; the DataError with its line is in the chain
    chain, err = [], e.value
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert any(isinstance(x, DataError) and "line 2" in str(x) for x in chain)


def test_iter_records_strict_and_tolerant(tmp_path):
    """The one annotation reader: strict raises the first bad record with its line; tolerant yields it and goes
    on, with the record indices training uses (blank lines do not count)."""
    from videollama3_train.data import iter_records

    path = tmp_path / "ann.jsonl"
    good = json.dumps(MIXED[0]).encode()
    path.write_bytes(
        good + b"\n\n[1, 2]\n{not json\n" + good.replace(b"image", b"\xff") + b"\n" + good + b"\n"
    )
    pairs = list(iter_records(path, strict=False))
    assert [i for i, _ in pairs] == [0, 1, 2, 3, 4]
    assert pairs[0][1] == MIXED[0] and pairs[4][1] == MIXED[0]
    errors = [(r.reason, r.index) for _, r in pairs if isinstance(r, DataError)]
    assert errors == [("bad_schema", 1), ("bad_schema", 2), ("bad_text", 3)]
    assert "line 3 is not a JSON object" in str(pairs[1][1]) and "line 4 is not valid JSON" in str(
        pairs[2][1]
    )
    assert "line 5 is not valid UTF-8" in str(pairs[3][1])
    strict = iter_records(path)
    assert next(strict) == MIXED[0]
    with pytest.raises(DataError, match="line 3 is not a JSON object"):
        next(strict)

    listed = tmp_path / "ann.json"
    listed.write_text(json.dumps([MIXED[1], "text"]))
    assert [type(r).__name__ for _, r in iter_records(listed, strict=False)] == ["dict", "DataError"]
    with pytest.raises(DataError, match="record is a str"):
        list(iter_records(listed))
    # a file that cannot be read at all fails in both modes, at the call
    with pytest.raises(DataError) as e:
        iter_records(tmp_path / "nope.jsonl", strict=False)
    assert e.value.reason == "missing_file"
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(DataError) as e:
        iter_records(tmp_path / "empty.json")
    assert e.value.reason == "empty_file"
    listed.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        next(iter_records(listed, strict=False))


def test_normalize_official_and_messages_agree():
    official = {
        "image": "a.png",
        "conversations": [{"from": "system", "value": "S"}, *_conv("<image>\nWhat?", "It.")],
    }
    messages = {
        "messages": [
            {"role": "system", "content": "S"},
            {
                "role": "user",
                "content": [{"type": "image", "url": "a.png"}, {"type": "text", "text": "What?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "It."}]},
        ]
    }
    assert normalize_record(official) == normalize_record(messages)
    # the internal form is a fixed point
    assert normalize_record(normalize_record(official)) == normalize_record(official)
