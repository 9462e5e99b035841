"""Ulysses sequence parallelism with the vision work split across the group (trainer/sequence_parallel.py).

The 2-process test runs one packed row (text only, one image, two images, a long pruned video whose frames
straddle the split point, text) through the sequence-parallel loss module on 2 gloo ranks and compares it with the
plain loss module on the whole row in one process: loss, per-sample sums and every gradient (fp32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port

from videollama3_train.trainer import find_latest_checkpoint
from videollama3_train.trainer.sequence_parallel import SPGroup, pad_row, slice_bounds, split_frames

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 6  # of the train-command test: checkpoints every 2, the kill after step 2 (asserted mid-run)


def test_split_frames_balances_patches_in_order() -> None:
    patches = [24, 8, 24, 16, 16, 16, 16, 16, 16]  # images then a video's frames
    runs = split_frames(patches, 2)
    assert runs[0][0] == 0 and runs[-1][1] == len(patches)
    assert all(a <= b for a, b in runs) and runs[0][1] == runs[1][0]  # contiguous, in order
    sums = [sum(patches[a:b]) for a, b in runs]
    assert max(sums) - min(sums) <= max(patches)  # within one frame of an even split
    assert split_frames([], 3) == [(0, 0)] * 3
    assert [b - a for a, b in split_frames([5], 2)] in ([1, 0], [0, 1])


def test_pad_row_adds_an_isolated_unlabelled_segment() -> None:
    batch = {
        "input_ids": torch.arange(7)[None],
        "labels": torch.arange(7)[None],
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3]]),
    }
    out = pad_row(batch, 4)
    assert out["input_ids"].shape == (1, 8)
    assert out["labels"][0, -1] == -100 and out["position_ids"][0, -1] == 0  # a segment of its own
    assert pad_row(batch, 7) is batch
    sp = SPGroup(size=4, rank=2, group=None)
    assert slice_bounds(8, sp) == (4, 6)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_equal_one_process_on_a_mixed_row(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    cmd += [str(REPO / "tests" / "sp_worker.py"), "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env, cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "WORKER DONE" in log, log[-6000:]  # the worker asserts every gradient
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
    torch.testing.assert_close(
        torch.tensor(r["per_sample"]), torch.tensor(r["ref_per_sample"]), rtol=1e-6, atol=1e-6
    )
    assert r["grads_compared"] > 0 and r["vision_grads"] > 0
    # the tower's work is split: each rank encoded about half of the row's patches, none encoded every frame
    assert sum(r["patches_per_rank"]) == r["total_patches"]
    assert max(r["patches_per_rank"]) <= 0.6 * r["total_patches"], r
    assert all(f > 0 for f in r["frames_per_rank"])


def _train_args(out: Path, data: Path, *extra: str, sp: int = 2) -> list[str]:
    return [
        "stage=multitask_sft",
        "model=tiny",
        "data=file",
        f"data.path={data / 'train.jsonl'}",
        f"data.root={data}",
        f"data.heldout_path={data / 'heldout.jsonl'}",  # rank 0 evaluates alone after training: no Ulysses then
        "eval.max_new_tokens=2",
        f"trainer.sequence_parallel={sp}",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.save_every=2",
        "trainer.log_every=1",
        "eval.before=false",
        "logger=disabled",
        f"output_dir={out}",
        *extra,
    ]


def _rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}  # the last row of a step wins (a resumed run)


def _losses(out: Path) -> dict[int, float]:
    return {s: r["loss"] for s, r in _rows(out).items()}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sp2_dp2_trains_through_the_train_command_and_resumes_after_sigkill(tmp_path: Path) -> None:
    """4 processes = 2 data-parallel groups x sequence parallelism 2, the tiny preset through ``train`` (its ranks
    forked by tests/forkrun.py); SIGKILL after the step-2 checkpoint, mid-run, then the same command again. The
    oracle runs without sequence parallelism: 2 processes (the same 2 data-parallel ranks) with ``data.max_tokens``
    and ``data.max_patches`` doubled (the rows a group of 2 shares), uninterrupted. Every step's loss, grad norm and
    counts equal the oracle's."""
    import time

    from test_faults import _Launches
    from test_sample_data import gen

    data = tmp_path / "data"
    gen.generate(data, seed=1, n_train=48, n_heldout=4)
    ref, run = tmp_path / "ref", tmp_path / "run"
    no_sp = ["data.max_tokens=2048", "data.max_patches=8192"]  # the tiny preset's 1024 and 4096, doubled
    launcher = _Launches(2)  # the three launches' ranks forked by one launcher (tests/forkrun.py)
    try:
        launcher.launch_argv(_train_args(ref, data, *no_sp, sp=1), 2, worker="train")
        assert launcher.ended(700) == [0, 0], launcher.current()[-6000:]

        launcher.launch_argv(_train_args(run, data), 4, worker="train")
        deadline = time.monotonic() + 600
        while not (run / "checkpoints" / "step-00000002" / "COMPLETE").is_file():
            assert launcher.launch_ended() is None and time.monotonic() < deadline, launcher.current()[-4000:]
            time.sleep(0.2)
        launcher.kill_all()  # every rank (and its loader workers), mid-run
        assert launcher.ended() == [-9] * 4, launcher.current()[-4000:]
        killed_log = launcher.current()
        # the kill landed mid-run: the killed run logged at least step 2 and never the last step
        logged = max(_losses(run))
        assert 2 <= logged < MAX_STEPS, killed_log[-3000:]
        resume_step = int(find_latest_checkpoint(run).name.removeprefix("step-"))
        assert 2 <= resume_step < MAX_STEPS

        launcher.launch_argv(_train_args(run, data), 4, worker="train")
        assert launcher.ended(700) == [0] * 4, launcher.current()[-6000:]
        log = launcher.current()
        assert launcher.close() == 0, launcher.log
    finally:
        launcher.abort()
    assert f"at step {resume_step}" in log, log[-3000:]
    got, want = _rows(run), _rows(ref)
    assert sorted(got) == sorted(want) == list(range(1, MAX_STEPS + 1))
    for step in want:
        for key in ("tokens", "label_tokens", "visual_tokens", "lr/llm"):
            assert got[step][key] == want[step][key], (step, key)
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-4), (step, got[step], want[step])
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-3), step
    assert (run / "export" / "config.json").is_file()
