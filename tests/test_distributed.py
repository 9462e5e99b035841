"""Two CPU processes (gloo) through ``torch.distributed.run`` on tests/dist_worker.py.

* DDP, ZeRO-1 and ZeRO-2 (accelerate's DeepSpeed plugin, DeepSpeed's CPU accelerator) with grad_accum 2: the update after
  one step equals the one computed here, in one process, from the gradient of the whole global batch (4
  micro-batches, 2..17 label tokens each) normalised once. AdamW with ``lr = eps = 1e4`` makes the first update
  ``lr * g / (|g| + eps)``: nearly linear in ``g``, so a wrong normalisation (per micro-batch, per rank, 1/GA twice)
  shows. With rank 1 holding a text-only micro-batch, ZeRO-2 also proves the tower runs in the same order on
  every rank (its gradient buckets are reduced in gradient-ready order; a dummy tower pass placed after the LLM
  mixed up buckets across ranks).
* ZeRO-3 where rank 1 only ever sees text-only micro-batches finishes (the dummy tower pass keeps the ranks'
  parameter gathers in step) within the subprocess timeout.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_worker import grad_check_batches, tiny_setup
from test_fit import _adam_first_update, _reference_grads

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *args: str, timeout: int = 400) -> str:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(REPO / "tests" / "dist_worker.py"),
        "--out",
        str(out),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"torchrun did not finish within {timeout}s (hang?):\n{e.stdout}\n{e.stderr}"
        ) from e
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "WORKER DONE" in log, log[-6000:]
    return log


@pytest.fixture(scope="module")
def expected_update() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial state, expected first update) for the global batch of the ``grads`` plan."""
    model, tok = tiny_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = _reference_grads(copy.deepcopy(model), grad_check_batches(tok))
    return before, {k: _adam_first_update(g, 1e4, 1e4) for k, g in grads.items()}


@pytest.mark.parametrize("backend", ["ddp", "zero1", "zero2"])
def test_two_processes_match_one_process_on_the_global_batch(
    tmp_path: Path, backend: str, expected_update
) -> None:
    _torchrun(tmp_path, "--backend", backend, "--grad-accum", "2", "--steps", "1", "--plan", "grads")
    before, update = expected_update
    after = torch.load(tmp_path / "params_after.pt", weights_only=True)
    assert update, "no gradient in the reference"
    for k, u in update.items():
        torch.testing.assert_close(after[k] - before[k], u, atol=1e-5, rtol=1e-4, msg=f"{backend}: {k}")


def test_zero3_with_a_text_only_rank_finishes(tmp_path: Path) -> None:
    log = _torchrun(
        tmp_path,
        "--backend",
        "zero3",
        "--grad-accum",
        "2",
        "--steps",
        "2",
        "--plan",
        "textonly",
        "--lr",
        "1e-3",
        "--eps",
        "1e-8",
        "--max-grad-norm",
        "1.0",
        timeout=400,
    )
    after = torch.load(tmp_path / "params_after.pt", weights_only=True)
    model, _ = tiny_setup()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, after[k])]
    # Every group trained, the vision tower included (rank 0's images reach it through ZeRO-3's reduce-scatter).
    assert any(k.startswith("model.vision_model.") for k in changed), log[-3000:]
    assert any(k.startswith("model.language_model.") for k in changed)
    assert (tmp_path / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
