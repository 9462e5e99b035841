"""B9: peak host memory per rank of building a model and preparing it for a backend (DDP / ZeRO-3 / FSDP2).

Each case starts ``--world`` processes (plain ``env://`` launch, gloo on CPU) that build the accelerator, the model
(``model.preset``, random init) exactly as ``train`` does, an AdamW optimizer over it and the backend's ``prepare``;
each then reports its peak RSS (``ru_maxrss``) and its RSS just before the model is built (the process baseline:
torch, transformers, deepspeed imported). The code measured is whatever ``videollama3_train`` the ``PYTHONPATH``
gives, so today's code and another commit's run in the same invocation:

    git worktree add /tmp/base-modelmem 674b7ae
    python benchmarks/bench_memory.py --preset videollama3_2b --case fsdp2:2 --case zero3:2 \\
        --code new=. --code before=/tmp/base-modelmem --limit-gib 17 --out benchmarks/results/B9_memory

A watchdog samples every process's RSS (``/proc``) 20 times a second and kills the case when the processes
together pass ``--limit-gib`` (the machine is shared): such a case is reported as "killed at <GiB>".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30


def _rss(pid: int) -> int:
    """Resident bytes of ``pid`` (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def worker(preset: str, backend: str, stop_after: str) -> None:
    """One rank: build and prepare as ``train`` does, then print ``B9 {json}``."""
    import inspect

    import torch

    from videollama3_train.model.core import ModelConfig, build_model
    from videollama3_train.model.tokenizer import build_tiny_tokenizer
    from videollama3_train.trainer import TrainConfig, build_accelerator, build_backend
    from videollama3_train.trainer.step import LossModule

    cfg = TrainConfig(backend=backend, precision="fp32")
    accelerator = build_accelerator(cfg)
    backend_ = build_backend(cfg, accelerator)
    tok = build_tiny_tokenizer()
    mcfg = ModelConfig(preset=preset, attn_implementation="sdpa")
    base = _rss(os.getpid())
    t0 = time.perf_counter()
    if "defer_weights" in inspect.signature(build_model).parameters:  # this branch's sharded build
        from videollama3_train.trainer.sharded_init import place, wants_meta

        defer = wants_meta(cfg, accelerator)
        model = place(build_model(mcfg, tok, defer_weights=defer), cfg, accelerator)
    else:  # the code before: the whole model on every rank
        model = build_model(mcfg, tok)
    built = time.perf_counter() - t0
    peak_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    first = {
        "rank": accelerator.process_index,
        "baseline_gib": base / GIB,
        "peak_built_gib": peak_built / GIB,
    }
    print("B9 " + json.dumps({**first, "seconds_built": built}), flush=True)  # kept if prepare is killed
    if stop_after == "built":
        accelerator.wait_for_everyone()
        os._exit(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    backend_.prepare(LossModule(model, 4096), optimizer)
    prepared = time.perf_counter() - t0
    out = {
        "rank": accelerator.process_index,
        "baseline_gib": base / GIB,
        "peak_built_gib": peak_built / GIB,
        "peak_prepared_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "rss_prepared_gib": _rss(os.getpid()) / GIB,
        "parameters": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
        if backend != "fsdp2"
        else None,
        "seconds_built": built,
        "seconds_prepared": prepared,
    }
    print("B9 " + json.dumps(out), flush=True)
    accelerator.wait_for_everyone()
    os._exit(0)  # no teardown of a 2B model (minutes of freeing pages): the figures are taken


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(
    code: Path, preset: str, backend: str, world: int, limit: float, log: Path, stop_after: str = "prepared"
) -> dict:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ, "PYTHONPATH": str(code), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
        }  # fmt: skip
        cmd = [sys.executable, __file__, "--worker", "--preset", preset, "--backend", backend]
        cmd += ["--stop-after", stop_after]
        out = log.with_name(f"{log.stem}_rank{rank}.log").open("w")
        procs.append(
            subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        )
    top, killed = 0, None
    while any(p.poll() is None for p in procs):
        total = sum(_rss(p.pid) for p in procs)
        top = max(top, total)
        if total > limit * GIB:
            killed = total / GIB
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    for p in procs:
        p.wait()
    ranks = []
    for rank in range(world):
        text = log.with_name(f"{log.stem}_rank{rank}.log").read_text()
        rows = [json.loads(line[3:]) for line in text.splitlines() if line.startswith("B9 ")]
        ranks.append(rows[-1] if rows else {"rank": rank, "error": text[-1500:]})
    return {
        "backend": backend,
        "world": world,
        "killed_at_gib": killed,
        "max_total_gib": top / GIB,
        "ranks": ranks,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="videollama3_2b")
    p.add_argument("--backend", default="fsdp2")
    p.add_argument("--case", action="append", default=[], help="BACKEND:WORLD, e.g. fsdp2:2 (repeatable)")
    p.add_argument("--code", action="append", default=[], help="LABEL=PATH of a videollama3_train checkout")
    p.add_argument("--stop-after", choices=("built", "prepared"), default="prepared")
    p.add_argument(
        "--limit-gib", type=float, default=17.0, help="kill a case whose processes pass this together"
    )
    p.add_argument("--out", default="benchmarks/results/B9_memory")
    a = p.parse_args()
    if a.worker:
        worker(a.preset, a.backend, a.stop_after)
        return 0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for case in a.case:
        backend, world = case.split(":")
        for label, path in (c.split("=", 1) for c in a.code or ["new=."]):
            log = out.parent / "logs" / f"{out.name}_{label}_{backend}_{world}.log"
            log.parent.mkdir(exist_ok=True)
            r = run_case(Path(path).resolve(), a.preset, backend, int(world), a.limit_gib, log, a.stop_after)
            r.update(code=label, preset=a.preset, stop_after=a.stop_after)
            results.append(r)
            print(json.dumps(r), flush=True)
    with open(out.with_suffix(".jsonl"), "a") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
