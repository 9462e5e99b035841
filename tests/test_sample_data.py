"""The sample-data generator writes a decodable, deterministic, balanced dataset in the official schema, whose
held-out split shares no item (prompt + answer, media file or media content) with training."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "data" / "generate_sample.py"


def _load_generator():
    spec = importlib.util.spec_from_file_location("generate_sample", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    gen.generate(out, seed=3, n_train=40, n_heldout=20)
    return out


def test_schema_and_media_decode(sample: Path) -> None:
    train, heldout = _read(sample / "train.jsonl"), _read(sample / "heldout.jsonl")
    assert (len(train), len(heldout)) == (40, 20)
    modalities = Counter()
    for record in train + heldout:
        human, gpt = record["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert len(gpt["value"].split()) == 1, "answers are one word"
        images = record.get("image", [])
        images = [images] if isinstance(images, str) else images
        assert human["value"].count("<image>") == len(images)
        assert human["value"].count("<video>") == int("video" in record)
        for rel in images:
            assert not Path(rel).is_absolute()
            with Image.open(sample / rel) as im:
                im.load()
                assert 56 <= im.width <= 112 and im.mode == "RGB"
        if "video" in record:
            with av.open(str(sample / record["video"])) as container:
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            assert len(frames) >= 8 and frames[0].shape[0] in (56, 70, 84)
            assert any((a != b).any() for a, b in zip(frames, frames[1:])), "the square moves"
        modalities["video" if "video" in record else "image" if images else "text"] += 1
    assert set(modalities) == {"image", "video", "text"}
    for record in heldout:
        assert record["answer"] == record["conversations"][1]["value"]
        assert record["answer"] in record["choices"] and len(record["choices"]) >= 2


def test_majority_baseline(sample: Path) -> None:
    train, heldout = _read(sample / "train.jsonl"), _read(sample / "heldout.jsonl")
    answers = gen.majority_answers(train)
    assert set(answers) == {r["task"] for r in train}
    for task, answer in answers.items():
        counts = Counter(r["conversations"][1]["value"] for r in train if r["task"] == task)
        top = max(counts.values())
        assert counts[answer] == top and answer == min(a for a, c in counts.items() if c == top)
    expected = sum(answers.get(r["task"]) == r["answer"] for r in heldout) / len(heldout)
    assert gen.majority_baseline(train, heldout) == pytest.approx(expected)
    assert 0.0 <= expected < 0.5  # answers are balanced per task: a constant answer cannot do well


def test_answers_balanced_per_task(tmp_path: Path) -> None:
    counts = gen.task_counts(120)
    assert sum(counts.values()) == 120
    assert counts["video_colour"] == 42  # 35% video
    records = gen.build_split(gen.random.Random(0), tmp_path, "heldout", 120, with_answers=True)
    by_task: dict[str, Counter] = {}
    for r in records:
        by_task.setdefault(r["task"], Counter())[r["answer"]] += 1
    for task, answers in by_task.items():
        classes = gen.TASKS[task][1]
        n = counts[task]
        if n >= len(classes):
            assert set(answers) == set(classes), task
        assert max(answers.values()) - min(answers.get(c, 0) for c in classes) <= 1, (task, answers)


def test_video_colour_matches_the_square(sample: Path) -> None:
    """The label is learnable: the moving square's pixels are the colour the answer names."""
    for record in _read(sample / "heldout.jsonl"):
        if record["task"] != "video_colour":
            continue
        with av.open(str(sample / record["video"])) as container:
            frame = next(container.decode(video=0)).to_ndarray(format="rgb24").astype(int)
        # The background is grey (r == g == b); the square is saturated.
        mean = frame[(frame.max(-1) - frame.min(-1)) > 80].mean(0)
        nearest = min(gen.COLOURS, key=lambda c: float(((np.array(gen.COLOURS[c]) - mean) ** 2).sum()))
        assert nearest == record["answer"]


