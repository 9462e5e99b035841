"""The doctor on a two-dataset mixture holding every item of the bad-data catalogue (tests/test_catalogue.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from test_catalogue import GOOD_TEXT, build_catalogue, conv

from videollama3_train.config import compose
from videollama3_train.offline import run_doctor

GOOD_IMAGE = {"image": "good.png", "conversations": conv("<image>\nq")}
NON_UTF8_LINE = json.dumps({"conversations": conv("Hi?")}).encode().replace(b"Hi?", b"H\xff\xfei?")
# Same knobs as the catalogue's micro-batches: `drop` turns the over-long record into a too_long failure.
ENCODE = [
    "encode.length_policy=drop",
    "encode.max_length=512",
    "encode.max_visual_tokens=64",
    "encode.max_frames=4",
    "encode.min_frames=1",
]


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """Dataset 'main' (JSONL, with a non-UTF-8 line) and 'b' (JSON list) share the catalogue items.

    Returns the overrides and the expected failures ``{(dataset, record): reason}``.
    """
    base = tmp_path_factory.mktemp("doctor")
    root = base / "media"
    items = build_catalogue(root)
    main = [GOOD_TEXT, GOOD_IMAGE, GOOD_TEXT]
    b = [GOOD_IMAGE, GOOD_TEXT, GOOD_IMAGE]
    expected: dict[tuple[str, int], str] = {}
    for k, it in enumerate(items):
        name, records = ("main", main) if k % 2 == 0 else ("b", b)
        if it.reason is not None:
            expected[(name, len(records))] = it.reason
        records.append(it.record)
    lines = [json.dumps(r).encode() for r in main]
    lines.insert(2, NON_UTF8_LINE)  # record 2 of 'main'; the records after it move up by one
    expected = {(n, i + (n == "main" and i >= 2)): r for (n, i), r in expected.items()}
    expected[("main", 2)] = "bad_text"
    (base / "main.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (base / "b.json").write_text(json.dumps(b))
    overrides = [
        "data=file",
        f"data.path={base / 'main.jsonl'}",
        f"data.root={root}",
        f"+data.datasets={{b:{{path:{base / 'b.json'},root:{root}}}}}",
        "logger=disabled",
        *ENCODE,
    ]
    return overrides, expected, {"main": len(main) + 1, "b": len(b)}


@pytest.mark.slow  # ~6 s alone, over 10 s on a loaded machine
def test_doctor_reports_every_catalogue_item(mixture, tmp_path):
    overrides, expected, sizes = mixture
    out = tmp_path / "report"
    argv = [*overrides, f"output_dir={out}", "doctor.workers=2", "doctor.max_failure_rate=1.0"]
    code = run_doctor(compose("doctor", argv), argv, progress=False)
    assert code == 0  # nothing is above a threshold of 100%
    report = json.loads((out / "report.json").read_text())

    assert {n: d["records"] for n, d in report["datasets"].items()} == sizes
    assert {r: e["count"] for r, e in report["reasons"].items()} == dict(Counter(expected.values()))
    assert report["totals"]["failed"] == len(expected)  # the items that must work are not among them
    for reason, entry in report["reasons"].items():
        listed = {(ex["dataset"], ex["record"]) for ex in entry["examples"]}
        assert listed == {k for k, r in expected.items() if r == reason}, reason
        for ex in entry["examples"]:
            assert ex["file"] and f"[{reason}]" in ex["message"] and f"record {ex['record']}" in ex["message"]
    (utf8,) = report["reasons"]["bad_text"]["examples"]
    assert "line 3" in utf8["message"] and utf8["file"].endswith("main.jsonl")

    # the packing estimate uses each stage's own encode settings: stage 4 merges images 2x2, so 4x the patches
    stages = report["stages"]
    assert set(stages) == {"encoder_adaptation", "alignment", "multitask_sft", "video_finetune"}
    assert stages["video_finetune"]["patches_total"] > stages["multitask_sft"]["patches_total"]
    for s in stages.values():
        assert s["optimizer_steps_per_epoch"] >= 1 and 0 < s["fill_ratio"] <= 1
        assert s["samples_failed"] == len(expected)  # a bad record is left out of every stage's plan
        # the predicted activation peak per row: distribution, the bound (tiny preset: far from binding), worst row
        mem = s["memory"]
        assert mem["row_peak_gb"]["max"] == mem["worst_row"]["peak_gb"] <= mem["bound_gb"]
        assert mem["samples_over_memory"] == 0 and mem["worst_row"]["top"]

    md = (out / "report.md").read_text()
    assert "TOO MANY" not in md and "| `corrupt_video` | 1 |" in md
    assert "## Activation memory per row" in md and "Worst row of multitask_sft" in md
    for png in report["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"tokens_per_sample.png", "video_durations.png", "image_resolutions.png"} <= set(report["plots"])


def test_misspelt_key_fails_at_start(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="doctor.workerz"):
        compose("doctor", ["data=sample", f"output_dir={tmp_path}", "doctor.workerz=2"])


@pytest.mark.slow
def test_command_exits_2_above_the_threshold(mixture, tmp_path):
    overrides, expected, sizes = mixture
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "videollama3_train.doctor",
        *overrides,
        f"output_dir={tmp_path / 'out'}",
        "doctor.workers=2",
        "doctor.stages=[multitask_sft]",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    # the default threshold is data.max_bad_fraction (1%): both datasets are far above it, and it says so
    assert "TOO MANY BAD RECORDS" in proc.stderr and "'main'" in proc.stderr and "'b'" in proc.stderr
    assert (tmp_path / "out" / "report.json").is_file()


def test_doctor_follows_symlinks_inside_the_root_unless_told(tmp_path):
    """A dataset folder linked into the media root (a cluster's shared copy): the doctor reads it by default;
    data.follow_symlinks=false reports it as path_escapes_root naming the record; `..` is refused either way."""
    from mediagen import make_image

    shared = tmp_path / "shared"
    shared.mkdir()
    make_image(shared / "a.png", size=(32, 24), pattern="noise")
    root = tmp_path / "data"
    root.mkdir()
    (root / "media").symlink_to(shared, target_is_directory=True)
    make_image(tmp_path / "outside.png", size=(32, 24), pattern="noise")
    records = [
        {"image": "media/a.png", "conversations": conv("<image>\nq")},
        {"image": "../outside.png", "conversations": conv("<image>\nq")},
    ]
    (root / "train.json").write_text(json.dumps(records))
    failures = {}
    for follow in ("true", "false"):
        out = tmp_path / f"report_{follow}"
        argv = [
            "data=file",
            f"data.path={root / 'train.json'}",
            f"data.follow_symlinks={follow}",
            f"output_dir={out}",
            "doctor.workers=0",
            "doctor.stages=[multitask_sft]",
            "doctor.max_failure_rate=1.0",
            "logger=disabled",
            *ENCODE,
        ]
        assert run_doctor(compose("doctor", argv), argv, progress=False) == 0
        report = json.loads((out / "report.json").read_text())
        failures[follow] = {ex["record"]: r for r, e in report["reasons"].items() for ex in e["examples"]}
    assert failures["true"] == {1: "path_escapes_root"}
    assert failures["false"] == {0: "path_escapes_root", 1: "path_escapes_root"}


def test_memory_report_names_the_worst_row_and_the_samples_that_drive_it():
    """The doctor's peak per row is the activation model's sum over the row's samples (plus the largest attention
    workspace once and the base); the worst row is the one holding the large video, which leads its samples."""
    import numpy as np

    from videollama3_train.data.config import DatasetConfig
    from videollama3_train.data.cost_model import ActivationModel, FlopsShape
    from videollama3_train.data.packing import PackPlan
    from videollama3_train.data.scan import memory_report
    from videollama3_train.reports import memory_lines

    costs = np.array([[500, 0], [800, 0], [3000, 9000], [400, 100], [1000, 0]])
    entries = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2)]
    plan = PackPlan.from_slots([[[0, 1], [4]], [[3, 2], []]], costs, 16384, 65536, entries=entries)
    shape = FlopsShape(d=1536, nq=12, nkv=2, hd=128, ff=8960, Ll=28, V=151936, dv=1152, ffv=4304, Lv=27)
    model = ActivationModel(shape, 16, attention="sdpa")
    rep = memory_report(plan, model, 40.0, [DatasetConfig(name="a"), DatasetConfig(name="b")])
    b = model.bound(costs, 0)
    by_hand = {tuple(r): b.base + int(b.add[r].sum()) + int(b.peak[r].max()) for r in ([0, 1], [4], [3, 2])}
    assert rep["row_peak_gb"]["max"] == pytest.approx(by_hand[(3, 2)] / 1e9) == rep["worst_row"]["peak_gb"]
    assert rep["row_peak_gb"]["median"] == pytest.approx(sorted(by_hand.values())[1] / 1e9)
    top = rep["worst_row"]["top"]
    assert [(d["dataset"], d["record"]) for d in top] == [("b", 0), ("b", 1)] and top[0]["patches"] == 9000
    lines = "\n".join(memory_lines({"s": {"memory": rep}}))
    assert "Worst row of s" in lines and "b record 0: 3000 tokens, 9000 patches" in lines
