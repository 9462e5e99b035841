"""The configuration the stage recipes train with, under test on CPU: activation checkpointing of both towers,
ZeRO-1 / ZeRO-3, bf16, a global batch, a frozen LLM.

Oracles: the one-process gradient of the whole global batch normalised once (tests/test_fit.py ``_reference_grads``;
AdamW's first update with ``lr = eps = 1e4`` is nearly linear in the gradient, so comparing updates compares
gradients), and ``fit`` itself in one process on the same global batches. The multi-process cases run in one
launch of tests/numerics_worker.py (several fits in one process, see there).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from dist_worker import (
    ListLoader,
    grad_check_batches,
    make_sample,
    pack,
    read_digests,
    textonly_batches,
    tiny_setup,
)
from helpers import forkrun
from numerics_worker import launch_once
from test_fit import _adam_first_update, _cfg, _reference_grads

from videollama3_train.model.api import apply_gradient_checkpointing
from videollama3_train.trainer import fit
from videollama3_train.trainer.step import LossModule


def _dropout_everywhere(model: torch.nn.Module, p: float = 0.2) -> list[int]:
    """Dropout on the MLP output of every layer of both towers (inside what checkpointing recomputes); returns a
    list that counts the MLP calls (a checkpointed layer runs its MLP twice: forward and recompute)."""
    calls = [0]

    def hook(m, i, o):
        calls[0] += 1
        return torch.nn.functional.dropout(o, p=p, training=m.training)

    for layer in [*model.model.language_model.layers, *model.model.vision_model.encoder.layers]:
        layer.mlp.register_forward_hook(hook)
    return calls


def _loss_and_grads(
    model, batch, checkpointing: str, seed: int
) -> tuple[float, dict[str, torch.Tensor], int]:
    calls = _dropout_everywhere(model)
    apply_gradient_checkpointing(model, checkpointing)
    module = LossModule(model, 4096).train()
    torch.manual_seed(seed)
    loss, _ = module(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.item(), grads, calls[0]


def test_checkpointing_both_towers_equals_none_with_dropout() -> None:
    """One process, fp32, dropout on every layer of both towers: with activation checkpointing of both towers the
    loss and every gradient equal those without (the recompute replays each layer's dropout masks: torch's
    checkpoint restores the RNG state it saved)."""
    model, tok = tiny_setup()
    gen = torch.Generator().manual_seed(3)
    batch = pack(
        [make_sample(tok, gen, modality=m, n_prompt=5, n_answer=6) for m in ("image", "video", "text")]
    )
    plain, ckpt = model, copy.deepcopy(model)
    loss, grads, calls = _loss_and_grads(plain, batch, "none", seed=0)
    loss_ckpt, grads_ckpt, calls_ckpt = _loss_and_grads(ckpt, batch, "both", seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        assert (
            float(LossModule(plain, 4096).train()(batch)[0]) != loss
        )  # dropout moves the loss: masks matter
    assert calls_ckpt == 2 * calls > 0  # every layer was checkpointed (its MLP ran again in backward)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6, abs=0)
    assert grads_ckpt.keys() == grads.keys()
    assert any(".vision_model." in n for n in grads) and any(".language_model." in n for n in grads)
    for n, g in grads.items():
        torch.testing.assert_close(grads_ckpt[n], g, rtol=1e-5, atol=1e-7, msg=n)


# ----------------------------------------------------------------------------------------------------------------
# Two processes: ZeRO-1 / ZeRO-3 with checkpointing, ZeRO-1 in bf16, ZeRO-3 with a frozen LLM
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """Output root of the one 2-process launch of tests/numerics_worker.py (shared with tests/test_sp_fit.py)."""
    return launch_once(tmp_path_factory)


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial state, fp32 gradient of the global batch of the ``grads`` plan, no checkpointing, one process)."""
    model, tok = tiny_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return before, _reference_grads(copy.deepcopy(model), grad_check_batches(tok))


def _rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", ["zero1_ckpt", "zero3_ckpt"])
def test_zero_with_checkpointing_equals_the_one_process_reference(cases: Path, reference, case: str) -> None:
    """2 ranks x grad_accum 2, checkpointing of both towers (ZeRO-3: every parameter partitioned): the update equals
    the one of the global batch's gradient in one process without checkpointing."""
    if case == "zero3_ckpt":
        log = (cases / "log.txt").read_text()
        assert all(f"PARTITIONED {case} {r} " in log for r in (0, 1)), log[-3000:]
    before, grads = reference
    after = torch.load(cases / case / "params_after.pt", weights_only=True)
    assert grads
    for k, g in grads.items():
        u = _adam_first_update(g, 1e4, 1e4)
        torch.testing.assert_close(after[k] - before[k], u, atol=1e-5, rtol=1e-4, msg=f"{case}: {k}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero1_bf16_skips_a_nonfinite_step_everywhere_and_updates_within_bf16_tolerance(
    cases: Path, reference
) -> None:
    """ZeRO-1 in bf16 (DeepSpeed's bf16 parameters, fp32 master weights): a NaN loss on rank 1 at step 1 leaves every
    rank's parameters unchanged (digests) and is counted once; step 2 (the same global batch) is then the first
    update, equal to the fp32 reference's within bf16 tolerance."""
    out = cases / "zero1_bf16_nan"
    rows = _rows(out)
    assert [rows[s]["nonfinite"] for s in (1, 2)] == [True, False]
    assert [rows[s]["skipped_nonfinite"] for s in (1, 2)] == [1, 1]
    for rank in (0, 1):
        d = read_digests(out, rank)
        assert d[2] == d[1], f"rank {rank}: the skipped step changed the parameters"
        assert d["final"] != d[2], f"rank {rank}: the applied step changed nothing"
    before, grads = reference
    after = torch.load(out / "params_after.pt", weights_only=True)
    for k, g in grads.items():
        assert after[k].dtype == torch.bfloat16, k
        # DeepSpeed's fp32 master weights start from the bf16 parameters: w1 = bf16(bf16(w0) + u)
        w0 = before[k].to(torch.bfloat16).float()
        u = _adam_first_update(g, 1e4, 1e4)
        _assert_bf16_update(after[k].float() - w0, u, w0, k)


