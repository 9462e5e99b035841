"""Tiny synthetic training setups for the trainer tests, and a CLI that runs :func:`fit` on them.

Imported by tests/test_fit.py and tests/test_distributed.py (helpers), and launched as a script (plain ``python`` or
``torch.distributed.run``) for the subprocess tests:

    python tests/dist_worker.py --out DIR --backend ddp --grad-accum 2 --steps 1 --plan grads

Plans (which micro-batches rank r of world w gets):
  ``grads``    the 4 micro-batches of :func:`grad_check_batches`, split contiguously over the ranks;
  ``textonly`` rank 0 gets image/video micro-batches, every other rank only text-only ones;
  ``repeat``   :func:`train_batches` (8 mixed micro-batches), the same on every rank.
On exit rank 0 writes ``params_after.pt`` (full state dict; ZeRO-3 parameters are gathered first) into --out.

Fault hooks (tests/test_faults.py, test_fit.py): ``--stall-after N`` sleeps after step N; ``--stall-in-save N``
sleeps inside the save of the step-N checkpoint, after ``accelerator.save_state`` has written weights, optimizer
and RNG states into the ``.tmp`` directory (the loop state, loader states and ``COMPLETE`` are not written yet);
``--pause-at N`` makes rank 0 wait after step N until fit has seen a SIGTERM (so the ranks stop after step N+1,
whatever the delay of the signal). Every rank prints ``PID <rank> <pid>`` at start and writes ``exit_rank<r>`` with its exit code.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PATCH_DIM = 3 * 14 * 14  # 588: one flattened (C, 1, 14, 14) patch


def tiny_setup(seed: int = 0):
    """``(model, tokenizer)``: the tiny preset, fp32, sdpa, deterministic for a given seed."""
    from videollama3_train.model.core import ModelConfig, build_model
    from videollama3_train.model.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_model(ModelConfig(preset="tiny", attn_implementation="sdpa", seed=seed), tok)
    return model, tok


def make_sample(
    tok,
    gen: torch.Generator,
    *,
    modality: str,
    n_prompt: int,
    n_answer: int,
    dataset: str = "synthetic",
    index: int = -1,
) -> dict[str, Any]:
    """One Sample dict (docs/architecture.md): random text ids around media placeholders; labels on the answer.

    Images use grid (1, 2, 4) with merge 1 (8 tokens); videos grid (2, 2, 2) with merge 2 (2 tokens).
    """
    text_vocab = 200  # plain BPE ids, far from the specials
    ids = [int(x) for x in torch.randint(0, text_vocab, (n_prompt,), generator=gen)]
    out: dict[str, Any] = {}
    if modality == "image":
        grid, merge = torch.tensor([[1, 2, 4]]), torch.tensor([1])
        ids = ids[:1] + [tok.convert_tokens_to_ids("<|image_pad|>")] * 8 + ids[1:]
        out.update(
            pixel_values=torch.randn(8, PATCH_DIM, generator=gen),
            image_grid_thw=grid,
            image_merge_sizes=merge,
        )
    elif modality == "video":
        grid, merge = torch.tensor([[2, 2, 2]]), torch.tensor([2])
        ids = ids[:1] + [tok.convert_tokens_to_ids("<|video_pad|>")] * 2 + ids[1:]
        out.update(
            pixel_values_videos=torch.randn(8, PATCH_DIM, generator=gen),
            video_grid_thw=grid,
            video_merge_sizes=merge,
            video_compression_mask=torch.ones(2, dtype=torch.bool),
        )
    answer = [int(x) for x in torch.randint(0, text_vocab, (n_answer,), generator=gen)]
    labels = [-100] * len(ids) + answer
    out["input_ids"] = torch.tensor(ids + answer)
    out["labels"] = torch.tensor(labels)
    out["meta"] = {
        "dataset": dataset,
        "index": index,
        "modality": modality,
        "num_tokens": len(ids) + len(answer),
        "num_label_tokens": n_answer,
    }
    return out


def pack(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A packed micro-batch with the ``collate_packed`` contract (first label of every sample -100)."""
    lengths = [int(s["input_ids"].shape[0]) for s in samples]
    labels = torch.cat([s["labels"] for s in samples]).clone()
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    labels[starts] = -100
    batch: dict[str, Any] = {
        "input_ids": torch.cat([s["input_ids"] for s in samples])[None],
        "labels": labels[None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seqlens": torch.tensor([0, *lengths]).cumsum(0).to(torch.int32),
        "max_seqlen": max(lengths),
    }
    for keys in (
        ("pixel_values", "image_grid_thw", "image_merge_sizes"),
        ("pixel_values_videos", "video_grid_thw", "video_merge_sizes", "video_compression_mask"),
    ):
        having = [s for s in samples if keys[0] in s]
        if having:
            for k in keys:
                batch[k] = torch.cat([s[k] for s in having])
    batch["meta"] = [s["meta"] for s in samples]
    batch["sample_lengths"] = lengths
    return batch


def train_batches(tok, n: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` mixed micro-batches (text / image / video samples from two datasets), label counts varying."""
    gen = torch.Generator().manual_seed(seed)
    kinds = ["text", "image", "video"]
    out = []
    for i in range(n):
        samples = [
            make_sample(
                tok,
                gen,
                modality=kinds[(i + j) % 3],
                n_prompt=5 + j,
                n_answer=3 + (i + 2 * j) % 5,
                dataset=("alpha", "beta")[j % 2],
                index=2 * i + j,
            )
            for j in range(2)
        ]
        out.append(pack(samples))
    return out


def grad_check_batches(tok, seed: int = 1) -> list[dict[str, Any]]:
    """4 micro-batches with very different label counts (2, 9, 4, 17): a per-micro-batch mean would differ."""
    gen = torch.Generator().manual_seed(seed)
    spec = [
        [("image", 2)],
        [("text", 5), ("video", 4)],
        [("text", 4)],
        [("image", 9), ("text", 8)],
    ]
    return [pack([make_sample(tok, gen, modality=m, n_prompt=4, n_answer=a) for m, a in mb]) for mb in spec]


def textonly_batches(tok, rank: int, n: int, seed: int = 2) -> list[dict[str, Any]]:
    """Rank 0: image + video micro-batches; other ranks: text-only ones."""
    gen = torch.Generator().manual_seed(seed + rank)
    kinds = ["image", "video"] if rank == 0 else ["text", "text"]
    return [pack([make_sample(tok, gen, modality=kinds[i % 2], n_prompt=6, n_answer=4)]) for i in range(n)]


class ListLoader:
    """In-memory loader with the PackedLoader interface: iterable, ``__len__``, resumable ``state_dict``;
    ``token_budget`` and ``skipped`` (bad samples by reason) as the trainer's metrics read them."""

    def __init__(self, batches: list[dict[str, Any]], token_budget: int | None = None):
        self.batches = batches
        self.token_budget = token_budget
        self.skipped: dict[str, int] = {}
        self.epoch = 0
        self.index = 0
        self.served = 0  # micro-batches handed out in this process (for tests)

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.index = epoch, 0

    def __iter__(self):
        while self.index < len(self.batches):
            # The order changes with the epoch, so a resumed run that lost track of the epoch would differ.
            order = self.index if self.epoch % 2 == 0 else len(self.batches) - 1 - self.index
            self.index += 1
            self.served += 1
            yield self.batches[order]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of all parameters (ZeRO-3 partitions are gathered first)."""
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _stall_in_save(step: int) -> None:
    """Make the save of ``step``'s checkpoint hang after the weights are written (a test then SIGKILLs us)."""
    from accelerate import Accelerator

    original = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        out = original(self, output_dir, **kwargs)
        if str(output_dir).endswith(f"step-{step:08d}.tmp"):
            print(f"STALLING IN SAVE {os.getpid()}", flush=True)
            time.sleep(3600)
        return out

    Accelerator.save_state = save_state


def main(argv: list[str] | None = None) -> int:
    from videollama3_train.trainer import TrainConfig, fit

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="ddp")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--plan", choices=("grads", "textonly", "repeat"), default="grads")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e4)
    p.add_argument("--eps", type=float, default=1e4)
    p.add_argument("--max-grad-norm", type=float, default=0.0)
    p.add_argument(
        "--stall-after", type=int, default=0, help="sleep forever after this many steps (kill tests)"
    )
    p.add_argument(
        "--stall-in-save", type=int, default=0, help="sleep inside the save of this step's checkpoint"
    )
    p.add_argument("--pause-at", type=int, default=0, help="rank 0 waits for <out>/go after this step")
    p.add_argument("--token-budget", type=int, default=0, help="ListLoader.token_budget (0: none)")
    args = p.parse_args(argv)

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    print(f"PID {rank} {os.getpid()}", flush=True)
    if args.stall_in_save:
        _stall_in_save(args.stall_in_save)
    model, tok = tiny_setup()
    if args.plan == "grads":
        all_batches = grad_check_batches(tok)
        per_rank = len(all_batches) // world
        batches = all_batches[rank * per_rank : (rank + 1) * per_rank]
    elif args.plan == "textonly":
        batches = textonly_batches(tok, rank, args.grad_accum * args.steps)
    else:
        batches = train_batches(tok)
    cfg = TrainConfig(
        lr_vision=args.lr,
        lr_projector=args.lr,
        lr_llm=args.lr,
        adam_eps=args.eps,
        max_grad_norm=args.max_grad_norm,
        lr_schedule="constant",
        warmup_ratio=0.0,
        grad_accum=args.grad_accum,
        max_steps=args.steps,
        backend=args.backend,
        precision="fp32",
        output_dir=args.out,
        save_every=args.save_every,
        keep_last=3,
        log_every=1,
    )
    on_step = None
    if args.stall_after:

        def on_step(metrics: dict[str, Any]) -> None:
            print(f"STEP {metrics['step']} loss {metrics['loss']}", flush=True)
            if metrics["step"] >= args.stall_after:
                print("STALLING", flush=True)
                time.sleep(3600)

    if args.pause_at:

        def on_step(metrics: dict[str, Any]) -> None:
            print(f"STEP {metrics['step']} loss {metrics['loss']}", flush=True)
            if metrics["step"] == args.pause_at:
                print("PAUSED", flush=True)
                # fit's SIGTERM handler is a bound method of its flag object
                flag = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
                for _ in range(6000):  # bounded: 10 minutes at most
                    if getattr(flag, "requested", True):
                        break
                    time.sleep(0.1)

    try:
        fit(model, ListLoader(batches, token_budget=args.token_budget or None), cfg, on_step=on_step)
    except SystemExit as e:  # SIGTERM: fit checkpointed and asks for a clean exit
        (Path(args.out) / f"exit_rank{rank}").write_text(f"{e.code}\n")
        raise
    (Path(args.out) / f"exit_rank{rank}").write_text("0\n")
    state = full_state_dict(model)
    if rank == 0:
        torch.save(state, Path(args.out) / "params_after.pt")
        print("WORKER DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
