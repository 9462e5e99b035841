"""The sample-data generator writes a decodable, deterministic, balanced dataset in the official schema."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import av
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


def test_chance_level_is_computable(sample: Path) -> None:
    heldout = _read(sample / "heldout.jsonl")
    chance = gen.chance_accuracy(heldout)
    assert chance == pytest.approx(sum(1 / len(r["choices"]) for r in heldout) / len(heldout))
    assert 0.1 < chance < 0.5


def test_answers_balanced_per_task(tmp_path: Path) -> None:
    counts = gen.task_counts(120)
    assert sum(counts.values()) == 120
    assert counts["direction"] + counts["video_colour"] == 42  # 35% video
    records = gen.build_split(gen.random.Random(0), tmp_path, "t", 120, with_answers=True)
    by_task: dict[str, Counter] = {}
    for r in records:
        by_task.setdefault(r["task"], Counter())[r["answer"]] += 1
    for task, answers in by_task.items():
        classes = gen.TASKS[task][1]
        n = counts[task]
        if n >= len(classes):
            assert set(answers) == set(classes), task
        assert max(answers.values()) - min(answers.get(c, 0) for c in classes) <= 1, (task, answers)


def test_motion_matches_direction(sample: Path) -> None:
    """The label is learnable: the coloured square's centroid moves the way the answer says."""
    for record in _read(sample / "heldout.jsonl"):
        if record["task"] != "direction":
            continue
        with av.open(str(sample / record["video"])) as container:
            frames = [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(video=0)]
        centroids = []
        for frame in frames:
            # The background is grey (r == g == b); the square is saturated.
            ys, xs = ((frame.max(-1) - frame.min(-1)) > 80).nonzero()
            centroids.append((xs.mean(), ys.mean()))
        dx, dy = centroids[-1][0] - centroids[0][0], centroids[-1][1] - centroids[0][1]
        expected = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert expected == record["answer"]


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    gen.generate(a, seed=1, n_train=12, n_heldout=6)
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(b), "--seed", "1", "--train", "12", "--heldout", "6"],
        check=True,
        capture_output=True,
    )
    gen.generate(c, seed=2, n_train=12, n_heldout=6)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "train.jsonl").read_text() != (c / "train.jsonl").read_text()


def test_default_size_is_small(tmp_path: Path) -> None:
    summary = gen.generate(tmp_path, seed=0)
    assert (summary["train"], summary["heldout"]) == (360, 60)
    assert summary["media_bytes"] < 5e6