def _assert_bf16_update(got: torch.Tensor, u: torch.Tensor, w0: torch.Tensor, name: str) -> None:
    """The bf16 tolerance, element by element: the rounding of the new weight to bf16 (at most 2^-8 of it) plus 5% of
    the tensor's largest update (the bf16 forward and backward move the gradient: measured at most 1.3% of it over
    the tiny model's 66 tensors; a gradient off by a factor 2 is ~99% on 61 of them)."""
    excess = ((got - u).abs() - 2.0**-8 * (w0 + u).abs()).clamp(min=0)
    worst = float(excess.max() / u.abs().max().clamp(min=1e-12))
    assert worst <= 0.05, (
        f"{name}: the update is off the fp32 reference's by {worst:.1%} of its largest element"
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero3_frozen_llm_with_a_text_only_rank_finishes_and_equals_one_process(cases: Path) -> None:
    """Stage 1 under ZeRO-3 (every parameter partitioned, the LLM frozen) with rank 1 text-only for 3 steps: the
    launch finished within its timeout (without ``uniform_backward`` the ranks' backward gathers differ and it
    hangs) and the weights equal those of ``fit`` in one process on the same global batches."""
    out = cases / "zero3_frozen_textonly"
    log = (cases / "log.txt").read_text()
    assert all(f"PARTITIONED zero3_frozen_textonly {r} " in log for r in (0, 1)), log[-3000:]
    steps, ga = 3, 2
    model, tok = tiny_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    per_rank = [textonly_batches(tok, r, ga * steps) for r in (0, 1)]
    assert all("pixel_values" not in b and "pixel_values_videos" not in b for b in per_rank[1])
    global_batches = [b for s in range(steps) for r in (0, 1) for b in per_rank[r][s * ga : (s + 1) * ga]]
    cfg = _cfg(lr_vision=1e4, lr_projector=1e4, lr_llm=None, adam_eps=1e4, max_grad_norm=0.0, grad_accum=2 * ga,
               max_steps=steps)  # fmt: skip
    fit(model, ListLoader(global_batches), cfg, out_dir=out.parent / "frozen_reference")
    after = torch.load(out / "params_after.pt", weights_only=True)
    trained = 0
    for k, v in model.state_dict().items():
        expected = v - before[k]
        if k.startswith(("model.language_model.", "lm_head.")):
            assert torch.equal(after[k], before[k]), f"frozen {k} changed"
        trained += bool(expected.abs().max() > 0)
        torch.testing.assert_close(after[k] - before[k], expected, atol=1e-5, rtol=1e-4, msg=k)
    assert trained and (out / "checkpoints" / f"step-{steps:08d}" / "COMPLETE").is_file()


# ----------------------------------------------------------------------------------------------------------------
# The recipes' configuration through the train command
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_recipe_shaped_run_trains_through_the_train_command(tmp_path: Path) -> None:
    """What every 2B/7B recipe runs (ZeRO-1, bf16, checkpointing of both towers, a global batch in samples), with the
    tiny preset on 2 processes through ``train``: the global batch becomes packed rows dealt as grad_accum per rank,
    every step is finite, and the checkpoint holds DeepSpeed's bf16 weights."""
    from test_sample_data import gen

    data = tmp_path / "data"
    gen.generate(data, seed=0, n_train=96, n_heldout=0)  # 3 global batches of 32 samples
    out, steps = tmp_path / "run", 2
    # the ranks forked by tests/forkrun.py (the imports paid once), with torchrun's environment
    log = forkrun([(2, [
        "stage=multitask_sft", "model=tiny", "data=sample",
        f"data.path={data / 'train.jsonl'}", f"data.root={data}", "data.heldout_path=null", "eval.before=false",
        "logger=disabled", f"output_dir={out}", "trainer.backend=zero1", "trainer.precision=bf16",
        "trainer.gradient_checkpointing=both", "trainer.global_batch_samples=32", f"trainer.max_steps={steps}",
        "trainer.log_every=1",
    ])], worker="train", timeout=600)  # fmt: skip
    assert "= 2 rank(s) x grad_accum 2" in log, log[-4000:]  # 32 samples: 4 packed rows of ~8
    rows = _rows(out)
    assert sorted(rows) == list(range(1, steps + 1))
    for r in rows.values():
        assert (
            not r["nonfinite"]
            and math.isfinite(r["loss"])
            and math.isfinite(r["grad_norm"])
            and r["grad_norm"] > 0
        )
    cfg = json.loads((out / "resolved_config.json").read_text())["trainer"]
    assert (cfg["backend"], cfg["precision"], cfg["gradient_checkpointing"]) == ("zero1", "bf16", "both")
    engine = torch.load(
        out / "checkpoints" / f"step-{steps:08d}" / "pytorch_model" / "mp_rank_00_model_states.pt",
        weights_only=False,
    )
    assert engine["ds_config"]["bf16"]["enabled"] and engine["ds_config"]["gradient_accumulation_steps"] == 2
    assert {v.dtype for v in engine["module"].values()} == {torch.bfloat16}
    assert (out / "export" / "config.json").is_file()
