"""A lost rank never hangs the job (trainer/liveness.py, ``trainer.collective_timeout_s``).

The ranks are started directly (``env://``, rank 0 hosts the rendezvous store), not under torchrun: torchrun's
agent would kill the survivor itself when a worker dies, and the property here is that the survivor gets out on
its own (as it must when the lost rank is on another node). Every wait is bounded by the collective timeout plus a
slack; a survivor that hangs fails the test with its log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port
from test_sample_data import gen

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 20  # trainer.collective_timeout_s of the run under test
SLACK_S = 90  # start-up of a Python process with torch on 2 shared cores, the heartbeat probe, the exit


def _launch(args: list[str], log_dir: Path) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "",
        }  # fmt: skip
        out = (log_dir / f"rank{rank}.log").open("w")
        procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO))
    return procs


def _finish(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(
            f"still running {timeout:.0f}s later (hang):\n{log.read_text()[-4000:]}"
        ) from None


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.timeout(600)
def test_sigkill_of_one_rank_mid_run_ends_the_other_with_a_message_naming_it(tmp_path: Path) -> None:
    """``train`` on 2 processes; once step 2 is logged, rank 1 is SIGKILLed. Rank 0 exits non-zero within the
    collective timeout plus the slack, and its log names rank 1 as the lost rank (gloo's own error only says
    "Connection closed by peer [127.0.0.1]:<port>")."""
    data = tmp_path / "data"
    gen.generate(data, seed=5, n_train=40, n_heldout=0)
    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "videollama3_train.train", "stage=alignment", "model=tiny", "data=sample",
        f"data.path={data / 'train.jsonl'}", f"data.root={data}", "data.heldout_path=null", "eval.before=false",
        f"output_dir={out}", "trainer.max_steps=400", "trainer.epochs=100", "trainer.log_every=1",
        "trainer.save_every=0", f"trainer.collective_timeout_s={TIMEOUT_S}", "logger=disabled",
    ]  # fmt: skip
    procs = _launch(args, tmp_path)
    try:
        metrics, deadline = out / "metrics.jsonl", time.monotonic() + 400
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert all(p.poll() is None for p in procs), (tmp_path / "rank0.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no step logged"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
        code = _finish(procs[0], TIMEOUT_S + SLACK_S, tmp_path / "rank0.log")
    finally:
        _kill(procs)
    log = (tmp_path / "rank0.log").read_text()
    assert code != 0, log[-4000:]
    assert "LostRankError: rank 1 of 2 stopped" in log, log[-4000:]


def _worker(tmp_path: Path, *args: str) -> tuple[list[int], list[str]]:
    procs = _launch([sys.executable, str(REPO / "tests" / "liveness_worker.py"), *args], tmp_path)
    try:
        codes = [_finish(p, 60 + SLACK_S, tmp_path / f"rank{r}.log") for r, p in enumerate(procs)]
    finally:
        _kill(procs)
    return codes, [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]


@pytest.mark.timeout(300)
def test_rank0_only_work_longer_than_the_collective_timeout_holds_no_one_and_a_dead_rank0_is_named(
    tmp_path: Path,
) -> None:
    """Rank 0 works 8 s alone with a 3 s collective timeout: the other rank waits in ``liveness.main_only`` (outside
    any collective) and both meet at the barrier after it. When rank 0 dies inside that work instead, the other
    rank fails promptly with a message naming rank 0."""
    (tmp_path / "slow").mkdir()
    (tmp_path / "dies").mkdir()
    codes, logs = _worker(tmp_path / "slow", "--case", "slow_main")
    assert codes == [0, 0], logs
    assert "RANK 1 OK" in logs[1]
    codes, logs = _worker(tmp_path / "dies", "--case", "main_dies")
    assert codes[1] == 3, logs[1]
    assert "LostRankError" in logs[1] and "rank 0 of 2" in logs[1], logs[1]
