"""Resuming a run at another world size: a checkpoint written by 2 processes resumes on 1, one written by 1 resumes
on 2 (CPU, gloo, ``torch.distributed.run``).

What must hold (the data side is also unit-tested in tests/test_loader.py):

* the data position is a global cursor: every optimizer step trains on the same samples as the uninterrupted run
  (sample ids recorded by the real PackedLoader, ``--plan ranked``), no sample of an epoch is seen twice or
  skipped, across the stop and across an epoch boundary (2 epochs; a partial, padded last step in each);
* the schedule goes on at the right step (the logged lr of every step equals the uninterrupted run's);
* model and optimizer states are restored (DDP: whole in the checkpoint; ZeRO-1/2: the optimizer's partitions are
  resharded): the losses and final weights equal the uninterrupted run's up to float summation order;
* ZeRO-3, which cannot reshard its partitions here, refuses at start with a message that says so.

The reference is an uninterrupted run at world size 2; a global batch of G = 4 packed rows is 2 micro-batches per
rank on 2 ranks and 4 on 1, so both worlds run the same optimizer steps. The last test goes through the ``train``
command itself.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from dist_worker import RUN_SEPARATOR, launch_logs, read_consumed, run_logs
from helpers import forkrun
from test_faults import _Launches

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
SAMPLES = 40
WORKER_ARGS = ["--plan", "ranked", "--ranked-samples", str(SAMPLES), "--rows-per-step", "4", "--epochs", "2"]
WORKER_ARGS += ["--steps", "-1", "--lr", "1e-3", "--eps", "1e-6", "--schedule", "linear", "--save-every", "0"]
STOP = 5  # epoch 1, step 1 (4 steps per epoch: 3 of 4 rows and a last one of 2 rows, padded)


def _rows(out: Path) -> dict[int, dict]:
    """metrics.jsonl by step (a step logged twice, before a stop and after the resume: the last wins)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


CASES = [("ddp", 2, 1), ("ddp", 1, 2), ("zero1", 2, 1), ("zero1", 1, 2), ("zero2", 2, 1), ("zero2", 1, 2)]
ZERO3_STOP = 2


def _argv(runs: dict[str, list[str]], root: Path) -> tuple[list[str], list[str]]:
    """(names, tests/dist_worker.py arguments) of ``runs`` (name -> worker arguments, into ``root / name``;
    ``name.resumed`` resumes ``name``) one after the other in one launch, DDP runs first, then ZeRO-1, 2, 3 (a DDP
    run after a DeepSpeed one fails in accelerate's state)."""
    order = ("ddp", "zero1", "zero2", "zero3", "fsdp2")
    runs = dict(sorted(runs.items(), key=lambda kv: order.index(kv[1][kv[1].index("--backend") + 1])))
    argv: list[str] = []
    for name, args in runs.items():
        argv += [RUN_SEPARATOR] if argv else []
        argv += ["--out", str(root / name.removesuffix(".resumed")), *WORKER_ARGS, *args]
    return list(runs), argv


