"""Several :func:`fit` runs ("cases") in one worker process, so that the compositions the recipes train with cost
one launch between them rather than one each (a 2-process DeepSpeed launch is ~25 s of imports and engine start on a
2-core machine, a fit of the tiny model ~1 s).

    python -m torch.distributed.run --nproc_per_node 2 tests/numerics_worker.py --out DIR CASE [CASE ...]

Each case trains a fresh tiny model (:func:`dist_worker.tiny_setup`, the same weights on every rank) and writes into
``DIR/<case>/``: ``metrics.jsonl`` (fit's), ``params_after.pt`` (rank 0: the full state dict, ZeRO-3 and FSDP2
gathered), ``digests_rank<r>.jsonl`` (with ``digests``: :func:`dist_worker.read_digests`), ``sp_rank<r>.json`` (with
sequence parallelism: the patches and frames this rank's tower encoded) and ``DONE``. Between cases accelerate's
singletons and what they leave behind are reset, so each case builds the accelerator its backend needs. ZeRO-3 cases
print ``PARTITIONED <case> <rank> ...`` once every rank has asserted that every parameter is partitioned.
:func:`launch_once` runs every case in one launch per pytest session.

Cases (:data:`CASES`), all with ``lr = eps = 1e4`` (AdamW's first update nearly linear in the gradient, see
tests/test_fit.py) unless they say otherwise:

* ``zero1_ckpt`` / ``zero3_ckpt``: the ``grads`` plan (4 micro-batches, 2 per rank, grad_accum 2, one step) with
  activation checkpointing of both towers; ZeRO-3 with every parameter partitioned (asserted);
* ``zero1_bf16_nan``: ZeRO-1 in bf16, the ``grads`` plan for 2 steps (the second is epoch 1: the same micro-batches
  in another order, so the same gradient); step 1 gets a NaN loss on rank 1's first micro-batch (its gradients
  finite) and must be skipped on every rank; step 2 is then the first update;
* ``zero3_frozen_textonly``: ZeRO-3, every parameter partitioned, the LLM frozen (stage 1: ``lr_llm`` None), rank 1
  only ever text-only (the ``textonly`` plan), 3 steps of grad_accum 2;
* ``sp_<backend>`` (ddp, zero2, zero3, fsdp2) and ``sp_ddp_ckpt``: sequence parallelism over the 2 ranks (one
  group: both ranks get the same rows), the 4 micro-batches of the ``grads`` plan as 2 steps of grad_accum 2;
  ``sp_ddp_ckpt`` with checkpointing of both towers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import (  # noqa: E402
    ListLoader,
    _install_hooks,
    _partition_everything,
    _shut_down,
    _write_digest,
    assert_partitioned,
    full_state_dict,
    grad_check_batches,
    textonly_batches,
    tiny_setup,
)

_BIG = dict(lr=1e4, eps=1e4)
CASES: dict[str, dict[str, Any]] = {
    "zero1_ckpt": dict(backend="zero1", plan="grads", grad_accum=2, steps=1, checkpointing="both", **_BIG),
    "zero3_ckpt": dict(backend="zero3", plan="grads", grad_accum=2, steps=1, checkpointing="both", **_BIG),
    "zero1_bf16_nan": dict(
        backend="zero1",
        plan="grads",
        grad_accum=2,
        steps=2,
        precision="bf16",
        nan_steps="1",
        digests=True,
        **_BIG,
    ),
    "zero3_frozen_textonly": dict(
        backend="zero3", plan="textonly", grad_accum=2, steps=3, frozen_llm=True, save_every=3, **_BIG
    ),
    **{
        f"sp_{b}": dict(backend=b, plan="sp", grad_accum=2, steps=2, sequence_parallel=2, **_BIG)
        for b in ("ddp", "zero2", "zero3", "fsdp2")
    },
    "sp_ddp_ckpt": dict(
        backend="ddp", plan="sp", grad_accum=2, steps=2, sequence_parallel=2, checkpointing="both", **_BIG
    ),
}


def launch_once(tmp_path_factory) -> Path:
    """Every case of :data:`CASES` in one 2-process launch, once per pytest session (the test files that read the
    cases share it); returns the output root, with the launch's log in ``log.txt``."""
    if "out" not in _LAUNCHED:
        from helpers import forkrun

        out = tmp_path_factory.mktemp("numerics")
        # the ranks forked by tests/forkrun.py (the imports paid once), torchrun's environment
        log = forkrun([(2, ["--out", str(out), *CASES])], worker="numerics_worker", timeout=600)
        assert "WORKER DONE" in log, log[-6000:]
        (out / "log.txt").write_text(log)
        _LAUNCHED["out"] = out
    return _LAUNCHED["out"]


