"""The train command end to end on one stage: data -> fit -> checkpoints -> export, W&B offline, export command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_metrics import _wandb_history, offline_wandb  # noqa: F401 - fixture re-exported

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "data" / "generate_sample.py"),
            "--out",
            str(out),
            "--train",
            "48",
            "--heldout",
            "8",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def _overrides(sample: Path, *extra: str) -> list[str]:
    return [
        "model=tiny",
        "data=file",
        f"data.path={sample / 'train.jsonl'}",
        f"data.root={sample}",
        f"data.heldout_path={sample / 'heldout.jsonl'}",
        *extra,
    ]


@pytest.mark.slow
def test_one_stage_end_to_end_with_wandb_and_export_command(sample, tmp_path, offline_wandb):  # noqa: F811
    from transformers import AutoModelForImageTextToText

    from videollama3_train.config import ExportConfig, compose_stage
    from videollama3_train.offline import export_checkpoint
    from videollama3_train.run import run_stage

    out = tmp_path / "run"
    cfg = compose_stage(
        "alignment",
        _overrides(
            sample,
            "trainer.max_steps=4",
            "trainer.save_every=2",
            "trainer.log_every=1",
            "logger=offline",
            "eval.every=2",
        ),
        out,
        None,
    )
    results = run_stage(cfg)

    # the stage exported a transformers-native model and evaluated the held-out split before and after
    export = Path(results["export"])
    model = AutoModelForImageTextToText.from_pretrained(export, local_files_only=True)
    assert results["heldout_before"]["n"] == 8 and "accuracy" in results["heldout_after"]
    assert json.loads((out / "resolved_config.json").read_text())["stage"] == "alignment"
    # the effective values beside the configured ones: the tiny preset's scaled and capped lrs, the budgets
    effective = json.loads((out / "effective.json").read_text())
    assert effective["lrs"] == pytest.approx(cfg.trainer.lrs) and effective["lrs"]["llm"] == pytest.approx(
        3e-3
    )
    assert effective["world_size"] == 1 and effective["micro_batches_per_step"] == cfg.trainer.grad_accum
    assert effective["max_tokens_per_micro_batch"] == cfg.data.max_tokens == 1024
    assert effective["optimizer_steps_per_epoch"] >= 4 and effective["samples_per_step_mean"] > 0

    # metrics: one JSON line per step, and the same keys in the offline W&B run
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # eval.every=2: a held-out evaluation row after steps 2 and 4
    evals = [r for r in rows if "eval/heldout_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4] and all("eval/heldout_loss" in r for r in evals)
    # per-task accuracy (the dashboard's table beside it): before training (step 0), at each evaluation, and after
    per_task = [r for r in rows if any(k.startswith("eval/heldout_accuracy/task/") for k in r)]
    assert {r["step"] for r in per_task} == {0, 2, 4} and [r["step"] for r in per_task][0] == 0
    rows = [r for r in rows if r not in evals and r not in per_task]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    expected = {
        "loss",
        "grad_norm",
        "lr/vision",
        "lr/projector",
        "lr/llm",
        "tokens_per_s",
        "visual_tokens_per_s",
        "mfu",
        "packing_fill",
        "data_wait_fraction",
        "skipped_nonfinite",
    }
    assert expected <= set(rows[-1]), set(rows[-1])
    assert any(k.startswith("loss/modality/") for k in rows[-1]) and "loss/dataset/main" in rows[-1]
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history = _wandb_history(run_file)
    assert expected <= set(history[-1]), set(history[-1])

    # the export command turns the last checkpoint into the same model
    hf = export_checkpoint(ExportConfig(checkpoint=str(out), output=str(tmp_path / "hf"), dtype="float32"))
    again = AutoModelForImageTextToText.from_pretrained(hf, local_files_only=True)
    for (k, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(again.state_dict().items())):
        torch.testing.assert_close(a, b, msg=k)


def test_train_command_rejects_missing_data_with_a_clear_message(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "videollama3_train.train",
            "model=tiny",
            "data=file",
            f"data.path={tmp_path / 'nope.jsonl'}",
            f"output_dir={tmp_path / 'out'}",
            "logger=disabled",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "annotation file of dataset 'main' not found" in proc.stderr


@pytest.mark.slow
def test_global_batch_in_samples_sets_the_rows_per_step(sample, tmp_path):
    """trainer.global_batch_samples reaches the data build (it was once read by nothing): the loader turns it into
    packed rows per step, and grad_accum follows."""
    from videollama3_train.config import compose_stage
    from videollama3_train.run import run_stage

    out = tmp_path / "run"
    cfg = compose_stage(
        "alignment",
        _overrides(sample, "trainer.max_steps=1", "trainer.global_batch_samples=24", "logger=disabled"),
        out,
        None,
    )
    run_stage(cfg)
    effective = json.loads((out / "effective.json").read_text())
    assert effective["global_batch_samples"] == 24
    assert effective["grad_accum"] >= 2 and effective["micro_batches_per_step"] == effective["grad_accum"]
