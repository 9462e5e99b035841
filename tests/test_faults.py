"""Faults a long run meets: a SIGKILL inside a forward, inside a backward or in the middle of a checkpoint write,
preemption (SIGTERM), an out-of-memory micro-batch. Non-finite steps are covered in tests/test_fit.py and
tests/test_distributed.py (every backend).

The subprocess tests run tests/dist_worker.py with ``--plan ranked`` (the real PackedLoader over a synthetic data
set: each rank gets different rows, 2 packed rows per optimizer step), dropout on in the model (so a resumed run
must restore every rank's RNG states, not only weights, optimizer and data position), 6 steps, checkpoints every 2
steps, as one plain process and as two DDP processes under ``torch.distributed.run`` (gloo), and compare with an
uninterrupted run of the same world size: the losses after the resume and the final weights are bit-identical.
Each interrupted run is its own launch (it is killed or signalled); the restarts and the uninterrupted runs of a
world size are made one after the other in one launch. The launches of a world size are forked by one
tests/forkrun.py launcher, which imports everything once (a launch then costs no start-up); the 2-process SIGTERM
case goes through torchrun, which forwards the signal to its workers.
Every wait is bounded; a hung process fails the test with its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from dist_worker import ListLoader, read_consumed, run_logs, tiny_setup, train_batches
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

    def __init__(self, out: Path | None, world: int, *args: str, runs: list[tuple[Path, list[str]]] = ()):
        """One run (``out``, ``args``), or the ``runs`` (output directory, arguments) one after the other in one
        launch (``+++`` between them, :func:`dist_worker.main`)."""
        script = [str(REPO / "tests" / "dist_worker.py"), *worker_argv(list(runs) or [(out, list(args))])]
        if world == 1:
            cmd = [sys.executable, *script]
        else:
            launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(world)]
            cmd = [sys.executable, *launcher, "--master_port", str(free_port()), *script]
        self._start(cmd)

    def _start(self, cmd: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            cwd=REPO,
        )  # fmt: skip
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

    def wait_for(self, marker: str | tuple[str, ...], timeout: float = TIMEOUT) -> str:
        """The first line with ``marker`` (or any of several) in it."""
        markers = (marker,) if isinstance(marker, str) else marker
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {marker!r} within {timeout}s:\n{self.log}") from None
            if line is None:
                raise AssertionError(f"exited before {marker!r}:\n{self.log}")
            self.lines.append(line)
            if any(m in line for m in markers):
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
        # anywhere in the log, not by line start: the ranks share one pipe and a line may follow another's text
        return [int(pid) for _, pid in re.findall(r"PID (\d+) (\d+)", "".join(self.lines))]

    def kill_all(self) -> None:
        """SIGKILL the workers (torchrun starts each in its own session) and the launcher: no cleanup runs."""
        for pid in [*self.worker_pids(), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=60)


def _ppid(pid: str) -> int | None:
    """The parent of process ``pid`` (None: gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def worker_argv(runs: list[tuple[Path, list[str]]]) -> list[str]:
    """tests/dist_worker.py's arguments for ``runs`` (output directory, arguments) one after the other."""
    argv: list[str] = []
    for i, (run_out, run_args) in enumerate(runs):
        argv += [*(["+++"] if i else []), "--out", str(run_out), *WORKER_ARGS, *run_args]
    return argv


class _Launches(_Run):
    """One tests/forkrun.py launcher for a sequence of launches of ``world`` ranks, each decided by the test after
    the previous one ended (:meth:`launch`): the ranks are forked from a process that has imported everything, so a
    launch that the test kills costs no start-up. :meth:`kill_all` kills the ranks of the current launch only."""

    def __init__(self, world: int):
        self.world, self.launches = world, 0
        self._start(
            [sys.executable, str(REPO / "tests" / "forkrun.py"), "--nproc", str(world), "--stdin", "--"]
        )

    def launch(self, runs: list[tuple[Path, list[str]]]) -> None:
        """Start the next launch: ``runs`` one after the other (its log starts at ``LAUNCH <i> START``)."""
        self.launch_argv(worker_argv(runs))

    def launch_argv(
        self,
        argv: list[str],
        nproc: int | None = None,
        worker: str = "dist_worker",
        distributed: bool | None = None,
    ) -> None:
        """Start the next launch: ``nproc`` ranks (default: this launcher's) of ``<worker>.main(argv)``;
        ``distributed``: torchrun's environment even for one rank (default: for more than one)."""
        launch = {"argv": argv, "nproc": nproc or self.world, "worker": worker}
        if distributed is not None:
            launch["distributed"] = distributed
        self.proc.stdin.write(json.dumps(launch) + "\n")
        self.proc.stdin.flush()
        self.launches += 1
        self.wait_for(f"LAUNCH {self.launches - 1} START")
        for _ in range(launch["nproc"]):
            self.wait_for(f"LAUNCH {self.launches - 1} RANK")

    def rank_pids(self) -> list[int]:
        """The current launch's ranks, as the launcher started them."""
        return [
            int(pid) for pid in re.findall(rf"LAUNCH {self.launches - 1} RANK \d+ PID (\d+)", self.current())
        ]

    def launch_ended(self) -> list[int] | None:
        """The exit codes of the current launch's ranks if it has ended, else None (does not wait)."""
        with contextlib.suppress(AssertionError):
            return self.ended(timeout=0.01)
        return None

    def wait_in_launch(self, marker: str, timeout: float = TIMEOUT) -> str:
        """:meth:`wait_for` ``marker`` in the current launch; fails with the log if the launch ends first."""
        end = f"LAUNCH {self.launches - 1} EXIT"
        line = self.wait_for((marker, end), timeout)
        if marker not in line:
            raise AssertionError(f"the launch ended before {marker!r}:\n{self.current()[-6000:]}")
        return line

    def current(self) -> str:
        """The log of the current launch."""
        text = "".join(self.lines)
        return text[text.rfind(f"LAUNCH {self.launches - 1} START") :]

    def worker_pids(self) -> list[int]:
        return [int(pid) for _, pid in re.findall(r"PID (\d+) (\d+)", self.current())]

    def ended(self, timeout: float = TIMEOUT) -> list[int]:
        """Wait for the current launch to end; the exit code of each rank (-9: killed)."""
        end = f"LAUNCH {self.launches - 1} EXIT "
        if end not in self.current():
            self.wait_for(end, timeout)
        text = self.current()
        return [int(c) for c in text[text.index(end) + len(end) :].split("\n")[0].split()]

    def signal_all(self, sig: int = signal.SIGKILL, children: bool = False) -> None:
        """Send ``sig`` to the current launch's ranks (children of the launcher, checked: a PID that has been
        reused is never signalled), and with ``children`` to their own children (data-loader workers)."""
        parents = {self.proc.pid: self.rank_pids()}
        if children:
            parents |= {rank: [] for rank in parents[self.proc.pid]}
            for entry in Path("/proc").iterdir():
                ppid = _ppid(entry.name) if entry.name.isdigit() else None
                if ppid in parents and ppid != self.proc.pid:
                    parents[ppid].append(int(entry.name))
        for parent, pids in parents.items():
            for pid in pids:
                if _ppid(str(pid)) == parent:
                    with contextlib.suppress(OSError):
                        os.kill(pid, sig)

    def kill_all(self) -> None:
        """SIGKILL the current launch's ranks and their children."""
        self.signal_all(signal.SIGKILL, children=True)

    def close(self, timeout: float = TIMEOUT) -> int:
        self.proc.stdin.close()
        return self.finish(timeout)

    def abort(self) -> None:
        """Kill the current launch's ranks and the launcher (nothing if the launcher has exited)."""
        if self.proc.poll() is not None:
            return
        self.kill_all()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(timeout=60)


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
# The faults, then one launch per world size for every restart and the uninterrupted runs
# ----------------------------------------------------------------------------------------------------------------

# (world, backend, where, step, resumes_at): kill -9 inside step ``step``'s forward/backward, restart at resumes_at
SIGKILLS = [
    (1, "ddp", "forward", 4, 2),
    (2, "ddp", "forward", 4, 2),
    (1, "ddp", "backward", 5, 4),
    (2, "ddp", "backward", 5, 4),
    (2, "zero2", "backward", 5, 4),
    (2, "zero3", "forward", 4, 2),
]


@dataclass
class _Case:
    """One interrupted run: what the interrupted launch left (recorded before the restart) and the restart's log."""

    out: Path
    backend: str
    facts: dict = field(default_factory=dict)
    error: str = ""  # the interruption went wrong (no restart was made)
    log: str = ""  # the restart's part of the log of its world size's launch


@dataclass
class _World:
    cases: dict[str, _Case]
    clean: dict[str, tuple[Path, str]]  # backend -> (output directory, log) of the uninterrupted run
    code: int
    tail: str  # the end of the launch's log

    def clean_run(self, backend: str = "ddp") -> Path:
        out, log = self.clean[backend]
        assert "WORKER DONE" in log, self.tail
        return out


def _interrupted(
    launcher: _Launches | None, out: Path, world: int, *args: str, marker: str, signal_it: bool = False
) -> dict:
    """Start a run (the next launch of ``launcher``; None: a launch of its own under torchrun, or a plain process),
    wait for ``marker``; SIGTERM it (it checkpoints and exits) or SIGKILL every process of it."""
    if launcher is None:
        victim = _Run(out, world, *args)
    else:
        victim = launcher
        launcher.launch([(out, list(args))])
    try:
        if launcher is None:
            victim.wait_for(marker)
        else:
            launcher.wait_in_launch(marker)
        facts = {"pids": len(victim.worker_pids())}  # each worker prints its PID before training
        if signal_it and launcher is None:
            victim.proc.send_signal(signal.SIGTERM)
            facts["code"] = victim.finish()
        elif signal_it:
            launcher.signal_all(signal.SIGTERM)
            facts["code"] = max(map(abs, launcher.ended()))
        else:
            victim.kill_all()
            if launcher is not None:
                facts["codes"] = launcher.ended()
        facts["exits"] = [_read(out / f"exit_rank{rank}") for rank in range(world)]
    except BaseException:
        victim.kill_all()
        raise
    latest = find_latest_checkpoint(out)
    log = victim.log if launcher is None else launcher.current()[-6000:]
    facts |= {"log": log, "latest": latest.name if latest else None}
    if latest:
        facts["complete"] = (latest / "COMPLETE").is_file()
        facts["loaders"] = sorted(p.name for p in latest.glob("loader_rank*.pt"))
    torn = out / "checkpoints" / "step-00000004.tmp"
    facts["torn"] = sorted(p.name for p in torn.iterdir()) if torn.is_dir() else []
    return facts


def _read(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


def _interruptions(world: int):
    """(name, backend, interrupt(launcher, out)) of every interrupted run of ``world`` processes."""
    for w, backend, where, step, _ in SIGKILLS:
        if w == world:
            args = [
                *_backend(backend),
                "--stall-in",
                where,
                "--stall-step",
                str(step),
                "--fault-rank",
                str(w - 1),
            ]
            marker = f"STALLING IN {where.upper()}"
            yield (
                f"{where}-{backend}",
                backend,
                lambda launcher, out, a=args, m=marker: _interrupted(launcher, out, world, *a, marker=m),
            )
    yield (
        "save",
        "ddp",
        lambda launcher, out: _interrupted(
            launcher, out, world, "--stall-in-save", "4", marker="STALLING IN SAVE"
        ),
    )
    # with 2 processes the SIGTERM goes to torchrun, which forwards it to the workers: its own launch
    yield (
        "sigterm",
        "ddp",
        lambda launcher, out: _interrupted(
            launcher if world == 1 else None, out, world, "--pause-at", "3", marker="PAUSED", signal_it=True
        ),
    )


def _fault_and_restart(root: Path, world: int) -> _World:
    """Every interruption of ``world`` processes (each its own launch: it is killed or signalled), then ONE launch
    that runs, per backend, the uninterrupted run and every restart (DDP first: DeepSpeed runs come after DDP runs
    in a launch). The launches are forked by one tests/forkrun.py launcher (no start-up per launch), except the
    2-process SIGTERM case, which goes through torchrun."""
    cases: dict[str, _Case] = {}
    launcher = _Launches(world)
    try:
        for name, backend, interrupt in _interruptions(world):
            case = cases[name] = _Case(root / name, backend)
            try:
                case.facts = interrupt(launcher, case.out)
            except AssertionError as e:
                case.error = str(e)
                launcher.abort()  # a launch that went wrong: a fresh launcher for the next ones
                launcher = _Launches(world)
        runs: list[tuple[Path, list[str]]] = []
        owners: list[tuple[str, str]] = []  # ("clean", backend) or ("case", name) of each run of the launch
        for backend in ("ddp", "zero2", "zero3"):
            names = [n for n, c in cases.items() if c.backend == backend and not c.error]
            if names:
                runs.append((root / f"clean_{backend}", _backend(backend)))
                owners.append(("clean", backend))
                runs += [(cases[n].out, _backend(backend)) for n in names]
                owners += [("case", n) for n in names]
        launcher.launch(runs)
        code = max(map(abs, launcher.ended(timeout=TIMEOUT * len(runs))))
        log = launcher.current()
        assert launcher.close() == 0, launcher.log
    except BaseException:
        launcher.abort()
        raise
    logs = run_logs(log)
    clean: dict[str, tuple[Path, str]] = {}
    for i, (kind, name) in enumerate(owners):
        log_i = logs[i] if i < len(logs) else ""
        if kind == "clean":
            clean[name] = (runs[i][0], log_i)
        else:
            cases[name].log = log_i
    return _World(cases, clean, code, log[-6000:])


@pytest.fixture(scope="module")
def faulted(tmp_path_factory):
    """``get(world)``: the interrupted runs of that world size, restarted, with the uninterrupted runs (on first
    use)."""
    done: dict[int, _World] = {}

    def get(world: int) -> _World:
        if world not in done:
            done[world] = _fault_and_restart(tmp_path_factory.mktemp(f"world{world}"), world)
        return done[world]

    return get


def _restarted(run: _World, name: str) -> _Case:
    case = run.cases[name]
    assert not case.error, case.error
    assert run.code == 0, run.tail
    return case


# ----------------------------------------------------------------------------------------------------------------
# (a) SIGKILL inside a forward, inside a backward, in the middle of a checkpoint write
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(3000)  # the first test of a world size makes every run of that world size
@pytest.mark.parametrize(("world", "backend", "where", "step", "resumes_at"), SIGKILLS)
def test_sigkill_inside_forward_or_backward_resumes_bit_identical(
    world: int, backend: str, where: str, step: int, resumes_at: int, faulted
) -> None:
    """kill -9 while the last rank is inside step ``step``'s first forward (or, from a gradient hook, its
    backward); with 2 processes the other rank is waiting in that step's collectives. The restart resumes from the
    newest checkpoint and reproduces the uninterrupted run exactly: dropout masks (RNG states of every rank), the
    data cursor, weights and optimizer (ZeRO-2: partitioned; ZeRO-3: every parameter partitioned too)."""
    run = faulted(world)
    case = run.cases[f"{where}-{backend}"]
    assert not case.error, case.error
    assert case.facts["pids"] == world, case.facts["log"]
    assert case.facts["codes"] == [-signal.SIGKILL] * world, case.facts["log"]  # every rank died by the kill
    assert case.facts["latest"] == f"step-{resumes_at:08d}"

    case = _restarted(run, f"{where}-{backend}")
    assert f"at step {resumes_at}" in case.log
    _assert_same_run(run.clean_run(backend), case.out, range(resumes_at + 1, 7))


@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.parametrize("world", [1, 2])
def test_sigkill_during_checkpoint_write_resumes_from_last_complete(world: int, faulted) -> None:
    """kill -9 while the step-4 checkpoint is half written (weights and optimizer in ``.tmp``, no loop state, no
    ``COMPLETE``): the restart resumes from step 2, replaces the torn ``.tmp`` and reproduces steps 3..6."""
    run = faulted(world)
    case = run.cases["save"]
    assert not case.error, case.error
    assert case.facts["pids"] == world, case.facts["log"]
    assert case.facts["torn"], "the kill did not land inside the save"
    assert case.facts["latest"] == "step-00000002"

    case = _restarted(run, "save")
    assert "resumed from" in case.log and "at step 2" in case.log
    _assert_same_run(run.clean_run(), case.out, range(3, 7))
    names = sorted(p.name for p in (case.out / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000004", "step-00000006"]  # keep_last=3, nothing torn left


# ----------------------------------------------------------------------------------------------------------------
# (b) SIGTERM (preemption)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.parametrize("world", [1, 2])
def test_sigterm_checkpoints_exits_zero_and_resumes(world: int, faulted) -> None:
    """SIGTERM after step 3 (to the process; with 2 processes to torchrun, which forwards it to the workers): the
    ranks agree to stop after step 4, write a complete step-4 checkpoint and exit 0; a restart finishes the run
    with the losses of an uninterrupted one."""
    run = faulted(world)
    case = run.cases["sigterm"]
    assert not case.error, case.error
    facts, log = case.facts, case.facts["log"]
    assert facts["exits"] == ["0"] * world, log
    if world == 1:
        assert facts["code"] == 0, log
    else:
        # torchrun itself re-raises the signal after its workers ended (its own exit code is not 0).
        assert "got signal: 15" in log or facts["code"] == 0, log
    assert facts["latest"] == "step-00000004" and facts["complete"], log
    assert facts["loaders"] == [f"loader_rank{r}.pt" for r in range(world)]
    assert "SIGTERM: checkpoint of step 4 written" in log

    case = _restarted(run, "sigterm")
    assert "at step 4" in case.log
    _assert_same_run(run.clean_run(), case.out, range(5, 7))


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