def _launch(launches: list[tuple[int, dict[str, list[str]]]], root: Path) -> dict[str, str]:
    """``launches`` (processes, runs as :func:`_argv` takes them) one after the other, forked by one launcher
    (helpers.forkrun: the imports paid once); run name -> that run's part of the log."""
    names, argvs = zip(*(_argv(runs, root) for _, runs in launches))
    log = forkrun([(n, argv) for (n, _), argv in zip(launches, argvs)], timeout=1200)
    parts = launch_logs(log)
    assert len(parts) == len(launches), log[-6000:]
    out: dict[str, str] = {}
    for launch_names, part in zip(names, parts):
        runs = run_logs(part)
        assert len(runs) == len(launch_names), part[-6000:]
        out |= dict(zip(launch_names, runs))
    return out


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Every worker run of this file in three launches forked by one launcher (a launch costs more than these
    runs): on 1 process the
    first halves of the 1 -> 2 cases; on 2 the uninterrupted references, the first halves of the 2 -> 1 cases, the
    second halves of the 1 -> 2 cases and ZeRO-3's first half; on 1 the second halves of the 2 -> 1 cases and the
    ZeRO-3 resume, which must fail. In a launch the DDP runs come first, then ZeRO-1, 2, 3 (accelerate's state does not go back from DeepSpeed to DDP).
    Returns (the runs' root, name -> log)."""
    root = tmp_path_factory.mktemp("world_size")
    stop = ["--stop-after", str(STOP)]
    first = {f"{b}_{f}_{s}": [*_backend(b), *stop] for b, f, s in CASES if f == 1}
    runs = {f"reference_{b}": _backend(b) for b in ("ddp", "zero1", "zero2")}
    runs |= {f"{b}_{f}_{s}": [*_backend(b), *stop] for b, f, s in CASES if f == 2}
    runs |= {f"{b}_{f}_{s}.resumed": _backend(b) for b, f, s in CASES if f == 1}
    runs["zero3"] = ["--backend", "zero3", "--stop-after", str(ZERO3_STOP)]
    last = {f"{b}_{f}_{s}.resumed": _backend(b) for b, f, s in CASES if f == 2}
    last["zero3.resumed"] = ["--backend", "zero3", "--expect-error", "was written by 2 processes"]
    logs = _launch([(1, first), (2, runs), (1, last)], root)
    return root, logs


def _backend(backend: str) -> list[str]:
    return ["--backend", backend]


@pytest.mark.parametrize(("backend", "first", "second"), CASES)
def test_resume_at_another_world_size(backend: str, first: int, second: int, launched) -> None:
    root, logs = launched
    name = f"{backend}_{first}_{second}"
    check_resumed(
        root / name, root / f"reference_{backend}", logs[name], logs[f"{name}.resumed"], first, second
    )


def check_resumed(out: Path, ref: Path, stop_log: str, resume_log: str, first: int, second: int) -> None:
    """The run in ``out`` (stopped after step STOP on ``first`` processes, resumed on ``second``) equals the
    uninterrupted reference ``ref``: samples of every step, each once per epoch, lr, label tokens, losses, weights."""
    log = stop_log
    assert "WORKER DONE" not in log and (out / "checkpoints" / f"step-{STOP:08d}" / "COMPLETE").is_file(), log
    assert not (out / "checkpoints" / f"step-{STOP + 1:08d}").exists()  # stopped mid-run, at STOP
    log = resume_log
    assert f"resuming a checkpoint of {first} processes on {second}" in log, log[-4000:]
    assert f"at step {STOP}" in log and "WORKER DONE" in log

    # the same samples in every step, every sample of each epoch exactly once
    steps = read_consumed(out)
    assert steps == read_consumed(ref)
    for epoch in (0, 1):
        ids = [i for (e, _), v in steps.items() if e == epoch for i in v]
        assert sorted(ids) == list(range(SAMPLES)), f"epoch {epoch}"
    a, b = _rows(ref), _rows(out)
    assert sorted(b) == sorted(a) == list(range(1, 9))
    assert [b[s]["lr/llm"] for s in a] == [a[s]["lr/llm"] for s in a]  # the schedule at the same step
    assert [b[s]["epoch"] for s in a] == [a[s]["epoch"] for s in a]
    for s in a:
        assert b[s]["label_tokens"] == a[s]["label_tokens"]
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5), s
    pa = torch.load(ref / "params_after.pt", weights_only=True)
    pb = torch.load(out / "params_after.pt", weights_only=True)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], atol=2e-6, rtol=1e-5, msg=k)


def resume_at_another_world_size(tmp_path: Path, backend: str, first: int, second: int) -> None:
    """One case for a backend this file does not run: the uninterrupted 2-process reference, the stop on ``first``
    processes and the resume on ``second``, three launches forked by one launcher; :func:`check_resumed`."""
    logs = _launch(
        [(2, {"reference": _backend(backend)}), (first, {"run": [*_backend(backend), "--stop-after", str(STOP)]}),
         (second, {"run.resumed": _backend(backend)})], tmp_path,
    )  # fmt: skip
    check_resumed(tmp_path / "run", tmp_path / "reference", logs["run"], logs["run.resumed"], first, second)


def test_zero3_refuses_another_world_size_at_start(launched) -> None:
    root, logs = launched
    out = root / "zero3"
    assert (out / "checkpoints" / f"step-{ZERO3_STOP:08d}" / "COMPLETE").is_file()
    log = logs["zero3.resumed"]
    assert "EXPECTED ERROR 0:" in log and "was written by 2 processes, this run has 1" in log, log[-4000:]
    assert "cannot load model and optimizer states at another world size" in log
    assert "ZeRO-3" in log and "resume with 2 processes" in log
    assert not (out / "metrics.jsonl").read_text().count('"step": 3')  # nothing trained


# ----------------------------------------------------------------------------------------------------------------
# Through the train command
# ----------------------------------------------------------------------------------------------------------------

MAX_STEPS = 10  # past the end of epoch 0 (8 steps of 2 rows on the 120 records of sample_data), asserted


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory) -> Path:
    from test_sample_data import gen

    out = tmp_path_factory.mktemp("sample")
    gen.generate(out, seed=0, n_train=120, n_heldout=0)
    return out


