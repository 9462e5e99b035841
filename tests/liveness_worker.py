"""A 2-process worker for tests/test_lost_rank.py: rank-0-only work between collectives, with no model.

``--case slow_main``: rank 0 works for ``--work-s`` seconds (longer than the collective timeout) inside
``liveness.main_only``; then every rank meets at a barrier. ``--barrier`` waits in a barrier instead of ``main_only``
(today's way). ``--case main_dies``: rank 0 is SIGKILLed inside ``main_only``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import time

import torch.distributed as dist

from videollama3_train.trainer import liveness


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--case", choices=["slow_main", "main_dies"], required=True)
    p.add_argument("--timeout-s", type=float, default=3.0)
    p.add_argument("--work-s", type=float, default=8.0)
    p.add_argument("--barrier", action="store_true")
    a = p.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=a.timeout_s))
    liveness.start()
    rank = dist.get_rank()
    dist.barrier()

    def work():
        if a.case == "main_dies":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(a.work_s)
        return "done"

    try:
        if a.barrier:
            if rank == 0:
                work()
            dist.barrier()
        else:
            with liveness.main_only("the slow work") as main:
                if main:
                    work()
        dist.barrier()
    except Exception as e:  # noqa: BLE001 - the test reads the message
        print(f"RANK {rank} FAILED {type(e).__name__}: {e}", flush=True)
        return 3
    print(f"RANK {rank} OK", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
