"""B6: peak activation memory per rank vs row length, with and without sequence parallelism (CPU, tiny model).

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/bench_sp.py --tokens 2048 4096 --out DIR

For each row length, one packed row holding one long video sample (8x8-patch frames, merge 2: 16 LLM tokens a
frame) plus its prompt and answer: the forward + backward of the plain loss module on the whole row in one process
(SP 1, rank 0 only, no communication) and of the sequence-parallel loss module over all ranks (SP = world size).
Memory is the peak of tensor storages allocated during the step (``common.LiveTensorMemory``: parameters and
inputs excluded), so it is activation memory; on CPU it is exact and independent of the allocator. A GPU run of the
same script (``--device cuda``) reads ``torch.cuda.max_memory_allocated`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.append(os.path.dirname(_HERE))

from common import LiveTensorMemory, command_line, gib, machine_info, markdown_table, now  # noqa: E402


def video_row(tok, tokens: int, seed: int = 0) -> dict:
    """One packed row of about ``tokens`` tokens: a prompt, a video of ``frames`` 8x8-patch frames (merge 2) and
    a 32-token answer."""
    from videollama3_train.data.collate import collate_packed

    g = torch.Generator().manual_seed(seed)
    frames = max(2, (tokens - 64) // 16)
    vid = tok.convert_tokens_to_ids("<|video_pad|>")
    prompt = torch.randint(0, 400, (32,), generator=g)
    answer = torch.randint(0, 400, (32,), generator=g)
    ids = torch.cat([prompt, torch.full((frames * 16,), vid), answer])
    labels = torch.full_like(ids, -100)
    labels[-32:] = answer
    sample = {
        "input_ids": ids,
        "labels": labels,
        "pixel_values_videos": torch.randn(frames * 64, 3 * 14 * 14, generator=g),
        "video_grid_thw": torch.tensor([[frames, 8, 8]]),
        "video_merge_sizes": torch.tensor([2]),
        "video_compression_mask": torch.ones(frames * 16, dtype=torch.bool),
        "meta": {"dataset": "bench", "index": 0, "modality": "video"},
    }
    return collate_packed([sample])


def measure(module, batch) -> tuple[int, float]:
    module.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with LiveTensorMemory() as mem:
        loss, _ = module(batch)
        loss.backward()
        del loss
    return mem.peak, time.perf_counter() - t0


def main() -> int:
    from videollama3_train.contract import ParallelDims
    from videollama3_train.model.core import ModelConfig, build_model
    from videollama3_train.model.tokenizer import build_tiny_tokenizer
    from videollama3_train.trainer.sequence_parallel import SequenceParallelLoss, build_sp_group
    from videollama3_train.trainer.step import LossModule

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = build_tiny_tokenizer()
    model = build_model(ModelConfig(preset="tiny", attn_implementation="sdpa", seed=0), tok).float()
    plain = LossModule(
        build_model(ModelConfig(preset="tiny", attn_implementation="sdpa", seed=0), tok).float(), 4096
    )
    sp_module = SequenceParallelLoss(model, 4096, build_sp_group(ParallelDims(world, rank, sp_size=world)))
    rows = []
    for n in args.tokens:
        batch = video_row(tok, n)
        peak1 = secs1 = None
        if rank == 0:
            peak1, secs1 = measure(plain, batch)
        dist.barrier()
        peak, secs = measure(sp_module, batch)
        peaks = [None] * world
        dist.all_gather_object(peaks, peak)
        if rank == 0:
            rows.append(
                {
                    "tokens": int(batch["input_ids"].shape[1]),
                    "frames": int(batch["video_grid_thw"][0, 0]),
                    "sp1_peak_bytes": peak1,
                    "sp1_seconds": secs1,
                    f"sp{world}_peak_bytes_per_rank": max(peaks),
                    f"sp{world}_seconds": secs,
                }
            )
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        argv = sys.argv[1:]
        result = {
            "command": command_line(argv, "benchmarks/bench_sp.py"),
            "machine": machine_info(torch.device("cpu")),
        }
        result.update(date=now(), world=world, rows=rows)
        (out / "B6_sequence_parallel.json").write_text(json.dumps(result, indent=2))
        table = markdown_table(
            ["row tokens", "video frames", "SP 1 peak", f"SP {world} peak per rank", "ratio"],
            [
                [
                    r["tokens"],
                    r["frames"],
                    gib(r["sp1_peak_bytes"]),
                    gib(r[f"sp{world}_peak_bytes_per_rank"]),
                    f"{r[f'sp{world}_peak_bytes_per_rank'] / r['sp1_peak_bytes']:.2f}",
                ]
                for r in rows
            ],
        )
        md = f"# B6 sequence parallelism, activation memory per rank\n\n{result['command']}\n\n{result['machine']}, "
        md += f"{result['date']}\n\n{table}\n"
        (out / "B6_sequence_parallel.md").write_text(md)
        print(md, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
