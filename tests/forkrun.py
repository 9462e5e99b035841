"""A launcher for the multi-process tests that pays the imports once: it imports torch, transformers, accelerate,
DeepSpeed and the package, then starts every launch's ranks with ``fork`` (pristine processes: nothing has run in
the launcher but imports), one launch after the other. A launch of one rank is a plain process (no process group)
unless asked otherwise; the ranks of a launch of several meet through ``env://`` on a fresh port, rank 0 hosting the store (as
tests/test_lost_rank.py starts them; torchrun itself is covered by tests/test_launch.py, the ``train`` command tests
and the 2-process SIGTERM test). Starting a rank this way costs a fork instead of ~5 CPU-seconds of imports.

    python tests/forkrun.py --nproc 2 [--worker dist_worker] [--stdin] -- ARGS [--- ARGS ...]

Each launch's ranks run ``<worker>.main(ARGS)`` (a module of tests/, or ``train`` for the train command; for
dist_worker several runs separated by ``+++``, as there). The launcher prints ``LAUNCH <i> START`` before a launch
and ``LAUNCH <i> EXIT <code of each rank>`` after it (a rank ended by signal ``s``: ``-s``); a SIGKILL from the test
ends only the ranks it hits, and once every rank of a launch is gone the next launch starts. With ``--stdin``, after
the launches of the command line the launcher reads more from stdin until end of file, one JSON object per line
(``{"argv": [...], "nproc": 2, "worker": "dist_worker", "distributed": true}``, nproc and worker defaulting to the
command line's; ``distributed``: the torchrun environment even for one rank, default for more than one): a test
decides each launch after looking at what the previous one left. The launcher exits 0 once every launch has ended.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEPARATOR = "---"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(worker: str):
    """``main(argv)`` of a worker module of tests/, or of the train command."""
    if worker == "train":
        from videollama3_train.train import main

        return main
    return importlib.import_module(worker).main


def _rank(main, argv: list[str], rank: int, nproc: int, port: int, distributed: bool) -> None:
    """In the forked child: this rank's environment, then the worker; never returns."""
    code = 1
    try:
        if distributed:
            os.environ.update(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0",
            )  # fmt: skip
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        code = main(argv) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _launches(given: list[dict], from_stdin: bool, defaults: dict):
    yield from given
    if from_stdin:
        for line in sys.stdin:
            if line.strip():
                yield {**defaults, **json.loads(line)}


def main(argv: list[str]) -> int:
    defaults, from_stdin = {"nproc": 1, "worker": "dist_worker"}, False
    while argv and argv[0] != "--":
        flag = argv.pop(0)
        if flag == "--nproc":
            defaults["nproc"] = int(argv.pop(0))
        elif flag == "--worker":
            defaults["worker"] = argv.pop(0)
        elif flag == "--stdin":
            from_stdin = True
        else:
            raise SystemExit(f"forkrun: unknown flag {flag}")
    given: list[dict] = [{**defaults, "argv": []}] if argv[1:] else []
    for a in argv[1:]:
        if a == SEPARATOR:
            given.append({**defaults, "argv": []})
        else:
            given[-1]["argv"].append(a)

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import accelerate  # noqa: F401
    import deepspeed  # noqa: F401
    import dist_worker  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401  (FSDP2's checkpoints)

    import videollama3_train.trainer  # noqa: F401
    from videollama3_train.model import core  # noqa: F401

    for i, launch in enumerate(_launches(given, from_stdin, defaults)):
        entry, nproc, port = _entry(launch["worker"]), launch["nproc"], _free_port()
        sys.stdout.write(f"LAUNCH {i} START\n")
        sys.stdout.flush()
        pids = []
        for rank in range(nproc):
            pid = os.fork()
            if pid == 0:
                _rank(entry, launch["argv"], rank, nproc, port, launch.get("distributed", nproc > 1))
            pids.append(pid)
            sys.stdout.write(f"LAUNCH {i} RANK {rank} PID {pid}\n")
            sys.stdout.flush()
        codes = []
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            codes.append(os.waitstatus_to_exitcode(status))
        sys.stdout.write(f"LAUNCH {i} EXIT {' '.join(map(str, codes))}\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
