"""Per-dataset and per-modality losses (``loss/dataset/<name>``, ``loss/modality/<m>``) whatever the loss kernel,
and over every rank's micro-batches.

* the chunked kernel and a fused kernel that gives no per-token losses (liger's kind, faked on CPU) log the same
  breakdown: with the fused one a no-grad chunked pass recomputes the per-token losses;
* the per-sample ``[loss sum, label tokens]`` reduction, and the reduction of those over steps and ranks;
* two processes (gloo, CPU) whose ranks hold different datasets log the per-dataset losses of one process that
  runs the whole global batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_worker import ListLoader, tiny_setup, train_batches
from helpers import forkrun

from videollama3_train.contract import IGNORE_INDEX
from videollama3_train.trainer import TrainConfig, fit
from videollama3_train.trainer import loss as loss_mod
from videollama3_train.trainer.metrics import StepLog, local_breakdown, reduce_breakdowns
from videollama3_train.trainer.step import PER_SAMPLE_KEY, LossModule, per_sample_losses

BREAKDOWN = ("loss/dataset/", "loss/modality/")


class FakeFused:
    """A fused linear cross-entropy as liger's: ``(weight, hidden, targets, bias) -> loss sum``, no per-token
    losses. Full logits in fp32 (fine at the tiny vocabulary)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, weight, hidden, targets, bias=None):
        self.calls += 1
        logits = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
        return F.cross_entropy(logits.float(), targets, reduction="sum")


@pytest.fixture()
def fake_fused(monkeypatch) -> FakeFused:
    fake = FakeFused()
    monkeypatch.setattr(loss_mod, "fused_loss_fn", lambda hidden, use_liger=True: fake)
    return fake


def _breakdown(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k.startswith(BREAKDOWN)}


def test_per_sample_losses_sum_and_count() -> None:
    # 3 packed samples of lengths 4, 3, 5; the first label of each is ignored (packing contract)
    labels = torch.tensor([[-100, 5, -100, 7, -100, 1, 2, -100, 3, 3, -100, 4]])
    batch = {"sample_lengths": [4, 3, 5], "labels": labels}
    n = int((labels[0, 1:] != IGNORE_INDEX).sum())
    token_losses = torch.arange(1, n + 1, dtype=torch.float32)  # 1..7 in shift_and_select order
    out = per_sample_losses(batch, labels, token_losses)
    # labelled positions after the shift: sample 0 -> labels 5, 7 (losses 1, 2); sample 1 -> 1, 2 (3, 4);
    # sample 2 -> 3, 3, 4 (5, 6, 7)
    assert out.dtype == torch.float64 and out.tolist() == [[3.0, 2.0], [7.0, 2.0], [18.0, 3.0]]


def test_local_and_reduced_breakdown() -> None:
    meta = [{"dataset": "a", "modality": "image"}, {"dataset": "b", "modality": "text"}, {"modality": "text"}]
    stats = torch.tensor([[6.0, 3.0], [2.0, 1.0], [8.0, 2.0]], dtype=torch.float64)
    local = local_breakdown([(meta, stats), ([], torch.zeros(1, 2, dtype=torch.float64))])
    assert local == {
        "loss/dataset/a": [6.0, 3.0],
        "loss/modality/image": [6.0, 3.0],
        "loss/dataset/b": [2.0, 1.0],
        "loss/modality/text": [10.0, 3.0],
        "loss/dataset/unnamed": [8.0, 2.0],
    }
    # single process: a mean per key and per step; a step with nothing has no key
    (step1, step2) = reduce_breakdowns([local, {}])
    assert step1["loss/modality/text"] == pytest.approx(10.0 / 3) and step2 == {}


def test_steplog_rows_without_breakdown_have_no_keys(tmp_path: Path) -> None:
    rows: list[dict] = []

    class Sink:
        def log(self, step, row):
            pass

    log = StepLog(Sink(), log_every=2, is_main=True, on_step=rows.append)
    meta = [{"dataset": "a", "modality": "image"}]
    log.add({"step": 1, "loss": 1.0}, [(meta, torch.tensor([[4.0, 2.0]], dtype=torch.float64))])
    log.add({"step": 2, "loss": 1.0}, [])  # a fused kernel on a step that did not ask for per-sample losses
    log.flush()
    assert _breakdown(rows[0]) == {"loss/dataset/a": 2.0, "loss/modality/image": 2.0}
    assert _breakdown(rows[1]) == {}


