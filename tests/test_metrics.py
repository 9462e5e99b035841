"""FLOPs / MFU follow REFERENCE §6 exactly; the MetricsWriter writes JSONL, an offline W&B run and a progress bar."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

from videollama3_train.model.presets import build_model_config
from videollama3_train.trainer.metrics import (
    FlopsShape,
    MetricsWriter,
    RunLogger,
    batch_stats,
    combine_batch_stats,
    flops_per_step,
    mfu,
    shape_from_config,
    throughput,
)

# d=4, nq=2, nkv=1, hd=2, ff=8, Ll=1, V=10 | dv=4, ffv=8, Lv=1, 2px patches, 3 channels
SMALL = FlopsShape(d=4, nq=2, nkv=1, hd=2, ff=8, Ll=1, V=10, dv=4, ffv=8, Lv=1, patch=2)


def _small_batch() -> dict:
    """Two packed samples (3 + 5 tokens, 4 labels), one 2x2-patch image, one 2-frame 1x2-patch video."""
    labels = torch.full((1, 8), -100)
    labels[0, [2, 5, 6, 7]] = 1
    return {
        "input_ids": torch.zeros(1, 8, dtype=torch.long),
        "labels": labels,
        "cu_seqlens": torch.tensor([0, 3, 8], dtype=torch.int32),
        "sample_lengths": [3, 5],
        "image_grid_thw": torch.tensor([[1, 2, 2]]),
        "image_merge_sizes": torch.tensor([1]),
        "video_grid_thw": torch.tensor([[2, 1, 2]]),
        "video_merge_sizes": torch.tensor([1]),
        "video_compression_mask": torch.tensor([True, True, True, False]),  # the 2nd frame loses one token
    }


def test_batch_stats_of_a_packed_row() -> None:
    stats = batch_stats(_small_batch())
    assert stats == {
        "N_tokens": 8,
        "N_logit_tokens": 4,
        "sample_lengths": [3, 5],
        "N_visual_llm_tokens": 4 + 3,
        "segment_patches": [4, 2, 2],  # each video frame is its own tower segment
    }
    no_lengths = {
        k: v for k, v in _small_batch().items() if k not in ("sample_lengths", "video_compression_mask")
    }
    stats = batch_stats(no_lengths)
    assert stats["sample_lengths"] == [3, 5] and stats["N_visual_llm_tokens"] == 4 + 4


def test_flops_match_hand_computation() -> None:
    stats = batch_stats(_small_batch())
    # W_layer = 4*2*2 + 2*4*1*2 + 2*2*4 + 3*4*8 = 144 ; W_vit = (4*16 + 2*4*8) + 3*2*2*4 = 176
    # sum s^2 = 9 + 25 = 34 ; sum P = 8 ; sum P^2 = 16 + 4 + 4 = 24 ; N_visual = 7
    expected_train = {
        "F_llm": 6 * 1 * 144 * 8,
        "F_head": 6 * 4 * 10 * 4,
        "F_attn": 6 * 1 * 2 * 2 * 34,
        "F_proj": 6 * (4 * 4 + 4 * 4) * 7,
        "F_vit": 6 * 176 * 8 + 2 * 6 * 1 * 4 * 24,
    }
    got = flops_per_step(SMALL, stats, llm_trains=True, vision_trains=True)
    assert got == {**expected_train, "total": sum(expected_train.values())}

    expected_frozen = {  # stage 1: LLM frozen (kl=4); vision frozen alone (kv=2) as a second case
        "F_llm": 4 * 144 * 8,
        "F_head": 4 * 4 * 10 * 4,
        "F_attn": 4 * 2 * 2 * 34,
        "F_proj": 6 * 32 * 7,
        "F_vit": 2 * 176 * 8 + 2 * 2 * 4 * 24,
    }
    got = flops_per_step(SMALL, stats, llm_trains=False, vision_trains=False)
    assert got == {**expected_frozen, "total": sum(expected_frozen.values())}


def test_accumulated_stats_add_up() -> None:
    one = batch_stats(_small_batch())
    two = combine_batch_stats([one, one])
    f1 = flops_per_step(SMALL, one, llm_trains=True, vision_trains=True)
    f2 = flops_per_step(SMALL, two, llm_trains=True, vision_trains=True)
    assert f2["total"] == pytest.approx(2 * f1["total"])


def test_shape_from_2b_config_and_per_token_costs() -> None:
    shape = shape_from_config(build_model_config("videollama3_2b"))
    assert shape == FlopsShape(
        d=1536, nq=12, nkv=2, hd=128, ff=8960, Ll=28, V=151936, dv=1152, ffv=4304, Lv=27, patch=14
    )
    n = 1000
    text = {"N_tokens": n, "N_logit_tokens": n, "sample_lengths": [1] * n, "N_visual_llm_tokens": 0}
    f = flops_per_step(shape, {**text, "segment_patches": []}, llm_trains=True, vision_trains=True)
    # REFERENCE §6: about 9 GFLOP per trained LLM token (layers + head; attention excluded: 1-token samples)
    assert (f["F_llm"] + f["F_head"]) / n == pytest.approx(9e9, rel=0.15)

    empty = {"N_tokens": 0, "N_logit_tokens": 0, "sample_lengths": [], "N_visual_llm_tokens": 0}
    # merge 2: a 24x24-patch frame gives 144 LLM tokens -> about 11 GFLOP of tower work per LLM token
    f = flops_per_step(shape, {**empty, "segment_patches": [576]}, llm_trains=True, vision_trains=True)
    assert f["F_vit"] / 144 == pytest.approx(11e9, rel=0.15)
    # merge 1: a 30x30-patch image gives 900 LLM tokens -> about 2.8 GFLOP each
    f = flops_per_step(shape, {**empty, "segment_patches": [900]}, llm_trains=True, vision_trains=True)
    assert f["F_vit"] / 900 == pytest.approx(2.8e9, rel=0.15)


def test_formula_weights_match_the_real_model() -> None:
    """W_layer * Ll and W_vit's linear part equal the matmul weights of an instantiated (tiny) model."""
    from transformers import VideoLlama3ForConditionalGeneration

    config = build_model_config("tiny", image_token_id=600, video_token_id=601)
    with torch.device("meta"):  # shapes only: skip weight initialisation
        model = VideoLlama3ForConditionalGeneration(config)
    s = shape_from_config(config)
    llm = model.model.language_model
    llm_matmul = sum(
        m.weight.numel() for m in llm.layers.modules() if isinstance(m, torch.nn.Linear)
    )  # q, k, v, o, gate, up, down
    assert llm_matmul == s.Ll * (
        s.d * s.nq * s.hd + 2 * s.d * s.nkv * s.hd + s.nq * s.hd * s.d + 3 * s.d * s.ff
    )
    tower = model.model.vision_model
    tower_linear = sum(m.weight.numel() for m in tower.modules() if isinstance(m, torch.nn.Linear))
    assert tower_linear == s.Lv * (4 * s.dv * s.dv + 2 * s.dv * s.ffv)
    conv = [m for m in tower.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(m.weight.numel() for m in conv) == s.channels * s.patch * s.patch * s.dv
    assert model.lm_head.weight.shape == (s.V, s.d)


def test_mfu_and_throughput() -> None:
    assert mfu(989.4e12, 2.0, 4) == pytest.approx(0.125)
    speed = throughput({"N_tokens": 20_000}, 2 * 989.4e12, 2.0, 2)
    assert speed == pytest.approx({"tokens_per_s": 10_000, "tflops_per_gpu": 494.7, "mfu": 0.5})
    speed = throughput({"N_tokens": 20_000, "N_visual_llm_tokens": 5_000}, 2 * 989.4e12, 2.0, 2)
    assert speed["visual_tokens_per_s"] == pytest.approx(2_500) and speed["mfu"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="seconds"):
        mfu(1.0, 0.0, 1)


# ---------------------------------------------------------------------------------------------------------------
# MetricsWriter
# ---------------------------------------------------------------------------------------------------------------


def _wandb_records(run_file: Path) -> list:
    """History rows of an offline ``.wandb`` file.

    The file is a LevelDB-style log (7-byte header ``:W&B`` + magic + version, then 32 KiB blocks of chunks with
    a 7-byte header: crc32 u32, length u16, type u8 = full/first/middle/last) of ``wandb_internal_pb2.Record``
    protobufs. Reading it directly avoids ``wandb sync`` and any network.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind not in (1, 4):
            continue
        record = pb.Record()
        record.ParseFromString(pending)
        records.append(record)
    return records


def _wandb_history(run_file: Path, timeout_s: float = 30.0) -> list[dict]:
    """History rows of a finished offline run; waits for its ``exit`` record (wandb-core writes asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = _wandb_records(run_file)
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return [
        {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.HasField("history")
    ]


@pytest.fixture()
def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # Any accidental network attempt would go to a closed local port and fail at once.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))


def test_metrics_writer_offline_wandb_and_jsonl(offline_wandb, tmp_path: Path) -> None:
    out = tmp_path / "stage1"
    with MetricsWriter(
        out, project="test", run_name="unit", wandb_mode="offline", config={"lr": 1e-3}
    ) as logger:
        for step in range(1, 4):
            logger.log(step, {"loss": torch.tensor(2.0 / step), "loss/modality/image": 1.5, "mfu": 0.25})
        logger.summary({"heldout_accuracy": 0.75})
    assert logger.summaries == {"heldout_accuracy": 0.75}

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert lines[1]["loss"] == pytest.approx(1.0) and lines[2]["loss/modality/image"] == 1.5
    assert json.loads((out / "summary.json").read_text()) == {"heldout_accuracy": 0.75}

    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    rows = _wandb_history(run_file)
    assert [row["_step"] for row in rows] == [1, 2, 3]
    assert {"loss", "loss/modality/image", "mfu"} <= set(rows[0])
    assert rows[2]["loss"] == pytest.approx(2.0 / 3)


def test_metrics_writer_disabled_wandb_needs_no_wandb(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises ImportError
    assert RunLogger is MetricsWriter  # the old name of the W&B half
    logger = MetricsWriter(tmp_path)  # W&B disabled by default
    logger.log(0, {"loss": 1.0})
    logger.finish()
    logger.finish()  # idempotent
    assert logger.wandb_run is None
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 0, "loss": 1.0}
    with pytest.raises(ValueError, match="wandb_mode"):
        MetricsWriter(tmp_path, wandb_mode="dryrun")


def test_metrics_writer_progress_bar_and_non_finite_values(tmp_path: Path) -> None:
    """The bar shows the loss and the lr of each trainable group (short names); NaN is written as a string."""
    writer = MetricsWriter(tmp_path, total_steps=4)
    writer.log(1, {"loss": float("nan"), "lr/vision": 2e-6, "lr/llm": 1e-5, "tokens_per_s": 10.0})
    postfix = writer._bar.postfix
    assert "lr_vision=2.00e-06" in postfix and "lr_llm=1.00e-05" in postfix and "lr_projector" not in postfix
    writer.finish()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == "nan"


def test_disabled_metrics_writer_writes_nothing(tmp_path: Path) -> None:
    """Built on every rank, enabled on rank 0 only: elsewhere it opens no file and no bar."""
    writer = MetricsWriter(tmp_path / "rank1", enabled=False, total_steps=3)
    writer.log(1, {"loss": 1.0})
    writer.summary({"accuracy": 0.5})
    writer.finish()
    assert not (tmp_path / "rank1").exists()
