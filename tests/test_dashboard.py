"""The W&B run a person reads, checked offline by reading the run's own files back: the pipeline's group and the
stage as job type, config updates, a predictions table with media thumbnails (no row lost), artifacts, the
summary; and the thumbnails themselves (an image, a video strip, a missing file leaves the row without one)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from test_metrics import _wandb_records, offline_wandb  # noqa: F401 - a fixture
from test_sample_data import gen

from videollama3_train.dashboard import HELDOUT_COLUMNS, THUMB_FRAMES, THUMB_HEIGHT, heldout_rows, thumbnail
from videollama3_train.evaluate import prompt_and_media
from videollama3_train.trainer.metrics import MetricsWriter


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dash")
    gen.generate(out, seed=2, n_train=0, n_heldout=12)
    return out


def _records(sample: Path) -> list[dict]:
    return [json.loads(line) for line in (sample / "heldout.jsonl").read_text().splitlines()]


def test_thumbnails(sample: Path):
    records = _records(sample)
    video = next(r for r in records if "video" in r)
    image = next(r for r in records if isinstance(r.get("image"), str))
    _, items = prompt_and_media(video)
    strip = thumbnail(sample, items)
    assert strip.shape[0] == THUMB_HEIGHT and strip.dtype == np.uint8
    # a strip of frames spread over the clip: the moving square is not in the same place in the first and last
    width = strip.shape[1] // THUMB_FRAMES
    assert not np.array_equal(strip[:, :width], strip[:, -width:])
    prompt, items = prompt_and_media(image)
    assert prompt.endswith("Answer with one word.") and "<image>" not in prompt
    assert thumbnail(sample, items).shape[0] == THUMB_HEIGHT
    assert thumbnail(sample, [{"type": "image", "path": "media/none.png"}]) is None


def _wait_for_exit(run_file: Path) -> list:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        records = _wandb_records(run_file)
        if any(r.HasField("exit") for r in records):
            return records
        time.sleep(0.1)
    return _wandb_records(run_file)


def test_wandb_run_holds_group_tables_artifacts(offline_wandb, sample: Path, tmp_path: Path):  # noqa: F811
    records = _records(sample)
    predictions = []
    for r in records:
        prompt, media = prompt_and_media(r)
        predictions.append(
            {
                "task": r["task"],
                "modality": r["modality"],
                "prompt": prompt,
                "media": media,
                "reference": r["answer"],
                "generated": "red",
                "correct": r["answer"] == "red",
            }
        )
    rows = heldout_rows({"predictions": predictions}, sample)
    report = tmp_path / "report.md"
    report.write_text("# doctor\n")
    out = tmp_path / "run"
    with MetricsWriter(
        out, wandb_mode="offline", group="pipeline-x", job_type="alignment", config={"a": 1}
    ) as w:
        w.log(1, {"loss": 2.0})
        w.config({"effective": {"lr_llm": 0.01}})
        w.log_table("eval/predictions", HELDOUT_COLUMNS, rows, step=1)
        w.log_artifact("doctor-report", "doctor", [report])
        w.summary({"export": str(out / "export")})
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    recs = _wait_for_exit(run_file)
    (run,) = [r.run for r in recs if r.HasField("run")]
    assert run.run_group == "pipeline-x" and run.job_type == "alignment"
    config = {u.key: json.loads(u.value_json) for r in recs if r.HasField("config") for u in r.config.update}
    assert config["effective"] == {"lr_llm": 0.01}
    metrics = {
        r.metric.glob_name or r.metric.name: r.metric.step_metric for r in recs if r.HasField("metric")
    }
    assert metrics.get("eval/*") == "trainer/step"
    artifacts = {r.artifact.type: r.artifact for r in recs if r.HasField("artifact")}
    assert [c.path for c in artifacts["doctor"].manifest.contents] == ["report.md"]
    # the table: every prediction is a row, thumbnails stored as images beside it
    (table_file,) = (out / "wandb").glob("offline-run-*/files/media/table/eval/predictions_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == HELDOUT_COLUMNS and len(table["data"]) == len(records)
    assert [row[2:] for row in table["data"]] == [row[2:] for row in rows]
    images = [c.path for c in artifacts["run_table"].manifest.contents if c.path.endswith(".png")]
    assert len(images) == sum(row[0] is not None for row in rows) > 0
    summary = {
        u.key: json.loads(u.value_json) for r in recs if r.HasField("summary") for u in r.summary.update
    }
    assert summary["export"] == str(out / "export")


def test_doctor_report_is_an_artifact_when_wandb_is_on(offline_wandb, sample: Path, tmp_path: Path):  # noqa: F811
    from videollama3_train.config import compose
    from videollama3_train.offline import run_doctor

    out = tmp_path / "doctor"
    argv = [
        "data=file",
        f"data.path={sample / 'heldout.jsonl'}",
        "logger=offline",
        "doctor.stages=[multitask_sft]",
        "doctor.workers=0",
        f"output_dir={out}",
    ]
    run_doctor(compose("doctor", argv), argv, progress=False)
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    recs = _wait_for_exit(run_file)
    (run,) = [r.run for r in recs if r.HasField("run")]
    assert run.job_type == "doctor"
    (artifact,) = [r.artifact for r in recs if r.HasField("artifact")]
    paths = {c.path for c in artifact.manifest.contents}
    report = json.loads((out / "report.json").read_text())
    assert artifact.type == "doctor" and paths == {"report.md", "report.json", *report["plots"]}