def _train_args(data: Path, out: Path, grad_accum: int) -> list[str]:
    return [
        "stage=alignment", "model=tiny", "data=sample",
        f"data.path={data / 'train.jsonl'}", f"data.root={data}", "data.heldout_path=null", "eval.before=false",
        f"output_dir={out}", f"trainer.max_steps={MAX_STEPS}", f"trainer.grad_accum={grad_accum}",
        "trainer.log_every=1", "trainer.save_every=0", "logger=disabled",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def launcher():
    """One launcher (tests/forkrun.py) forks every ``train`` launch of this file: the imports are paid once."""
    launcher = _Launches(1)
    yield launcher
    launcher.close()
    launcher.abort()


def _train(launcher: _Launches, nproc: int, args: list[str], timeout: float = 600) -> str:
    """``train`` with ``args`` on ``nproc`` processes, to the end; its log."""
    launcher.launch_argv(args, nproc, worker="train", distributed=True)
    codes = launcher.ended(timeout)
    assert codes == [0] * nproc, launcher.current()[-6000:]
    return launcher.current()


def _train_until_sigterm(
    launcher: _Launches, nproc: int, args: list[str], out: Path, after_step: int = 3
) -> int:
    """Start ``train``, SIGTERM its ranks once ``after_step`` steps are logged; the ranks stop after a step with a
    checkpoint. Returns the step of that checkpoint."""
    launcher.launch_argv(args, nproc, worker="train", distributed=True)
    deadline = time.monotonic() + 400
    metrics = out / "metrics.jsonl"
    try:
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= after_step):
            assert launcher.launch_ended() is None, launcher.current()[-4000:]
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.05)
        launcher.signal_all(signal.SIGTERM)
        codes = launcher.ended(300)
    except BaseException:
        launcher.kill_all()
        raise
    text = launcher.current()
    assert codes == [0] * nproc, text[-4000:]
    stopped = [line for line in text.splitlines() if "SIGTERM: checkpoint of step" in line]
    assert stopped, text[-4000:]
    step = int(stopped[0].split("checkpoint of step")[1].split()[0])
    assert after_step <= step < MAX_STEPS, text[-4000:]
    return step


def _cursor(out: Path, step: int) -> dict:
    return torch.load(out / "checkpoints" / f"step-{step:08d}" / "loader_rank0.pt", weights_only=True)


@pytest.fixture(scope="module")
def train_reference(launcher: _Launches, tmp_path_factory, sample_data: Path) -> Path:
    """The uninterrupted 2-process run both cases compare with; it crosses the end of epoch 0."""
    ref = tmp_path_factory.mktemp("train_reference")
    _train(launcher, 2, _train_args(sample_data, ref, 1))
    rows = _rows(ref)
    assert rows[1]["epoch"] == 0 and rows[MAX_STEPS]["epoch"] == 1
    return ref


@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)])
def test_train_command_resumes_at_another_world_size(
    capsys, tmp_path: Path, sample_data: Path, launcher: _Launches, train_reference: Path, first, second
) -> None:
    """``train`` (its ranks forked by tests/forkrun.py), SIGTERM after a few steps, resumed at the other world size with the same global
    batch (2 packed rows per step: grad_accum 1 on 2 ranks, 2 on 1): every later step has the tokens, label tokens
    and lr of the uninterrupted 2-process run, its loss up to float summation order, and the run ends on the same
    data cursor. A resume that would change the global batch is refused at start, in one line."""
    from videollama3_train.train import main as train_main

    ga = {1: 2, 2: 1}
    ref = train_reference
    out = tmp_path / "run"
    stop = _train_until_sigterm(launcher, first, _train_args(sample_data, out, ga[first]), out)
    if first == 2:  # world 1 with grad_accum 1 would train 1 row per step, not 2 (this process: world 1)
        capsys.readouterr()
        assert train_main(_train_args(sample_data, out, 1)) == 1
        err = capsys.readouterr().err
        (line,) = err[err.index("vl3-train: error:") :].strip().splitlines()
        assert "global batch changed" in line and "Traceback" not in err, err[-4000:]
    log = _train(launcher, second, _train_args(sample_data, out, ga[second]))
    assert f"resuming a checkpoint of {first} processes on {second}" in log, log[-4000:]
    a, b = _rows(ref), _rows(out)
    assert sorted(a) == sorted(b) == list(range(1, MAX_STEPS + 1))
    for s in range(1, MAX_STEPS + 1):
        for key in ("tokens", "label_tokens", "visual_tokens", "lr/llm", "epoch"):
            assert b[s][key] == a[s][key], (s, key)
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-4), s
    assert stop < MAX_STEPS
    end_ref, end = _cursor(ref, MAX_STEPS), _cursor(out, MAX_STEPS)
    for key in ("epoch", "step", "samples", "rows_per_step"):
        assert end[key] == end_ref[key], key
    assert (out / "export" / "config.json").is_file()