def _decoded_video(path: Path) -> tuple[list[np.ndarray], list[float], float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames, times = [], []
        for f in container.decode(stream):
            frames.append(f.to_ndarray(format="rgb24"))
            times.append(float(f.time))
        return frames, times, float(stream.average_rate)


def _x264_options(path: Path) -> str:
    """The option string x264 writes into its SEI (what the encoder really ran with)."""
    data = path.read_bytes()
    start = data.index(b"options: ")
    return data[start : data.index(b"\x00", start)].decode("ascii", "replace")


def test_x264_settings_are_pinned(sample: Path) -> None:
    """The causes of run-to-run bitstream differences are switched off (data/generate_sample.py, X264_OPTIONS)."""
    videos = sorted((sample / "media" / "videos").glob("*.mp4"))
    assert videos
    for path in videos:
        options = _x264_options(path).split()
        assert "threads=1" in options and "lookahead_threads=1" in options and "mbtree=0" in options, options


def _generate_in_subprocess(out: Path, seed: int, env_extra: dict[str, str]) -> None:
    env = {**os.environ, **env_extra}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(out),
        "--seed",
        str(seed),
        "--train",
        "24",
        "--heldout",
        "8",
    ]
    subprocess.run(cmd, check=True, capture_output=True, env=env)


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    """What a seed promises: the same annotations, the same PNG bytes, and videos that decode to the same frames at
    the same times (compared decoded, within a lossy codec's tolerance, not as bytes: an H.264 bitstream may
    legitimately differ between encoder builds). Generated in this process and in a subprocess whose memory
    layout, environment and CPU threads differ (the conditions that changed the mp4 bytes before mbtree=0)."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    gen.generate(a, seed=1, n_train=24, n_heldout=8)
    _generate_in_subprocess(
        b, 1, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "3", "PADDING": "x" * 123, "PYTHONHASHSEED": "7"}
    )
    gen.generate(c, seed=2, n_train=24, n_heldout=8)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        if rel.suffix in (".jsonl", ".png"):
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
        elif rel.suffix == ".mp4":
            frames_a, times_a, fps_a = _decoded_video(a / rel)
            frames_b, times_b, fps_b = _decoded_video(b / rel)
            assert (times_a, fps_a) == (times_b, fps_b), rel
            for fa, fb in zip(frames_a, frames_b):
                assert fa.shape == fb.shape, rel
                diff = np.abs(fa.astype(np.int16) - fb.astype(np.int16))
                assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 8, (rel, diff.mean(), diff.max())
        else:
            raise AssertionError(f"unexpected file {rel}")
    assert (a / "train.jsonl").read_text() != (c / "train.jsonl").read_text()


def test_heldout_does_not_depend_on_train_size(tmp_path: Path) -> None:
    gen.generate(tmp_path / "small", seed=4, n_train=8, n_heldout=12)
    gen.generate(tmp_path / "large", seed=4, n_train=30, n_heldout=12)
    assert (tmp_path / "small" / "heldout.jsonl").read_text() == (
        tmp_path / "large" / "heldout.jsonl"
    ).read_text()


@pytest.fixture(scope="module")
def default_sample(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("default")
    return out, gen.generate(out, seed=0)


def test_default_size_is_small(default_sample) -> None:
    _, summary = default_sample
    assert (summary["train"], summary["heldout"]) == (360, 64)
    assert summary["media_bytes"] < 5e6


def test_default_heldout_asks_each_heldout_opposite_once(default_sample) -> None:
    """The default held-out split holds every held-out (pair, phrasing) prompt of the opposite task exactly once:
    no prompt counts twice in its accuracy, none is missing."""
    out, _ = default_sample
    prompts = [
        r["conversations"][0]["value"] for r in _read(out / "heldout.jsonl") if r["task"] == "opposite"
    ]
    n_templates, n_held = len(gen.OPPOSITE_TEMPLATES), gen.OPPOSITE_HELDOUT_PER_INSTANCE
    expected = {
        template.format(w=word) + gen.SUFFIX
        for i, word in enumerate(gen.OPPOSITES)
        for t, template in enumerate(gen.OPPOSITE_TEMPLATES)
        if gen.heldout_combination(i, t, n_templates, n_held)
    }
    assert len(expected) == len(gen.OPPOSITES) * n_held
    assert sorted(prompts) == sorted(expected)


def _decoded_digest(path: Path) -> str:
    """Hash of the decoded pixels of an image or a video (its content, whatever the file bytes)."""
    h = hashlib.sha256()
    if path.suffix == ".png":
        with Image.open(path) as im:
            h.update(np.asarray(im.convert("RGB")).tobytes())
    else:
        frames, times, fps = _decoded_video(path)
        h.update(np.stack(frames).tobytes())
        h.update(repr((times, fps)).encode())
    return h.hexdigest()


def test_heldout_is_disjoint_from_training(default_sample) -> None:
    """No held-out prompt + answer pair (with its media), media path, media file or decoded media content occurs in
    training, while every task family is on both sides."""
    out, summary = default_sample
    assert summary["overlap"] == {"records": 0, "media_paths": 0, "media_bytes": 0}
    train, heldout = _read(out / "train.jsonl"), _read(out / "heldout.jsonl")

    def pair(r: dict) -> tuple[str, str]:
        return r["conversations"][0]["value"], r["conversations"][1]["value"]

    # Text-only records: the prompt + answer pair is the whole item.
    train_text = {pair(r) for r in train if not gen.media_paths(r)}
    held_text = [pair(r) for r in heldout if not gen.media_paths(r)]
    assert held_text and not [p for p in held_text if p in train_text]
    # Every record: prompt + answer + media content.
    train_keys = {gen.record_key(r, out) for r in train}
    assert not [r for r in heldout if gen.record_key(r, out) in train_keys]
    # Media: paths, file bytes and decoded pixels.
    train_media = [rel for r in train for rel in gen.media_paths(r)]
    held_media = [rel for r in heldout for rel in gen.media_paths(r)]
    assert held_media and not set(held_media) & set(train_media)
    file_hash = {
        rel: hashlib.sha256((out / rel).read_bytes()).hexdigest() for rel in train_media + held_media
    }
    assert not {file_hash[r] for r in held_media} & {file_hash[r] for r in train_media}
    decoded = {rel: _decoded_digest(out / rel) for rel in train_media + held_media}
    assert not {decoded[r] for r in held_media} & {decoded[r] for r in train_media}
    # Same task families on both sides, so held-out measures generalisation inside a task, not a new task.
    assert {r["task"] for r in heldout} == {r["task"] for r in train} == set(gen.TASKS)


def test_heldout_text_stays_learnable(default_sample) -> None:
    """A held-out opposite asks a word pair seen in training, in a phrasing that training uses for other pairs."""
    out, _ = default_sample
    train, heldout = _read(out / "train.jsonl"), _read(out / "heldout.jsonl")
    train_prompts = [r["conversations"][0]["value"] for r in train if r["task"] == "opposite"]
    for r in heldout:
        if r["task"] != "opposite":
            continue
        prompt = r["conversations"][0]["value"]
        word = next(w for w in gen.OPPOSITES if f" {w}?" in prompt or f" {w}." in prompt)
        template = next(t for t in gen.OPPOSITE_TEMPLATES if t.format(w=word) + gen.SUFFIX == prompt)
        same_pair = [p for p in train_prompts if f" {word}?" in p or f" {word}." in p]
        assert same_pair and prompt not in same_pair, prompt
        assert any(p.startswith(template.split("{w}")[0]) for p in train_prompts if p not in same_pair), (
            template
        )
