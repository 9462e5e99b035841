"""Runs :func:`fit` with ``trainer.backend=fsdp2`` on the tiny synthetic setups of tests/dist_worker.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_worker.py --out DIR --plan grads --grad-accum 2

Plans: ``grads`` (the 4 micro-batches of ``grad_check_batches`` split over the ranks: the update is compared with
the one-process reference), ``textonly`` (rank 0 images/videos, every other rank text only), ``repeat`` (8 mixed
micro-batches on every rank; the resume tests), ``ranked`` (the real PackedLoader over synthetic records, 2 packed
rows per step over all ranks: resumable at another world size). On exit: ``params_after.pt`` (rank 0, the full state dict, gathered
from the shards) and, with ``--export``, ``export/`` (transformers-native) plus ``logits.pt`` of the trained model
on a fixed input, so a test can load the export and compare. Asserts that every parameter is sharded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import (  # noqa: E402
    ListLoader,
    _shut_down,
    grad_check_batches,
    ranked_loader,
    run_in_turn,
    textonly_batches,
    tiny_setup,
    train_batches,
)


def probe_input() -> dict[str, torch.Tensor]:
    """A fixed text + image input for comparing the trained model with its export."""
    g = torch.Generator().manual_seed(7)
    return {
        "input_ids": torch.randint(0, 200, (1, 9), generator=g),
        "position_ids": torch.arange(9)[None],
    }


def main(argv: list[str] | None = None) -> int:
    """Several runs (arguments separated by ``+++``) in turn in one launch, as tests/dist_worker.py does."""
    return run_in_turn(argv, run)


def run(argv: list[str], *, shut_down: bool = True) -> int:
    from videollama3_train.trainer import TrainConfig, build_backend, fit

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--plan", choices=("grads", "textonly", "repeat", "ranked"), default="grads")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e4)
    p.add_argument("--eps", type=float, default=1e4)
    p.add_argument("--max-grad-norm", type=float, default=0.0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--frozen-llm", action="store_true")
    p.add_argument("--export", action="store_true")
    p.add_argument("--shard-size", type=int, default=0, help="trainer.fsdp_shard_size (HSDP when < world)")
    args = p.parse_args(argv)

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    sys.stdout.write(f"PID {rank} {os.getpid()}\n")  # one write with its newline: the ranks share one pipe
    sys.stdout.flush()
    model, tok = tiny_setup()
    batches = []
    if args.plan == "grads":
        all_batches = grad_check_batches(tok)
        per_rank = len(all_batches) // world
        batches = all_batches[rank * per_rank : (rank + 1) * per_rank]
    elif args.plan == "textonly":
        batches = textonly_batches(tok, rank, args.grad_accum * args.steps)
    elif args.plan == "repeat":
        batches = train_batches(tok)
    # ranked: the real PackedLoader over synthetic records (a global cursor: resumable at another world size)
    loader = (
        ranked_loader(tok, Path(args.out), rank, world, 40, 2)
        if args.plan == "ranked"
        else ListLoader(batches)
    )
    cfg = TrainConfig(
        lr_vision=args.lr,
        lr_projector=args.lr,
        lr_llm=None if args.frozen_llm else args.lr,
        adam_eps=args.eps,
        max_grad_norm=args.max_grad_norm,
        lr_schedule="constant",
        warmup_ratio=0.0,
        grad_accum=args.grad_accum,
        max_steps=args.steps,
        backend="fsdp2",
        fsdp_shard_size=args.shard_size,
        precision="fp32",
        save_every=args.save_every,
        keep_last=3,
        log_every=1,
    )

    def on_step(row):
        print(f"STEP {row['step']} loss {row['loss']!r} grad_norm {row['grad_norm']!r}", flush=True)

    backend = build_backend(cfg)
    fit(model, loader, cfg, out_dir=args.out, backend=backend, on_step=on_step if rank == 0 else None)

    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    # every parameter is a DTensor over the mesh (HSDP: replicated across groups), none stayed whole
    if world > 1:
        whole = [n for n, t in params.items() if not isinstance(t, DTensor)]
        assert not whole, f"parameters left unsharded: {whole[:5]}"
        print(f"SHARDED {len(params)} parameters", flush=True)

    from accelerate import PartialState

    state = PartialState()
    with backend.whole_model(model) as whole:
        if rank == 0:
            model = whole
            full = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            torch.save(full, Path(args.out) / "params_after.pt")
            if args.export:
                from videollama3_train.model.export import export_hf
                from videollama3_train.model.tokenizer import build_processor

                model.eval()
                with torch.no_grad():
                    logits = model(**probe_input(), use_cache=False).logits
                torch.save(logits, Path(args.out) / "logits.pt")
                export_hf(model, build_processor(tok), Path(args.out) / "export")
        state.wait_for_everyone()
    print("WORKER DONE", flush=True)
    if shut_down:
        _shut_down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