def test_fused_kernel_gives_the_same_per_sample_losses(fake_fused, monkeypatch) -> None:
    """LossModule with a fused kernel (no per-token losses): same loss and, through the no-grad recomputation, the
    same per-sample losses as the chunked kernel; without the request, no per-sample losses."""
    model, tok = tiny_setup()
    module = LossModule(model, chunk_size=5).eval()
    batch = train_batches(tok, n=2)[1]
    with torch.no_grad():
        fused_loss, fused_stats = module(dict(batch))
        assert fake_fused.calls == 1
        skipped_loss, skipped = module({**batch, PER_SAMPLE_KEY: False})
        assert skipped is None and fake_fused.calls == 2
        monkeypatch.setattr(
            loss_mod, "fused_loss_fn", lambda hidden, use_liger=True: None
        )  # the chunked kernel
        chunked_loss, chunked_stats = module(dict(batch))
    torch.testing.assert_close(fused_loss, chunked_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(skipped_loss, chunked_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_stats, chunked_stats, rtol=1e-5, atol=1e-5)
    assert fused_stats.shape == (len(batch["meta"]), 2)
    assert fused_stats[:, 1].sum() == int((batch["labels"][0, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(fused_stats[:, 0].sum().float(), chunked_loss, rtol=1e-5, atol=1e-5)


def _fit_rows(tmp_path: Path) -> list[dict]:
    model, tok = tiny_setup()
    cfg = TrainConfig(
        lr_vision=1e-3,
        lr_projector=1e-3,
        lr_llm=1e-3,
        grad_accum=2,
        max_steps=2,
        precision="fp32",
        save_every=0,
        log_every=2,
        warmup_ratio=0.0,
        lr_schedule="constant",
    )
    rows: list[dict] = []
    fit(model, ListLoader(train_batches(tok, n=4)), cfg, out_dir=tmp_path, on_step=rows.append)
    return [r for r in rows if "loss" in r]


def test_fit_logs_the_breakdown_with_a_fused_kernel(tmp_path: Path, monkeypatch) -> None:
    """Through fit: the fused kernel runs (faked on CPU) and every step row still has loss/dataset/* and
    loss/modality/*, equal to what the chunked kernel logs."""
    chunked = _fit_rows(tmp_path / "chunked")
    fake = FakeFused()
    monkeypatch.setattr(loss_mod, "fused_loss_fn", lambda hidden, use_liger=True: fake)
    fused = _fit_rows(tmp_path / "fused")
    assert fake.calls == 4  # 2 steps x 2 micro-batches
    assert [r["step"] for r in fused] == [1, 2]
    for a, b in zip(chunked, fused, strict=True):
        assert {"loss/dataset/alpha", "loss/dataset/beta", "loss/modality/text"} <= set(_breakdown(b))
        assert _breakdown(a).keys() == _breakdown(b).keys()
        for k, v in _breakdown(a).items():
            assert b[k] == pytest.approx(v, rel=1e-5), k
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------------------------


def _rows(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ranks_with_different_datasets_log_the_global_breakdown(tmp_path: Path) -> None:
    two, one = tmp_path / "two", tmp_path / "one"
    # both launches forked by one launcher (tests/forkrun.py: the imports paid once); rank 0 prints WORKER DONE
    log = forkrun(
        [(2, ["--out", str(two)]), (1, ["--out", str(one), "--single"], False)], worker="metrics_worker"
    )
    assert log.count("WORKER DONE") == 2, log[-6000:]
    dist_rows, ref_rows = _rows(two), _rows(one)
    assert [r["step"] for r in dist_rows] == [r["step"] for r in ref_rows] == [1, 2]
    for got, ref in zip(dist_rows, ref_rows, strict=True):
        # beta and video live on rank 1 only; alpha on both ranks
        assert set(_breakdown(ref)) == {
            "loss/dataset/alpha",
            "loss/dataset/beta",
            "loss/modality/text",
            "loss/modality/image",
            "loss/modality/video",
        }
        assert _breakdown(got).keys() == _breakdown(ref).keys()
        for k, v in _breakdown(ref).items():
            assert got[k] == pytest.approx(v, rel=1e-4), (got["step"], k)
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4)
