"""FSDP2 (``trainer.backend=fsdp2``) under the faults and layouts the DDP and ZeRO tests already cover, with their own
oracles reused: SIGKILL inside a checkpoint write, inside a backward and inside a forward (tests/test_faults.py: the
``ranked`` plan, each rank different rows, dropout on, compared bit for bit with an uninterrupted run), HSDP on a
2 x 2 mesh (the one-process gradient of the global batch, tests/test_fit.py), and a resume at another world size
checked by sample ids across an epoch boundary (tests/test_world_size.py's checks, as they are).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import test_world_size
import torch
from dist_worker import grad_check_batches, run_logs, tiny_setup
from helpers import REPO, torchrun
from test_faults import _assert_same_run, _Launches
from test_fit import _adam_first_update, _losses, _reference_grads

from videollama3_train.trainer import find_latest_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
FSDP2 = ("--backend", "fsdp2")


def test_sigkill_inside_a_save_a_backward_and_a_forward_resumes_bit_identical(tmp_path: Path) -> None:
    """2 ranks, each its own rows, dropout on, checkpoints every 2 of 6 steps. kill -9 while the step-4 checkpoint
    is being written (RNG states in ``.tmp``, no DCP shards, no ``COMPLETE``): the restart resumes from step 2; kill
    -9 it while rank 1 is inside step 5's backward: the next restart resumes from step 4; kill -9 that one while
    rank 0 is inside step 6's forward (rank 1 waits in its all-gather): the last restart resumes from step 4 again.
    Steps 3-6 (losses, samples) and the final weights equal the uninterrupted run's bit for bit: DCP restores the
    shards and the optimizer, and every rank's RNG states come back (dropout masks)."""
    out, clean = tmp_path / "victim", tmp_path / "clean"
    launcher = _Launches(2)  # every launch of this test forked by one launcher (tests/forkrun.py)
    try:
        _kill_in(launcher, out, "STALLING IN SAVE", "--stall-in-save", "4")
        assert any((out / "checkpoints" / "step-00000004.tmp").iterdir()), (
            "the kill did not land inside the save"
        )
        assert find_latest_checkpoint(out).name == "step-00000002"

        log = _kill_in(launcher, out, "STALLING IN BACKWARD", "--stall-in", "backward", "--stall-step", "5",
                       "--fault-rank", "1")  # fmt: skip
        assert "at step 2" in log, log
        assert find_latest_checkpoint(out).name == "step-00000004"

        log = _kill_in(launcher, out, "STALLING IN FORWARD", "--stall-in", "forward", "--stall-step", "6",
                       "--fault-rank", "0")  # fmt: skip
        assert "at step 4" in log, log
        assert max(_losses(out)) == 5, log  # the kill landed in step 6, after step 5 was logged
        assert find_latest_checkpoint(out).name == "step-00000004"

        # the restart, then the uninterrupted run in the same launch
        launcher.launch([(out, list(FSDP2)), (clean, list(FSDP2))])
        assert launcher.ended() == [0, 0], launcher.current()[-6000:]
        restart_log, clean_log = run_logs(launcher.current())
        assert launcher.close() == 0, launcher.log
    finally:
        launcher.abort()
    assert "at step 4" in restart_log, restart_log[-6000:]
    assert "WORKER DONE" in clean_log and "resumed from" not in clean_log, clean_log[-6000:]
    _assert_same_run(clean, out, range(3, 7))


def _kill_in(launcher: _Launches, out: Path, marker: str, *args: str) -> str:
    """The next launch of ``launcher`` runs in ``out`` with ``args``; once ``marker`` is printed, kill -9 both
    ranks. Returns the launch's log."""
    launcher.launch([(out, [*FSDP2, *args])])
    launcher.wait_in_launch(marker)
    assert len(launcher.worker_pids()) == 2, launcher.current()[-6000:]
    launcher.kill_all()
    assert launcher.ended() == [-9, -9], launcher.current()[-6000:]  # both ranks died by the kill
    return launcher.current()[-6000:]


def test_hsdp_2x2_lays_out_replicate_by_shard_and_equals_the_reference(tmp_path: Path) -> None:
    """4 processes, ``trainer.fsdp_shard_size=2``: every parameter is a DTensor on a (replicate 2, shard 2) mesh,
    replicated across the groups and sharded on dim 0 within each, and one step over the 4 micro-batches of the
    ``grads`` plan (one per rank) makes the update of the one-process gradient of the whole global batch."""
    log = torchrun(
        4, [str(REPO / "tests" / "dist_worker.py"), "--out", str(tmp_path), *FSDP2, "--shard-size", "2",
            "--plan", "grads", "--steps", "1"], timeout=600,
    )  # fmt: skip
    # found anywhere in the log, not by line: four ranks write to one pipe, and a line may follow another's text
    layouts = re.findall(r"FSDP2 LAYOUT (\d+) (\{.*?\]\})", log)
    assert sorted(int(r) for r, _ in layouts) == [0, 1, 2, 3], log[-4000:]
    for _, layout in layouts:
        assert json.loads(layout) == {
            "layouts": [[[2, 2], ["replicate", "shard"], ["R", "S(0)"]]],
            "whole": [],
        }
    model, tok = tiny_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = _reference_grads(copy.deepcopy(model), grad_check_batches(tok))
    after = torch.load(tmp_path / "params_after.pt", weights_only=True)
    for k, g in grads.items():
        u = _adam_first_update(g, 1e4, 1e4)
        torch.testing.assert_close(after[k] - before[k], u, atol=1e-5, rtol=1e-4, msg=k)


def test_resume_at_another_world_size_keeps_every_sample_once(tmp_path: Path) -> None:
    """2 processes stop in epoch 1, 1 process resumes (DCP reshards model and optimizer): every step trains on the
    samples of the uninterrupted 2-process run, each sample once per epoch, with its lr, label tokens and loss."""
    test_world_size.resume_at_another_world_size(tmp_path, "fsdp2", 2, 1)
