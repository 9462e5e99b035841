"""Sequence parallelism on one packed row: SP over all ranks vs the plain loss module in one process.

    python -m torch.distributed.run --nproc_per_node 2 tests/sp_worker.py --out DIR

Every rank computes the reference (``LossModule`` on the whole row, no communication) and the sequence-parallel
loss of its slice; loss sums, per-sample sums and gradients are summed over the ranks and compared on rank 0 (fp32,
1e-5). Writes ``result.json`` (the comparison and each rank's encoded patches / frames).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from test_collate import make_sample  # noqa: E402


def row(tok):
    """Text-only, one image, two images and a long pruned video whose frames straddle the split point."""
    gen = torch.Generator().manual_seed(0)
    t, h, w = 6, 4, 4
    keep = [True] * 4 + [bool((i * 7) % 3) for i in range(4 * (t - 1))]
    samples = [
        make_sample(tok, gen),
        make_sample(tok, gen, images=[(4, 6)]),
        make_sample(tok, gen, images=[(2, 4), (6, 4)], answer_len=5),
        make_sample(tok, gen, video=(t, h, w), keep=keep, text_len=20),
        make_sample(tok, gen, text_len=7, answer_len=3),
    ]
    for i, s in enumerate(samples):
        s["meta"] = {"dataset": f"d{i % 2}", "index": i, "modality": "mixed"}
    return samples


def main() -> int:
    from videollama3_train.contract import ParallelDims
    from videollama3_train.data.collate import collate_packed
    from videollama3_train.model.core import ModelConfig, build_model
    from videollama3_train.model.tokenizer import build_tiny_tokenizer
    from videollama3_train.trainer.sequence_parallel import SequenceParallelLoss, build_sp_group
    from videollama3_train.trainer.step import LossModule

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = build_tiny_tokenizer()
    model = build_model(ModelConfig(preset="tiny", attn_implementation="sdpa", seed=0), tok).float()
    # sharp attention: a leak between samples or slices would move the loss visibly; one seed per layer, by its
    # place in the model, so every run (and every rank) has the same model
    for i, m in enumerate(model.modules()):
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.2, generator=torch.Generator().manual_seed(i))
    for prm in model.parameters():
        dist.broadcast(prm.data, 0)
    samples = row(tok)
    if os.environ.get("SP_ROW") == "text":
        samples = [samples[0], samples[4]]
    elif os.environ.get("SP_ROW") == "one":
        samples = [samples[0]]
    batch = collate_packed(samples)

    ref = LossModule(copy.deepcopy(model), 7)
    ref_loss, ref_ps = ref(batch)
    ref_loss.backward()
    ref_grads = {n: q.grad.clone() for n, q in ref.named_parameters() if q.grad is not None}

    sp = build_sp_group(ParallelDims(world, rank, sp_size=world))
    module = SequenceParallelLoss(model, 7, sp)
    loss, ps = module(batch)
    loss.backward()
    loss_sum = loss.detach().clone()
    dist.all_reduce(loss_sum)
    dist.all_reduce(ps)
    grads = {}
    for n, q in module.named_parameters():
        g = q.grad.clone() if q.grad is not None else torch.zeros_like(q)
        dist.all_reduce(g)
        grads[n] = g
    counts = torch.tensor([module.patches_encoded, module.frames_encoded], dtype=torch.long)
    all_counts = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)

    worst = max(
        ((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12)).item()
        for n, g in grads.items()
    )
    if rank == 0 and os.environ.get("SP_DEBUG"):
        print("loss", loss_sum.item(), ref_loss.item())
        for n, g in grads.items():
            e = ((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12)).item()
            print(f"{e:.2e} {n}")
    if rank == 0:
        # fp32, 1e-5 of each gradient's own scale (the sharp init makes gradients of order 100)
        for n, g in grads.items():
            tol = 1e-5 * max(float(ref_grads[n].abs().max()), 1.0)
            torch.testing.assert_close(g, ref_grads[n], atol=tol, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
        result = {
            "loss": loss_sum.item(),
            "ref_loss": ref_loss.item(),
            "per_sample": ps.tolist(),
            "ref_per_sample": ref_ps.tolist(),
            "worst_relative_grad_error": worst,
            "grads_compared": len(grads),
            "vision_grads": sum(1 for n in grads if ".vision_model." in n),
            "patches_per_rank": [int(c[0]) for c in all_counts],
            "frames_per_rank": [int(c[1]) for c in all_counts],
            "total_patches": sum(
                int(batch[k].shape[0]) for k in ("pixel_values", "pixel_values_videos") if k in batch
            ),
        }
        Path(args.out, "result.json").write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    print("WORKER DONE", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
