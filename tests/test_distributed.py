"""Two CPU processes (gloo) through ``torch.distributed.run`` on tests/dist_worker.py, on every backend: DDP and
ZeRO-1/2/3 (accelerate's DeepSpeed plugin, DeepSpeed's CPU accelerator).

The oracle is a computation in one process on the whole global batch:

* the gradient of the global batch normalised once by its label tokens (``grads`` plan: 4 micro-batches with
  2..17 label tokens, 2 per rank). AdamW with ``lr = eps = 1e4`` makes the update ``lr * m / (sqrt(v) + eps)``
  nearly linear in the gradient, so a wrong normalisation (per micro-batch, per rank, 1/GA twice) shows;
* with clipping at a norm small enough to bite: the update of the clipped gradient, and the logged ``grad_norm``
  equal to the reference's norm before clipping;
* ZeRO-3 with every parameter partitioned (persistence threshold 0, asserted by every rank) and a rank that only
  ever sees text-only micro-batches, over several steps: the weights equal those of ``fit`` run in this process on
  the same global batches. The dummy tower pass keeps the ranks' parameter gathers in step (without it the run
  hangs: the timeout fails the test);
* a non-finite loss on one rank's micro-batch (its gradients finite: only the loss says so): every rank skips the
  step (its parameters, digested on every rank, are unchanged), the schedule does not advance, the skip is counted
  once, and ``nan_tolerance`` consecutive skips abort with the message.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from dist_worker import (
    RUN_SEPARATOR,
    ListLoader,
    grad_check_batches,
    read_digests,
    run_logs,
    textonly_batches,
    tiny_setup,
)
from helpers import forkrun
from test_fit import _adam_first_update, _cfg, _reference_grads

from videollama3_train.trainer import TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BACKENDS = ["ddp", "zero1", "zero2", "zero3"]


# Every run of this file, made one after the other in ONE launch of 2 processes (tests/dist_worker.py runs them in
# turn; a launch costs more than the runs of the tiny model): name -> worker arguments. ZeRO-3 runs last (a ZeRO-3
# accelerator leaves transformers' "ZeRO-3 enabled" flag behind). The tests read each run's directory and log.
NAN_ARGS = [
    "--plan", "ranked", "--ranked-samples", "80", "--rows-per-step", "4", "--steps", "8", "--lr", "1e-3", "--eps",
    "1e-8", "--schedule", "linear", "--max-grad-norm", "1.0", "--nan-steps", "2,4,5", "--fault-rank", "1",
    "--nan-tolerance", "2", "--digests", "--expect-error", "nan_tolerance=2",
]  # fmt: skip
MAX_NORM = 0.05
TEXTONLY_STEPS, TEXTONLY_GA = 3, 2


def _runs() -> dict[str, list[str]]:
    runs: dict[str, list[str]] = {}
    for b in BACKENDS:
        grads = [*_backend_args(b), "--grad-accum", "2", "--steps", "1", "--plan", "grads"]
        runs[f"grads_{b}"] = grads
        runs[f"clip_{b}"] = [*grads, "--max-grad-norm", str(MAX_NORM)]
        runs[f"nan_{b}"] = [*_backend_args(b), *NAN_ARGS]
    runs["textonly_zero3"] = [
        *_backend_args("zero3"), "--plan", "textonly", "--grad-accum", str(TEXTONLY_GA), "--steps",
        str(TEXTONLY_STEPS), "--save-every", str(TEXTONLY_STEPS),
    ]  # fmt: skip
    return runs


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (the run's directory, its part of the log). A hang fails with the log after the timeout."""
    root = tmp_path_factory.mktemp("distributed")
    argv: list[str] = []
    for name, args in _runs().items():
        argv += [RUN_SEPARATOR] if argv else []
        argv += ["--out", str(root / name), *args]
    log = forkrun([(2, argv)], timeout=800)  # the ranks forked by tests/forkrun.py: the imports paid once
    parts = run_logs(log)
    assert len(parts) == len(_runs()), log[-6000:]
    return {name: (root / name, part) for name, part in zip(_runs(), parts)}


