"""The motion generalisation set (data/generate_motion.py): labels true to the pixels, splits disjoint, balanced,
reproducible. B7 (benchmarks/bench_generalisation.py) trusts all three."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "data" / "generate_motion.py"


@pytest.fixture(scope="module")
def gm():
    spec = importlib.util.spec_from_file_location("generate_motion", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def motion_set(gm, tmp_path_factory):
    out = tmp_path_factory.mktemp("motion")
    summary = gm.generate(out, seed=3, n_train=40, n_heldout=20)
    read = lambda name: [json.loads(line) for line in (out / name).read_text().splitlines()]  # noqa: E731
    return out, summary, read("train.jsonl"), read("heldout.jsonl")


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.int16)


def _track(frames: np.ndarray) -> list[tuple[float, float]]:
    """Centre (x, y) of the moving square in each frame: the pixels far from the static scene (the per-pixel
    median over time, which is the background wherever the square passes for less than half the clip)."""
    scene = np.median(frames, axis=0)
    centres = []
    for frame in frames:
        ys, xs = np.nonzero(np.abs(frame - scene).sum(-1) > 90)
        assert len(xs), "a frame without the square"
        centres.append((xs.mean(), ys.mean()))
    return centres


def test_every_motion_label_is_what_the_clip_shows(motion_set):
    out, _, train, heldout = motion_set
    motion = [r for r in train + heldout if r["task"] == "motion"]
    assert len(motion) >= 20
    for record in motion:
        frames = _frames(out / record["video"])
        centres = _track(frames)
        dx = centres[-1][0] - centres[0][0]
        dy = centres[-1][1] - centres[0][1]
        side = frames.shape[1]
        seen = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert seen == record["conversations"][1]["value"], record["video"]
        # It travels far (a large share of the frame) and only along one axis.
        assert max(abs(dx), abs(dy)) > 0.3 * side and min(abs(dx), abs(dy)) < 0.05 * side, (
            record["video"],
            dx,
            dy,
        )


def test_splits_are_disjoint_balanced_and_shaped_as_declared(gm, motion_set):
    out, summary, train, heldout = motion_set
    assert summary["overlap"] == {"records": 0, "media_paths": 0, "media_bytes": 0}
    assert gm.sample.overlap(train, heldout, out) == summary["overlap"]
    for records, shares in ((train, gm.TRAIN_SHARES), (heldout, gm.HELDOUT_SHARES)):
        counts = Counter(r["task"] for r in records)
        assert counts == Counter(gm.sample._apportion(len(records), shares))
        answers = Counter(r["conversations"][1]["value"] for r in records if r["task"] == "motion")
        assert set(answers) == set(gm.DIRECTIONS) and max(answers.values()) - min(answers.values()) <= 1
    assert all({"answer", "choices", "modality"} <= set(r) for r in heldout)
    assert not any("answer" in r for r in train)
    assert summary["motion_baseline_accuracy"] == pytest.approx(
        gm.sample.majority_baseline(train, [r for r in heldout if r["task"] == "motion"])
    )


def test_the_set_is_a_function_of_its_seed(gm, motion_set, tmp_path):
    out, _, train, heldout = motion_set
    gm.generate(tmp_path, seed=3, n_train=40, n_heldout=20)
    assert (tmp_path / "train.jsonl").read_text() == (out / "train.jsonl").read_text()
    assert (tmp_path / "heldout.jsonl").read_text() == (out / "heldout.jsonl").read_text()
    clip = next(r["video"] for r in heldout if r["task"] == "motion")
    assert np.abs(_frames(tmp_path / clip) - _frames(out / clip)).max() <= 2  # within what the codec allows


def test_b7_table_puts_motion_first_with_its_margin():
    spec = importlib.util.spec_from_file_location(
        "bench_generalisation", SCRIPT.parents[1] / "benchmarks" / "bench_generalisation.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = {
        "n": 10,
        "accuracy": 0.7,
        "baseline": 0.2,
        "accuracy_per_task": {"colour": 1.0, "motion": 0.75},
        "baseline_per_task": {"colour": 0.25, "motion": 0.25},
        "n_per_task": {"colour": 2, "motion": 8},
    }
    rows = bench.table({"result": result}).splitlines()
    assert rows[2] == "| motion | 8 | 0.750 | 0.250 | +0.500 |"
    assert rows[3] == "| colour | 2 | 1.000 | 0.250 | +0.750 |"
    assert rows[-1] == "| all | 10 | 0.700 | 0.200 | +0.500 |"
