"""The training loop on the tiny model, single process, CPU, fp32.

Gradient checks use AdamW's first step with ``lr = eps = 1e4``: the update is ``lr * g / (|g| + eps)``, a monotone,
nearly linear function of the gradient ``g`` (plain AdamW's first step is ``lr * sign(g)`` and would hide any
scaling error), so comparing updates compares gradients.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist_worker import ListLoader, grad_check_batches, make_sample, pack, tiny_setup, train_batches

from videollama3_train.contract import VISUAL_KEYS
from videollama3_train.trainer import TrainConfig, find_latest_checkpoint, fit
from videollama3_train.trainer.metrics import (
    H100_BF16_PEAK,
    MetricsWriter,
    batch_stats,
    combine_batch_stats,
    flops_per_step,
    shape_from_config,
)

REPO = Path(__file__).resolve().parents[1]


def _cfg(**kw) -> TrainConfig:
    base = dict(
        lr_vision=1e-3,
        lr_projector=1e-3,
        lr_llm=1e-3,
        precision="fp32",
        save_every=0,
        log_every=1,
        lr_schedule="constant",
        warmup_ratio=0.0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _losses(out_dir: str | Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl (a step logged twice, e.g. before a crash and after resume: last wins)."""
    out = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


def _reference_grads(model: torch.nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """d(sum of token losses over all micro-batches / all label tokens)/dparams, from full fp32 logits."""
    model.zero_grad()
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    keys = ("input_ids", "position_ids", *VISUAL_KEYS)
    for b in batches:
        logits = model(**{k: b[k] for k in keys if k in b}, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[0, :-1], b["labels"][0, 1:], ignore_index=-100, reduction="sum")
        (loss / total).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _adam_first_update(g: torch.Tensor, lr: float, eps: float) -> torch.Tensor:
    return -lr * g / (g.abs() + eps)


def test_loss_decreases_on_repeated_batch(tmp_path: Path) -> None:
    model, tok = tiny_setup()
    batch = train_batches(tok, n=1)[0]
    cfg = _cfg(max_steps=12, lr_vision=1e-3, lr_projector=3e-3, lr_llm=3e-3)
    metrics = fit(model, ListLoader([batch] * 12), cfg, out_dir=tmp_path)
    losses = _losses(tmp_path)
    assert len(losses) == 12 and metrics["step"] == 12
    assert losses[12] < losses[1] - 1.0, losses
    assert metrics["grad_norm"] > 0 and metrics["lr/llm"] == pytest.approx(3e-3)
    assert "loss/dataset/alpha" in metrics and "loss/modality/image" in metrics


class _SlowLoader(ListLoader):
    """Blocks 20 ms per micro-batch (so the step has a measurable data wait) and reports skipped samples."""

    def __iter__(self):
        for batch in super().__iter__():
            time.sleep(0.02)
            yield batch


def test_every_step_logs_speed_and_data_metrics(tmp_path: Path) -> None:
    """Each logged step carries tokens/s, visual tokens/s, MFU and TFLOP/s from the REFERENCE §6 FLOPs of its own
    micro-batches, packing fill, data-wait fraction, lrs, grad norm; skip counters appear on log steps."""
    model, tok = tiny_setup()
    batches = train_batches(tok, n=4)
    loader = _SlowLoader(batches, token_budget=64)
    loader.skipped = {"decode_error": 2, "too_long": 1}
    rows: list[dict] = []
    cfg = _cfg(max_steps=2, grad_accum=2, log_every=2)
    fit(model, loader, cfg, out_dir=tmp_path, on_step=rows.append)

    assert [r["step"] for r in rows] == [1, 2]
    shape = shape_from_config(model.config)
    pads = torch.tensor([tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")])
    for row, mbs in zip(rows, (batches[:2], batches[2:]), strict=True):
        tokens = sum(b["input_ids"].numel() for b in mbs)
        visual = sum(int(torch.isin(b["input_ids"], pads).sum()) for b in mbs)
        flops = flops_per_step(
            shape, combine_batch_stats([batch_stats(b) for b in mbs]), llm_trains=True, vision_trains=True
        )["total"]
        sec = row["seconds"]
        assert row["tokens"] == tokens and row["visual_tokens"] == visual > 0
        assert row["tokens_per_s"] == pytest.approx(tokens / sec)
        assert row["visual_tokens_per_s"] == pytest.approx(visual / sec)
        assert row["tflops_per_gpu"] == pytest.approx(flops / sec / 1e12)
        assert row["mfu"] == pytest.approx(flops / sec / H100_BF16_PEAK)
        assert row["packing_fill"] == pytest.approx(tokens / (2 * 64))
        assert 0 < row["data_wait_fraction"] <= 1  # 2 x 20 ms blocked on the loader inside the step
        assert row["grad_norm"] > 0 and row["skipped_nonfinite"] == 0 and row["nonfinite"] is False
        assert {"lr/vision", "lr/projector", "lr/llm", "loss/dataset/alpha", "loss/modality/video"} <= set(
            row
        )
    assert "skipped/decode_error" not in rows[0]  # the loaders' counters are gathered on log steps only
    assert rows[1]["skipped/decode_error"] == 2 and rows[1]["skipped/too_long"] == 1

    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [set(r) for r in logged] == [
        set(r) for r in rows
    ]  # metrics.jsonl and on_step (W&B) carry the same


def test_gradients_normalised_once_over_the_global_batch(tmp_path: Path) -> None:
    """grad_accum 4 over micro-batches with 2..17 label tokens: the update equals that of the global token mean."""
    model, tok = tiny_setup()
    batches = grad_check_batches(tok)
    reference = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr = eps = 1e4
    cfg = _cfg(
        lr_vision=lr,
        lr_projector=lr,
        lr_llm=lr,
        adam_eps=eps,
        max_grad_norm=0.0,
        grad_accum=4,
        max_steps=1,
    )
    fit(model, ListLoader(batches), cfg, out_dir=tmp_path)
    grads = _reference_grads(reference, batches)
    after = model.state_dict()
    for k, g in grads.items():
        torch.testing.assert_close(
            after[k] - before[k], _adam_first_update(g, lr, eps), atol=1e-5, rtol=1e-4, msg=k
        )


def test_gradient_clipping_applies(tmp_path: Path) -> None:
    model, tok = tiny_setup()
    batches = grad_check_batches(tok)
    reference = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr = eps = 1e4
    cfg = _cfg(
        lr_vision=lr,
        lr_projector=lr,
        lr_llm=lr,
        adam_eps=eps,
        max_grad_norm=0.05,
        grad_accum=4,
        max_steps=1,
    )
    metrics = fit(model, ListLoader(batches), cfg, out_dir=tmp_path)
    grads = _reference_grads(reference, batches)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    assert metrics["grad_norm"] == pytest.approx(
        norm.item(), rel=1e-4
    )  # the logged norm is the pre-clip norm
    assert norm > 0.05
    scale = 0.05 / norm
    after = model.state_dict()
    for k, g in grads.items():
        torch.testing.assert_close(
            after[k] - before[k], _adam_first_update(g * scale, lr, eps), atol=1e-6, rtol=1e-4
        )


@pytest.mark.parametrize("frozen", ["vision", "llm"])
def test_frozen_groups_get_no_update(tmp_path: Path, frozen: str) -> None:
    model, tok = tiny_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(max_steps=2, **{f"lr_{frozen}": None})
    fit(model, ListLoader(train_batches(tok, n=2)), cfg, out_dir=tmp_path)
    prefixes = {"vision": ("model.vision_model.",), "llm": ("model.language_model.", "lm_head.")}
    for k, v in model.state_dict().items():
        changed = not torch.equal(v, before[k])
        if k.startswith(prefixes[frozen]):
            assert not changed, f"frozen {k} changed"
        elif k.startswith("model.projector.") and k.endswith("weight"):
            assert changed, f"trainable {k} did not change"


def test_resume_repeats_the_same_losses(tmp_path: Path) -> None:
    """2 epochs of 4 steps, cosine + warmup. Run all 8; separately run, crash during step 4, restart from the
    step-3 checkpoint with fresh objects: steps 4..8 (crossing the epoch boundary) give identical losses."""
    kw = dict(grad_accum=2, epochs=2, lr_schedule="cosine", warmup_ratio=0.2, save_every=3, keep_last=2)
    model, tok = tiny_setup()
    cfg = _cfg(**kw)
    full, part = tmp_path / "a", tmp_path / "b"
    fit(model, ListLoader(train_batches(tok)), cfg, out_dir=full)

    class Crash(Exception):
        pass

    def crash_at_4(metrics: dict) -> None:
        if metrics["step"] == 4:
            raise Crash

    model, tok = tiny_setup()
    with pytest.raises(Crash):
        fit(model, ListLoader(train_batches(tok)), cfg, out_dir=part, on_step=crash_at_4)
    assert find_latest_checkpoint(part).name == "step-00000003"

    # "Process restart": everything rebuilt from scratch; fit finds the checkpoint itself.
    model, tok = tiny_setup(seed=123)  # different init: the weights must come from the checkpoint
    loader = ListLoader(train_batches(tok))
    metrics = fit(model, loader, cfg, out_dir=part)
    assert loader.served == 5 * 2  # steps 4..8 only: no replay of consumed micro-batches
    a, b = _losses(full), _losses(part)
    assert [b[s] for s in range(4, 9)] == [a[s] for s in range(4, 9)]
    assert metrics["step"] == 8
    ckpts = sorted(p.name for p in (part / "checkpoints").iterdir())
    assert ckpts == ["step-00000006", "step-00000008"]  # keep_last=2, no .tmp left behind


def test_incomplete_checkpoint_is_ignored(tmp_path: Path) -> None:
    model, tok = tiny_setup()
    cfg = _cfg(max_steps=2, save_every=1)
    fit(model, ListLoader(train_batches(tok, n=2)), cfg, out_dir=tmp_path)
    root = tmp_path / "checkpoints"
    (root / "step-00000009.tmp").mkdir()  # a save interrupted by a crash
    torn = root / "step-00000007"
    torn.mkdir()  # renamed dir without the COMPLETE marker cannot happen, but must not be trusted either
    deleting = root / "step-00000008.trash"  # a deletion (keep_last) interrupted by a crash
    deleting.mkdir()
    (deleting / "COMPLETE").write_text("8\n")
    assert find_latest_checkpoint(tmp_path).name == "step-00000002"


def test_sigterm_checkpoints_and_exits_zero(tmp_path: Path) -> None:
    model, tok = tiny_setup()
    cfg = _cfg(max_steps=8, save_every=0)

    def term_at_2(metrics: dict) -> None:
        if metrics["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as exc:
        fit(model, ListLoader(train_batches(tok)), cfg, out_dir=tmp_path, on_step=term_at_2)
    assert exc.value.code == 0
    latest = find_latest_checkpoint(tmp_path)
    assert latest is not None and latest.name in ("step-00000002", "step-00000003")
    assert signal.getsignal(signal.SIGTERM) is not None


def _nan_batch(tok, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    b = pack([make_sample(tok, gen, modality="image", n_prompt=4, n_answer=4)])
    b["pixel_values"] = b["pixel_values"].clone()
    b["pixel_values"][0, 0] = float("nan")
    return b


def test_nonfinite_steps_are_skipped_then_abort(tmp_path: Path) -> None:
    model, tok = tiny_setup()
    good = train_batches(tok, n=2)
    snapshots: dict[int, torch.Tensor] = {}

    def snap(metrics: dict) -> None:
        snapshots[metrics["step"]] = model.model.projector.readout[0].weight.detach().clone()

    cfg = _cfg(max_steps=3, nan_tolerance=2)
    metrics = fit(
        model, ListLoader([good[0], _nan_batch(tok, 0), good[1]]), cfg, out_dir=tmp_path, on_step=snap
    )
    assert metrics["skipped_nonfinite"] == 1
    assert torch.equal(snapshots[2], snapshots[1])  # the NaN step changed nothing
    assert not torch.equal(snapshots[3], snapshots[2])  # and training went on
    assert torch.isfinite(snapshots[3]).all()

    model, tok = tiny_setup()
    cfg = _cfg(max_steps=5, nan_tolerance=2)
    loader = ListLoader([good[0], _nan_batch(tok, 0), good[1], _nan_batch(tok, 1), _nan_batch(tok, 2)])
    with pytest.raises(FloatingPointError, match="2 consecutive steps"):
        fit(model, loader, cfg, out_dir=tmp_path / "abort")


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="nothing would train"):
        TrainConfig(lr_vision=None, lr_projector=None, lr_llm=None)
    with pytest.raises(ValueError, match="backend"):
        TrainConfig(backend="fsdp")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="lr_llm"):
        TrainConfig(lr_llm=-1.0)
    with pytest.raises(ValueError, match="lr_scale"):
        TrainConfig(lr_scale=0.0)
    with pytest.raises(ValueError, match="lr_max"):
        TrainConfig(lr_max=-1e-3)


def test_effective_learning_rates_are_scaled_then_capped() -> None:
    cfg = TrainConfig(lr_vision=None, lr_projector=1e-3, lr_llm=1e-5, lr_scale=300.0, lr_max=0.01)
    assert cfg.base_lrs == {"vision": None, "projector": 1e-3, "llm": 1e-5}
    assert cfg.lrs == pytest.approx({"vision": None, "projector": 0.01, "llm": 3e-3})
    assert TrainConfig().lrs == TrainConfig().base_lrs  # scale 1, no cap


def test_scaled_lr_reaches_the_optimizer_and_eval_runs_on_its_cadence(tmp_path: Path) -> None:
    """fit trains at ``cfg.lrs`` (scaled, capped), calls eval_fn every ``eval_every`` steps and logs its values
    through the given writer; a writer passed in is used and left open for the caller."""
    model, tok = tiny_setup()
    cfg = _cfg(max_steps=3, lr_vision=1e-4, lr_projector=1e-4, lr_llm=1e-3, lr_scale=5.0, lr_max=2e-3)
    calls: list[int] = []

    def eval_fn(m, step: int) -> dict[str, float]:
        calls.append(step)
        return {"acc": step / 10}

    writer = MetricsWriter(tmp_path / "w")
    metrics = fit(
        model,
        ListLoader(train_batches(tok, n=3)),
        cfg,
        out_dir=tmp_path,
        eval_fn=eval_fn,
        eval_every=2,
        writer=writer,
    )
    assert calls == [2]
    assert metrics["lr/vision"] == pytest.approx(5e-4) and metrics["lr/llm"] == pytest.approx(2e-3)
    writer.summary({"accuracy_after": 0.5})  # still usable after fit
    writer.finish()
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 2, 3] and rows[2] == {"step": 2, "eval/acc": 0.2}
    assert not (tmp_path / "metrics.jsonl").exists()  # the given writer, not a default one
    assert writer.summaries == {"accuracy_after": 0.5}
    with pytest.raises(ValueError, match="eval_every"):
        fit(model, ListLoader(train_batches(tok, n=1)), cfg, out_dir=tmp_path, eval_every=-1)


def test_an_accelerator_of_another_backend_is_refused() -> None:
    from videollama3_train.trainer.backend import DDPBackend, build_accelerator, build_backend

    accelerator = build_accelerator(_cfg())
    assert isinstance(build_backend(_cfg(), accelerator), DDPBackend)
    with pytest.raises(ValueError, match="zero2"):
        build_backend(_cfg(backend="zero2"), accelerator)


def test_micro_batch_whose_samples_all_failed_adds_nothing(tmp_path: Path) -> None:
    """An empty marker from the loader (every sample failed to decode) becomes a label-free row: the step's update
    equals the one of the good micro-batches alone, and nothing crashes."""
    model, tok = tiny_setup()
    batches = grad_check_batches(tok)[:2]
    reference = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr = eps = 1e4
    cfg = _cfg(
        lr_vision=lr,
        lr_projector=lr,
        lr_llm=lr,
        adam_eps=eps,
        max_grad_norm=0.0,
        grad_accum=3,
        max_steps=1,
    )
    empty = {"empty": True, "meta": [], "sample_lengths": [], "num_skipped": 2}
    fit(model, ListLoader([batches[0], empty, batches[1]]), cfg, out_dir=tmp_path)
    grads = _reference_grads(reference, batches)
    after = model.state_dict()
    for k, g in grads.items():
        torch.testing.assert_close(
            after[k] - before[k], _adam_first_update(g, lr, eps), atol=1e-5, rtol=1e-4, msg=k
        )
