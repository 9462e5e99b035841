"""Helpers shared by the multi-process tests: a free port and one way to run a script under torchrun."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], *, timeout: int = 400, expect_ok: bool | None = True) -> str:
    """Run ``args`` (a script and its arguments) under ``torch.distributed.run`` with ``nproc`` CPU processes;
    returns the log. ``expect_ok``: True asserts exit 0, False a failure, None nothing. A hang fails with the log
    after ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"torchrun did not finish within {timeout}s (hang?):\n{e.stdout}\n{e.stderr}"
        ) from e
    log = proc.stdout + proc.stderr
    if expect_ok is not None:
        assert (proc.returncode == 0) == expect_ok, log[-6000:]
    return log


def forkrun(launches: list[tuple], *, worker: str = "dist_worker", timeout: int = 400) -> str:
    """``launches`` (number of processes, arguments of ``<worker>.main``[, False: one plain process without
    torchrun's environment]) one after the other, their ranks forked by one tests/forkrun.py launcher (the imports
    paid once); returns the log. Every rank of every launch must exit 0; a hang fails with the log after
    ``timeout`` seconds."""
    cmd = [sys.executable, str(REPO / "tests" / "forkrun.py"), "--worker", worker, "--stdin", "--"]
    # the environment torchrun gives even to one rank (DeepSpeed needs it)
    stdin = "".join(
        json.dumps({"nproc": n, "argv": argv, "distributed": True if not rest else rest[0]}) + "\n"
        for n, argv, *rest in launches
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    try:
        proc = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"forkrun did not finish within {timeout}s (hang?):\n{e.stdout}\n{e.stderr}"
        ) from e
    log = proc.stdout + proc.stderr
    exits = re.findall(r"LAUNCH (\d+) EXIT ([-\d ]+)\n", proc.stdout)
    ok = (
        proc.returncode == 0
        and len(exits) == len(launches)
        and all(set(c.split()) == {"0"} for _, c in exits)
    )
    assert ok, log[-6000:]
    return log
