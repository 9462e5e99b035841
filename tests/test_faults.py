"""Faults a long run meets: a SIGKILL inside a forward, inside a backward or in the middle of a checkpoint write,
preemption (SIGTERM), an out-of-memory micro-batch. Non-finite steps are covered in tests/test_fit.py and
tests/test_distributed.py (every backend).

The subprocess tests run tests/dist_worker.py with ``--plan ranked`` (the real PackedLoader over a synthetic data
set: each rank gets different rows, 2 packed rows per optimizer step), dropout on in the model (so a resumed run
must restore every rank's RNG states, not only weights, optimizer and data position), 6 steps, checkpoints every 2
steps, as one plain process and as two DDP processes under ``torch.distributed.run`` (gloo), and compare with an
uninterrupted run of the same world size: the losses after the resume and the final weights are bit-identical.
Every wait is bounded; a hung process fails the test with its log.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from dist_worker import ListLoader, read_consumed, tiny_setup, train_batches
from helpers import free_port
from test_fit import _cfg, _losses

from videollama3_train.trainer import find_latest_checkpoint, fit
from videollama3_train.trainer.step import LossModule

REPO = Path(__file__).resolve().parents[1]
WORKER_ARGS = ["--plan", "ranked", "--rows-per-step", "2", "--dropout", "0.1", "--schedule", "cosine"]
WORKER_ARGS += [
    "--lr",
    "1e-3",
    "--eps",
    "1e-8",
    "--max-grad-norm",
    "1.0",
    "--steps",
    "6",
    "--save-every",
    "2",
]
TIMEOUT = 300  # seconds any one process may take (a tiny model: tens of seconds on 2 shared cores)


class _Run:
    """A worker launch (1 process: plain python; 2: torchrun) whose output is read by a thread, so waiting for a
    line has a deadline even when the process prints nothing."""

    def __init__(self, out: Path, world: int, *args: str):
        script = [str(REPO / "tests" / "dist_worker.py"), "--out", str(out), *WORKER_ARGS, *args]
        if world == 1:
            cmd = [sys.executable, *script]
        else:
            launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(world)]
            cmd = [sys.executable, *launcher, "--master_port", str(free_port()), *script]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    @property
    def log(self) -> str:
        return "".join(self.lines)[-6000:]

    def wait_for(self, marker: str, timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {marker!r} within {timeout}s:\n{self.log}") from None
            if line is None:
                raise AssertionError(f"exited before {marker!r}:\n{self.log}")
            self.lines.append(line)
            if marker in line:
                return line

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"did not exit within {timeout}s:\n{self.log}") from None
        while (line := self._queue.get(timeout=30)) is not None:
            self.lines.append(line)
        return self.proc.returncode

    def worker_pids(self) -> list[int]:
        return [int(line.split()[2]) for line in self.lines if line.startswith("PID ")]

    def kill_all(self) -> None:
        """SIGKILL the workers (torchrun starts each in its own session) and the launcher: no cleanup runs."""
        for pid in [*self.worker_pids(), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory):
    """Output directories of uninterrupted runs, by world size and backend, run on first use."""
    done: dict[tuple[int, str], Path] = {}

    def get(world: int, backend: str = "ddp") -> Path:
        if (world, backend) not in done:
            out = tmp_path_factory.mktemp(f"clean{world}_{backend}")
            run = _Run(out, world, *_backend(backend))
            assert run.finish() == 0, run.log
            assert "WORKER DONE" in run.log
            done[world, backend] = out
        return done[world, backend]

    return get


def _backend(name: str) -> list[str]:
    return ["--backend", name, *(["--partition-all"] if name == "zero3" else [])]


def _assert_same_run(clean: Path, resumed: Path, steps: range) -> None:
    a, b = _losses(clean), _losses(resumed)
    assert [b[s] for s in steps] == [a[s] for s in steps]
    assert read_consumed(resumed) == read_consumed(clean)  # the same samples in every step
    pa = torch.load(clean / "params_after.pt", weights_only=True)
    pb = torch.load(resumed / "params_after.pt", weights_only=True)
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


# ----------------------------------------------------------------------------------------------------------------
# (a) SIGKILL inside a forward, inside a backward, in the middle of a checkpoint write
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize(
    ("world", "backend", "where", "step", "resumes_at"),
    [
        (1, "ddp", "forward", 4, 2),
        (2, "ddp", "forward", 4, 2),
        (1, "ddp", "backward", 5, 4),
        (2, "ddp", "backward", 5, 4),
        (2, "zero2", "backward", 5, 4),
        (2, "zero3", "forward", 4, 2),
    ],
)
def test_sigkill_inside_forward_or_backward_resumes_bit_identical(
    tmp_path: Path, world: int, backend: str, where: str, step: int, resumes_at: int, clean_runs
) -> None:
    """kill -9 while the last rank is inside step ``step``'s first forward (or, from a gradient hook, its
    backward); with 2 processes the other rank is waiting in that step's collectives. The restart resumes from the
    newest checkpoint and reproduces the uninterrupted run exactly: dropout masks (RNG states of every rank), the
    data cursor, weights and optimizer (ZeRO-2: partitioned; ZeRO-3: every parameter partitioned too)."""
    out = tmp_path / "victim"
    args = [
        *_backend(backend),
        "--stall-in",
        where,
        "--stall-step",
        str(step),
        "--fault-rank",
        str(world - 1),
    ]
    victim = _Run(out, world, *args)
    victim.wait_for(f"STALLING IN {where.upper()}")
    assert len(victim.worker_pids()) == world, victim.log
    victim.kill_all()
    assert find_latest_checkpoint(out).name == f"step-{resumes_at:08d}"

    resumed = _Run(out, world, *_backend(backend))
    assert resumed.finish() == 0, resumed.log
    assert f"at step {resumes_at}" in resumed.log
    _assert_same_run(clean_runs(world, backend), out, range(resumes_at + 1, 7))


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("world", [1, 2])
def test_sigkill_during_checkpoint_write_resumes_from_last_complete(
    tmp_path: Path, world: int, clean_runs
) -> None:
    """kill -9 while the step-4 checkpoint is half written (weights and optimizer in ``.tmp``, no loop state, no
    ``COMPLETE``): the restart resumes from step 2, replaces the torn ``.tmp`` and reproduces steps 3..6."""
    out = tmp_path / "victim"
    victim = _Run(out, world, "--stall-in-save", "4")
    victim.wait_for("STALLING IN SAVE")
    assert len(victim.worker_pids()) == world, victim.log  # each worker prints its PID before training
    victim.kill_all()
    torn = out / "checkpoints" / "step-00000004.tmp"
    assert any(torn.iterdir()), "the kill did not land inside the save"
    assert find_latest_checkpoint(out).name == "step-00000002"

    resumed = _Run(out, world)
    assert resumed.finish() == 0, resumed.log
    assert "resumed from" in resumed.log and "at step 2" in resumed.log
    _assert_same_run(clean_runs(world), out, range(3, 7))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000004", "step-00000006"]  # keep_last=3, nothing torn left


# ----------------------------------------------------------------------------------------------------------------
# (b) SIGTERM (preemption)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("world", [1, 2])
def test_sigterm_checkpoints_exits_zero_and_resumes(tmp_path: Path, world: int, clean_runs) -> None:
    """SIGTERM after step 3 (to the process; with 2 processes to torchrun, which forwards it to the workers): the
    ranks agree to stop after step 4, write a complete step-4 checkpoint and exit 0; a restart finishes the run
    with the losses of an uninterrupted one."""
    out = tmp_path / "victim"
    victim = _Run(out, world, "--pause-at", "3")
    victim.wait_for("PAUSED")  # rank 0 now waits until its SIGTERM flag is set
    victim.proc.send_signal(signal.SIGTERM)
    code = victim.finish()
    for rank in range(world):
        assert (out / f"exit_rank{rank}").read_text().strip() == "0", victim.log
    if world == 1:
        assert code == 0, victim.log
    else:
        # torchrun itself re-raises the signal after its workers ended (its own exit code is not 0).
        assert "got signal: 15" in victim.log or code == 0, victim.log
    latest = find_latest_checkpoint(out)
    assert latest.name == "step-00000004" and (latest / "COMPLETE").is_file(), victim.log
    assert all((latest / f"loader_rank{r}.pt").is_file() for r in range(world))
    assert "SIGTERM: checkpoint of step 4 written" in victim.log

    resumed = _Run(out, world)
    assert resumed.finish() == 0, resumed.log
    assert "at step 4" in resumed.log
    _assert_same_run(clean_runs(world), out, range(5, 7))


# ----------------------------------------------------------------------------------------------------------------
# (c) out of memory
# ----------------------------------------------------------------------------------------------------------------


def test_out_of_memory_names_the_micro_batch_and_the_knobs(tmp_path: Path, monkeypatch) -> None:
    model, tok = tiny_setup()
    batches = train_batches(tok, n=4)
    victim = batches[3]  # step 2, second micro-batch
    original = LossModule.forward

    def forward(self, batch):
        if batch["input_ids"].shape == victim["input_ids"].shape and torch.equal(
            batch["input_ids"], victim["input_ids"]
        ):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return original(self, batch)

    monkeypatch.setattr(LossModule, "forward", forward)
    cfg = _cfg(max_steps=2, grad_accum=2)
    with pytest.raises(torch.OutOfMemoryError) as exc:
        fit(model, ListLoader(batches), cfg, out_dir=tmp_path)
    msg = str(exc.value)
    tokens = victim["input_ids"].numel()
    patches = sum(b.shape[0] for k, b in victim.items() if k in ("pixel_values", "pixel_values_videos"))
    assert "micro-batch 2/2 of step 2" in msg
    assert f"{tokens} tokens" in msg and f"{patches} vision patches" in msg
    for m in victim["meta"]:
        assert f"{m['dataset']}[{m['index']}] ({m['modality']}" in msg
    for key in (
        "data.max_tokens",
        "data.max_patches",
        "encode.max_visual_tokens",
        "trainer.gradient_checkpointing",
    ):
        assert key in msg
    assert "Tried to allocate 9.00 GiB" in str(exc.value.__cause__)  # the allocator's own message is kept
