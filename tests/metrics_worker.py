"""Runs :func:`fit` on ranks that hold DIFFERENT datasets, for the per-dataset metrics test (tests/test_step_metrics.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/metrics_worker.py --out DIR    # rank r: its batches
    python tests/metrics_worker.py --out DIR --single                                      # one process: all of them

Rank 0 holds samples of dataset ``alpha`` only (text, image); rank 1 holds ``beta`` (video, text) and one ``alpha``
text sample. ``--single`` runs the same global batch in one process (rank 0's micro-batches, then rank 1's, all in
one optimizer step), so its per-dataset and per-modality losses are the reference the two-process run must log.
Two optimizer steps, both written at the one log step (``log_every=2``): one flush gathers two held rows. Rank 0
writes ``metrics.jsonl`` into ``--out`` (fit's writer).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dist_worker
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when not installed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORLD = 2


def rank_batches(tok, rank: int) -> list[dict[str, Any]]:
    """The two micro-batches of ``rank`` (of a world of 2): different datasets and modalities per rank."""
    from dist_worker import make_sample, pack

    gen = torch.Generator().manual_seed(100 + rank)

    def s(modality: str, dataset: str, n_answer: int, index: int) -> dict[str, Any]:
        return make_sample(
            tok, gen, modality=modality, n_prompt=5, n_answer=n_answer, dataset=dataset, index=index
        )

    if rank == 0:
        return [
            pack([s("text", "alpha", 4, 0), s("image", "alpha", 6, 1)]),
            pack([s("image", "alpha", 3, 2)]),
        ]
    return [pack([s("video", "beta", 5, 3), s("text", "alpha", 7, 4)]), pack([s("text", "beta", 2, 5)])]


def main(argv: list[str] | None = None) -> int:
    from dist_worker import ListLoader, tiny_setup

    from videollama3_train.trainer import TrainConfig, fit

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--single", action="store_true", help="one process, every rank's micro-batches")
    args = p.parse_args(argv)

    rank = int(os.environ.get("RANK", 0))
    model, tok = tiny_setup()
    if args.single:
        batches = [b for r in range(WORLD) for b in rank_batches(tok, r)]
    else:
        batches = rank_batches(tok, rank)
    cfg = TrainConfig(
        lr_vision=1e-2,
        lr_projector=1e-2,
        lr_llm=1e-2,
        max_grad_norm=0.0,
        lr_schedule="constant",
        warmup_ratio=0.0,
        grad_accum=len(batches),
        max_steps=2,
        backend="ddp",
        precision="fp32",
        save_every=0,
        log_every=2,
    )
    fit(model, ListLoader(batches), cfg, out_dir=args.out)
    if rank == 0:
        print("WORKER DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
