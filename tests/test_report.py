"""The pipeline report turns per-stage metrics.jsonl files into summary.md and a valid loss.png."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from videollama3_train.reports import read_metrics, stage_summary, write_summary


def _write_metrics(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _stage_rows(n: int, start_loss: float, modalities: tuple[str, ...]) -> list[dict]:
    rows = []
    for step in range(1, n + 1):
        row = {"step": step, "loss": start_loss / step, "tokens_per_s": 1000.0 * step, "mfu": 0.1 * step,
               "lr/llm": 1e-5, "grad_norm": 1.0}  # fmt: skip
        for i, m in enumerate(modalities):
            if step % (i + 1) == 0:  # a modality can be absent from a step
                row[f"loss/modality/{m}"] = start_loss / step + i
        rows.append(row)
    return rows


def test_write_summary(tmp_path: Path) -> None:
    _write_metrics(tmp_path / "s1" / "metrics.jsonl", _stage_rows(4, 8.0, ("image",)))
    _write_metrics(tmp_path / "s2" / "metrics.jsonl", _stage_rows(12, 4.0, ("image", "text", "video")))
    stages = [
        {"name": "encoder_adaptation", "output_dir": str(tmp_path / "s1")},
        {
            "name": "alignment",
            "output_dir": str(tmp_path / "s2"),
            "accuracy_before": 0.25,
            "accuracy_after": 0.875,
            "baseline_accuracy": 0.2517,
        },
        {"name": "multitask_sft", "output_dir": str(tmp_path / "missing")},  # not run yet
    ]
    md, png = write_summary(tmp_path / "report", stages)
    assert (md, png) == (tmp_path / "report" / "summary.md", tmp_path / "report" / "loss.png")

    text = md.read_text()
    # stage 1: 4 steps, first loss 8, final = mean(8/1..8/4) = 4.1667, tokens/s mean(2000,3000,4000), MFU median 0.3
    assert "| encoder_adaptation | 4 | 8.0000 | 4.1667 | 3,000 | 30.0% | – | – | – |" in text
    final2 = sum(4.0 / s for s in range(3, 13)) / 10  # last 10 of 12 steps
    assert f"| alignment | 12 | 4.0000 | {final2:.4f} | 7,000 |" in text
    assert "| 0.250 | 0.875 | 0.252 |" in text
    assert "| multitask_sft | 0 | – |" in text
    assert "## Final loss per modality" in text and "| image | text | video |" in text

    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 500 and image.height > 400
        # Not a blank canvas: curves were drawn.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10


def test_read_metrics_deduplicates_replayed_steps_and_rejects_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 9.0}, {"step": 2, "loss": 2.0}])
    rows = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 3.0), (2, 2.0)]
    summary = stage_summary(rows)
    assert summary["steps"] == 2 and summary["final_loss"] == pytest.approx(2.5)
    assert summary["tokens_per_s_mean"] is None

    # an evaluation row joins its step's training row (fit writes it after the step)
    _write_metrics(path, [{"step": 1, "loss": 3.0}, {"step": 1, "eval/heldout_accuracy": 0.5}])
    assert read_metrics(path) == [{"step": 1, "loss": 3.0, "eval/heldout_accuracy": 0.5}]

    path.write_text('{"step": 1, "loss": 1.0}\n{"loss": 2.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: every line needs a 'step'"):
        read_metrics(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not a JSON object"):
        read_metrics(path)


def test_stage_without_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a 'name'"):
        write_summary(tmp_path, [{"output_dir": str(tmp_path)}])


def test_cli_reads_recorded_accuracy(tmp_path: Path, capsys) -> None:
    from videollama3_train.report import main

    _write_metrics(tmp_path / "alignment" / "metrics.jsonl", _stage_rows(3, 2.0, ()))
    (tmp_path / "alignment" / "summary.json").write_text(
        json.dumps({"accuracy_before": 0.1, "accuracy_after": 0.9, "other": "x"})
    )
    assert main([str(tmp_path), "alignment"]) == 0
    assert "| alignment | 3 | 2.0000 |" in capsys.readouterr().out
    text = (tmp_path / "summary.md").read_text()
    assert "| 0.100 | 0.900 | – |" in text
    # A value given by the caller wins over the recorded one.
    md, _ = write_summary(tmp_path, [{"name": "alignment", "output_dir": str(tmp_path / "alignment"),
                                      "accuracy_after": 0.5}])  # fmt: skip
    assert "| 0.100 | 0.500 | – |" in md.read_text()