_LAUNCHED: dict[str, Path] = {}


def batches_for(plan: str, tok, rank: int, world: int, case: dict[str, Any]) -> list[dict[str, Any]]:
    """This rank's micro-batches: ``grads`` split contiguously over the ranks, ``textonly`` (rank 0 media, the others
    text), ``sp`` all 4 of ``grads`` on every rank (one sequence-parallel group shares each row)."""
    if plan == "grads":
        every = grad_check_batches(tok)
        per = len(every) // world
        return every[rank * per : (rank + 1) * per]
    if plan == "textonly":
        return textonly_batches(tok, rank, case["grad_accum"] * case["steps"])
    if plan == "sp":
        return grad_check_batches(tok)
    raise ValueError(plan)


_ENV = dict(os.environ)


def _reset_accelerate() -> None:
    """Forget the previous case's accelerator (a singleton per process) and what it left behind: the environment
    flags accelerate sets (``ACCELERATE_USE_DEEPSPEED`` would turn the next DDP case into DeepSpeed) and
    transformers' ZeRO-3 config (the next model would be built partitioned, under ``zero.Init``). The process group
    stays."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    unset_hf_deepspeed_config()
    for key in [k for k in os.environ if k.startswith("ACCELERATE_") and k not in _ENV]:
        del os.environ[key]


def run_case(name: str, out_root: Path, hooks: SimpleNamespace, rank: int, world: int) -> None:
    from videollama3_train.trainer import TrainConfig, fit

    case = {
        "precision": "fp32",
        "checkpointing": "none",
        "sequence_parallel": 1,
        "save_every": 0,
        **CASES[name],
    }
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    # the fault hooks of dist_worker read these (installed once per process)
    hooks.out, hooks.digests = str(out), bool(case.get("digests"))
    hooks.nan_steps = case.get("nan_steps", "")
    _reset_accelerate()
    model, tok = tiny_setup()
    partition = case["backend"] == "zero3"
    cfg = TrainConfig(
        lr_vision=case["lr"],
        lr_projector=case["lr"],
        lr_llm=None if case.get("frozen_llm") else case["lr"],
        adam_eps=case["eps"],
        max_grad_norm=0.0,
        lr_schedule="constant",
        warmup_ratio=0.0,
        grad_accum=case["grad_accum"],
        max_steps=case["steps"],
        backend=case["backend"],
        precision=case["precision"],
        gradient_checkpointing=case["checkpointing"],
        sequence_parallel=case["sequence_parallel"],
        save_every=case["save_every"],
        keep_last=1,
        log_every=1,
        deepspeed_config_dir=_partition_everything(out, rank) if partition else None,
    )
    loader = ListLoader(batches_for(case["plan"], tok, rank, world, case))
    fit(model, loader, cfg, out_dir=out)
    if case["sequence_parallel"] > 1:
        sp = _SP_MODULES.pop()  # the loss module fit built: what this rank's tower encoded
        work = {"patches": sp.patches_encoded, "frames": sp.frames_encoded, "class": type(sp).__name__}
        (out / f"sp_rank{rank}.json").write_text(json.dumps(work))
    if hooks.digests:
        _write_digest(out, rank, "final", model)
    if partition:
        print(f"PARTITIONED {name} {rank} {assert_partitioned(model, world)} parameters", flush=True)
    state = full_state_dict(model)
    if rank == 0:
        torch.save(state, out / "params_after.pt")
        (out / "DONE").write_text(json.dumps(case) + "\n")
    print(f"CASE DONE {name}", flush=True)


_SP_MODULES: list[torch.nn.Module] = []


def _record_sp_modules() -> None:
    """Keep each sequence-parallel loss module fit builds (its counters say what this rank's tower encoded)."""
    from videollama3_train.trainer.sequence_parallel import SequenceParallelLoss

    original = SequenceParallelLoss.__init__

    def __init__(self, *a, **kw):
        original(self, *a, **kw)
        _SP_MODULES.append(self)

    SequenceParallelLoss.__init__ = __init__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("cases", nargs="+", choices=sorted(CASES))
    args = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    hooks = SimpleNamespace(
        out=args.out,
        digests=False,
        nan_steps="",
        fault_rank=1,
        stall_in=None,
        stall_step=0,
    )
    _install_hooks(hooks, rank)
    _record_sp_modules()
    for name in args.cases:
        run_case(name, Path(args.out), hooks, rank, world)
    print("WORKER DONE", flush=True)
    _shut_down()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