def _backend_args(backend: str) -> list[str]:
    # ZeRO-3 with every parameter partitioned: the tiny model's tensors are all below the repository's persistence
    # threshold, which would keep them whole on every rank (nothing would be tested)
    return ["--backend", backend, *(["--partition-all"] if backend == "zero3" else [])]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_partitioned(log: str, backend: str) -> None:
    if backend == "zero3":
        for rank in (0, 1):
            assert f"PARTITIONED {rank} " in log, log[-3000:]


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial state, gradient of the global batch of the ``grads`` plan)."""
    model, tok = tiny_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return before, _reference_grads(copy.deepcopy(model), grad_check_batches(tok))


def _assert_update(out: Path, before: dict, update: dict, what: str) -> None:
    after = torch.load(out / "params_after.pt", weights_only=True)
    assert update, "no gradient in the reference"
    for k, u in update.items():
        torch.testing.assert_close(after[k] - before[k], u, atol=1e-5, rtol=1e-4, msg=f"{what}: {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_match_one_process_on_the_global_batch(backend: str, reference, launched) -> None:
    """grad_accum 2 on each of 2 ranks: the update equals the one of the global batch normalised once. With rank 1
    holding a text-only micro-batch, ZeRO-2 also proves the tower runs in the same order on every rank (it reduces
    gradient buckets in gradient-ready order)."""
    out, log = launched[f"grads_{backend}"]
    assert "WORKER DONE" in log, log[-6000:]
    _assert_partitioned(log, backend)
    before, grads = reference
    _assert_update(out, before, {k: _adam_first_update(g, 1e4, 1e4) for k, g in grads.items()}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_matches_the_clipped_reference_and_logs_the_norm_before_clipping(
    backend: str, reference, launched
) -> None:
    before, grads = reference
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item()
    assert norm > 4 * MAX_NORM  # clipping bites
    out, log = launched[f"clip_{backend}"]
    assert "WORKER DONE" in log, log[-6000:]
    _assert_partitioned(log, backend)
    coef = MAX_NORM / (norm + 1e-6)
    _assert_update(
        out, before, {k: _adam_first_update(g * coef, 1e4, 1e4) for k, g in grads.items()}, backend
    )
    (row,) = _rows(out)
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-4), backend


def test_zero3_all_partitioned_with_a_text_only_rank_matches_one_process(tmp_path: Path, launched) -> None:
    """ZeRO-3, every parameter partitioned, rank 1 text-only for 3 steps of grad_accum 2: finishes within the
    timeout and ends with the weights of ``fit`` in one process on the same global batches (4 micro-batches a step)
    -- loss normalisation under ZeRO-3 included."""
    steps, ga = TEXTONLY_STEPS, TEXTONLY_GA
    out, log = launched["textonly_zero3"]
    assert "WORKER DONE" in log, log[-6000:]
    _assert_partitioned(log, "zero3")
    model, tok = tiny_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    per_rank = [textonly_batches(tok, r, ga * steps) for r in (0, 1)]
    assert all("pixel_values" not in b and "pixel_values_videos" not in b for b in per_rank[1])
    global_batches = [b for s in range(steps) for r in (0, 1) for b in per_rank[r][s * ga : (s + 1) * ga]]
    cfg = _cfg(lr_vision=1e4, lr_projector=1e4, lr_llm=1e4, adam_eps=1e4, max_grad_norm=0.0, grad_accum=2 * ga,
               max_steps=steps)  # fmt: skip
    fit(model, ListLoader(global_batches), cfg, out_dir=tmp_path / "reference")
    expected = {k: v - before[k] for k, v in model.state_dict().items()}
    after = torch.load(out / "params_after.pt", weights_only=True)
    assert any(k.startswith("model.vision_model.") and e.abs().max() > 0 for k, e in expected.items())
    for k, e in expected.items():
        torch.testing.assert_close(after[k] - before[k], e, atol=1e-5, rtol=1e-4, msg=k)
    assert (out / "checkpoints" / f"step-{steps:08d}" / "COMPLETE").is_file()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_loss_on_one_rank_skips_the_step_everywhere_then_aborts(backend: str, launched) -> None:
    """Steps 2, 4 and 5 get a NaN loss on rank 1's first micro-batch (of 2); nan_tolerance 2. Step 2 is skipped
    on every rank (parameters unchanged), the lr does not move, the skip is counted once; steps 4-5 abort."""
    out, log = launched[f"nan_{backend}"]
    for rank in (0, 1):  # the abort reaches every rank, with the message
        assert (
            f"EXPECTED ERROR {rank}: 2 consecutive steps with a non-finite loss or gradient norm (nan_tolerance=2)"
            in log
        ), log[-4000:]
    rows = {r["step"]: r for r in _rows(out)}
    assert sorted(rows) == [1, 2, 3, 4, 5], log[-3000:]
    assert [rows[s]["nonfinite"] for s in range(1, 6)] == [False, True, False, True, True]
    # counted once per step, not once per rank
    assert [rows[s]["skipped_nonfinite"] for s in range(1, 6)] == [0, 1, 1, 2, 3]
    lr = [rows[s]["lr/llm"] for s in range(1, 6)]
    assert lr[1] == lr[0] and lr[2] < lr[1] and lr[3] == lr[2]  # the schedule stands still on a skipped step
    assert all(math.isfinite(rows[s]["grad_norm"]) for s in (1, 3))
    for rank in (0, 1):
        d = read_digests(out, rank)
        assert sorted(d) == [1, 2, 3, 4, 5], log[-3000:]
        assert d[2] != d[1] and d[4] != d[3], f"rank {rank}: an applied step changed nothing"
        assert d[3] == d[2] and d[5] == d[4], f"rank {rank}: a skipped step changed the parameters"
    assert not (out / "params_after.pt").exists()


def test_a_deepspeed_config_without_gradient_norm_is_refused(tmp_path: Path) -> None:
    """DeepSpeed returns no gradient norm with compute_grad_norm off: every step would read as non-finite while the
    engine kept updating. Refused when the config is built."""
    from videollama3_train.trainer.deepspeed import deepspeed_config

    ds = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    ds["zero_optimization"]["compute_grad_norm"] = False
    (tmp_path / "zero2.json").write_text(json.dumps(ds))
    with pytest.raises(ValueError, match="compute_grad_norm"):
        deepspeed_config(TrainConfig(backend="zero2", deepspeed_config_dir=str(tmp_path)), 2)
    built = deepspeed_config(TrainConfig(backend="zero2", precision="bf16", grad_accum=3), 4)
    assert built["bf16"]["check_grad_overflow"] is True  # a NaN norm skips the update under bf16 too
    assert (built["gradient_accumulation_steps"], built["train_batch_size"]) == (3, 12)
