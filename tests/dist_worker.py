"""Tiny synthetic training setups for the trainer tests, and a CLI that runs :func:`fit` on them.

Imported by tests/test_fit.py, test_distributed.py, test_faults.py, test_world_size.py (helpers), and launched as a
script (plain ``python`` or ``torch.distributed.run``) for the subprocess tests:

    python tests/dist_worker.py --out DIR --backend ddp --grad-accum 2 --steps 1 --plan grads

Plans (which micro-batches rank r of world w gets):
  ``grads``    the 4 micro-batches of :func:`grad_check_batches`, split contiguously over the ranks;
  ``textonly`` rank 0 gets image/video micro-batches, every other rank only text-only ones;
  ``repeat``   :func:`train_batches` (8 mixed micro-batches), the same on every rank;
  ``ranked``   the real ``PackedLoader`` over a synthetic data set (``--ranked-samples`` records, text / image /
               video, a new order every epoch), ``--rows-per-step`` packed rows per optimizer step over all ranks:
               each rank gets different rows, the plan does not depend on the world size, and every micro-batch
               yielded is recorded in ``samples_rank<r>.jsonl`` (see :func:`read_consumed`).
On exit rank 0 writes ``params_after.pt`` (full state dict; ZeRO-3 parameters are gathered first) into --out.

Backends: ``ddp``, ``zero1|2|3``, ``fsdp2`` (``--shard-size``: ``trainer.fsdp_shard_size``).

Switches: ``--dropout P`` (dropout on every decoder layer's MLP output: resumed runs must restore RNG states);
``--partition-all`` (ZeRO-3 with persistence threshold 0; after training every rank asserts that every parameter
is partitioned, :func:`assert_partitioned`); ``--digests`` (every rank writes a digest of the
parameters it stores into ``digests_rank<r>.jsonl`` before each step, and ``final`` after the last: a skipped
step leaves it unchanged; :func:`read_digests`).

Fault hooks (tests/test_faults.py, test_fit.py, test_distributed.py): ``--nan-steps 2,4 --fault-rank 1`` adds a NaN
to the loss of the first micro-batch of those steps on that rank (its gradients stay finite); ``--stall-in
forward|backward --stall-step N --fault-rank R`` sleeps inside step N's first forward (or its backward, from a
gradient hook) on rank R, printing ``STALLING IN FORWARD|BACKWARD``, for a SIGKILL from the test;
``--stall-in-save N`` sleeps inside the save of the step-N checkpoint, after ``accelerator.save_state`` has written
weights, optimizer and RNG states into the ``.tmp`` directory (the loop state, loader states and ``COMPLETE`` are
not written yet); ``--pause-at N`` makes rank 0 wait after step N until fit
has seen a SIGTERM (so the ranks stop after step N+1, whatever the delay of the signal); ``--stop-after N`` stops the
run after step N as a SIGTERM would (checkpoint of step N, exit 0), without a signal. Every rank prints
``PID <rank> <pid>`` at start and writes ``exit_rank<r>`` with its exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
    """In-memory loader following ``contract.Loader`` (as PackedLoader does): micro-batches per epoch, an order
    that depends on the epoch, resumable ``state_dict``; ``token_budget`` and ``skipped`` (bad samples by reason)
    as the trainer's metrics read them."""

    def __init__(self, batches: list[dict[str, Any]], token_budget: int = 0):
        self.batches = batches
        self.token_budget = token_budget
        self.skipped: dict[str, int] = {}
        self.epoch = 0
        self.index = 0
        self.served = 0  # micro-batches handed out in this process (for tests)

    def __len__(self) -> int:
        return len(self.batches)

    def micro_batches_per_epoch(self, epoch: int) -> int:
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
    """CPU copies of all parameters (ZeRO-3 partitions are gathered first, FSDP2 shards too; collective then)."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    if any(isinstance(p, DTensor) for p in params):
        from videollama3_train.trainer import fsdp2

        return fsdp2.full_state_dict(model)
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def fsdp2_layout(model: torch.nn.Module) -> dict[str, Any]:
    """How FSDP2 laid out ``model``'s parameters: the distinct ``[mesh shape, mesh dim names, placements]`` and the
    parameters left whole (not DTensors)."""
    from torch.distributed.tensor import DTensor

    layouts, whole = set(), []
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            layouts.add(
                (tuple(mesh.shape), tuple(mesh.mesh_dim_names or ()), tuple(str(x) for x in p.placements))
            )
        else:
            whole.append(name)
    return {"layouts": sorted(layouts), "whole": whole}


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


# ----------------------------------------------------------------------------------------------------------------
# The ``ranked`` plan: a synthetic data set behind the real PackedLoader (global plan, global cursor)
# ----------------------------------------------------------------------------------------------------------------

RANKED_MAX_TOKENS, RANKED_MAX_PATCHES = 40, 24


def ranked_sample_spec(record: int) -> tuple[str, int, int]:
    """``(modality, n_prompt, n_answer)`` of synthetic record ``record`` (deterministic)."""
    return ("text", "image", "video")[record % 3], 4 + record % 5, 2 + (record * 7) % 6


def ranked_costs(n: int):
    """Cost table ``(n, 2)`` (tokens, patches) of the synthetic records, exactly what :class:`RankedEncoder` makes."""
    import numpy as np

    out = np.zeros((n, 2), dtype=np.int64)
    for r in range(n):
        modality, n_prompt, n_answer = ranked_sample_spec(r)
        out[r] = (
            n_prompt + n_answer + {"text": 0, "image": 8, "video": 2}[modality],
            0 if modality == "text" else 8,
        )
    return out


class RankedEncoder:
    """``encode_fn(dataset, record)`` of the ranked plan: a sample made from the record id alone (any rank, any
    world size, any process gives the same one); ``meta["index"]`` is the record (the sample id the tests check)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, dataset: int, record: int) -> dict[str, Any]:
        modality, n_prompt, n_answer = ranked_sample_spec(record)
        gen = torch.Generator().manual_seed(1000 + record)
        name = ("alpha", "beta")[record % 2]
        return make_sample(
            self.tok, gen, modality=modality, n_prompt=n_prompt, n_answer=n_answer, dataset=name, index=record
        )


def ranked_plan_fn(n: int, rows_per_step: int, seed: int = 0):
    """``plan(epoch)`` of ``n`` synthetic records: a new order every epoch, ``rows_per_step`` packed rows per
    optimizer step over all ranks (the global plan PackedLoader deals), the last partial step kept."""
    import numpy as np

    from videollama3_train.data.packing import pack as pack_rows

    costs = ranked_costs(n)

    def plan(epoch: int):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        return pack_rows(
            costs,
            order,
            max_tokens=RANKED_MAX_TOKENS,
            max_patches=RANKED_MAX_PATCHES,
            buffer_size=16,
            rows_per_step=rows_per_step,
            seed=seed,
            epoch=epoch,
        )

    return plan


def ranked_loader(tok, out: Path, rank: int, world: int, n: int, rows_per_step: int):
    """The real PackedLoader over the ranked plan; every micro-batch it yields is recorded (epoch, this rank's
    position, sample ids) in ``<out>/samples_rank<r>.jsonl`` for the sample-id checks."""
    from videollama3_train.data.loader import PackedLoader

    class RecordingLoader(PackedLoader):
        def __iter__(self):
            with (out / f"samples_rank{rank}.jsonl").open("a") as log:
                for batch in super().__iter__():
                    ids = [m["index"] for m in batch.get("meta") or []]
                    row = {"epoch": self.epoch, "position": self.position, "grad_accum": self.grad_accum}
                    log.write(json.dumps({**row, "world": self.world_size, "ids": ids}) + "\n")
                    log.flush()
                    yield batch

    plan = ranked_plan_fn(n, rows_per_step)
    return RecordingLoader(plan, rank, RankedEncoder(tok), world_size=world, collate_fn=pack, seed=0)


def read_consumed(out: Path) -> dict[tuple[int, int], list[int]]:
    """``{(epoch, optimizer step in the epoch, 0-based): sorted sample ids of that step, all ranks}`` from the
    samples_rank*.jsonl an output directory collected. A step that a killed run had started and its resumed run
    did again (same world size) counts once, as the resumed run logged it; a step logged at two world sizes is an
    error (a resume at another world size starts after the checkpointed step)."""
    steps: dict[tuple[int, int], dict[tuple[int, int, int], list[int]]] = {}
    for f in sorted(out.glob("samples_rank*.jsonl")):
        rank = int(f.stem.removeprefix("samples_rank"))
        for line in f.read_text().splitlines():
            r = json.loads(line)
            key = (r["epoch"], (r["position"] - 1) // r["grad_accum"])
            steps.setdefault(key, {})[r["world"], rank, r["position"]] = r["ids"]  # a later run replaces
    for key, rows in steps.items():
        if len({w for w, _, _ in rows}) > 1:
            raise ValueError(f"step {key} was logged at several world sizes: {rows}")
    return {key: sorted(i for ids in rows.values() for i in ids) for key, rows in steps.items()}


# ----------------------------------------------------------------------------------------------------------------
# Fault and probe hooks
# ----------------------------------------------------------------------------------------------------------------

_NOW = {"step": 0, "micro": 0}


def _local_digest(module: torch.nn.Module) -> float:
    """A number that changes when any parameter this rank stores changes (ZeRO-3: its partitions)."""
    total = 0.0
    for p in module.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        t = t.detach().double()
        total += float(t.sum()) + float(t.abs().sum())
    return total


def _write_digest(out: Path, rank: int, step: int | str, module: torch.nn.Module) -> None:
    with (out / f"digests_rank{rank}.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, "digest": _local_digest(module)}) + "\n")


def read_digests(out: Path, rank: int) -> dict[int | str, float]:
    """``{step: digest before it, "final": after the last}`` that rank ``rank`` wrote with ``--digests``."""
    rows = [json.loads(line) for line in (out / f"digests_rank{rank}.jsonl").read_text().splitlines()]
    return {r["step"]: r["digest"] for r in rows}


_HOOKED: dict[str, Any] = {}  # the run whose fault switches the hooks follow (installed once per process)


def _install_hooks(args, rank: int) -> None:
    """Patch the loop's per-step entry (``fit.forward_backward``: knows the step) and the loss module's forward
    (each micro-batch) for the fault switches of ``args`` (a later call switches the hooks to its ``args``)."""
    first = not _HOOKED
    _HOOKED.update(args=args, rank=rank)
    if not first:
        return
    import videollama3_train.trainer  # noqa: F401  (its package attribute ``fit`` is the function)
    from videollama3_train.trainer.step import LossModule

    fit_module = sys.modules["videollama3_train.trainer.fit"]
    original_step = fit_module.forward_backward

    def forward_backward(module, *a, **kw):
        args, rank = _HOOKED["args"], _HOOKED["rank"]
        _NOW["step"], _NOW["micro"] = kw.get("step", 0), 0
        if args.digests:
            _write_digest(Path(args.out), rank, _NOW["step"], module)
        return original_step(module, *a, **kw)

    fit_module.forward_backward = forward_backward
    original_forward = LossModule.forward

    def forward(self, batch):
        args, rank = _HOOKED["args"], _HOOKED["rank"]
        nan_steps = {int(s) for s in args.nan_steps.split(",") if s}
        out = original_forward(self, batch)
        step, micro = _NOW["step"], _NOW["micro"]
        _NOW["micro"] += 1
        here = micro == 0 and rank == args.fault_rank
        nan_steps = {
            int(s) for s in args.nan_steps.split(",") if s
        }  # read per call: numerics_worker changes it
        if here and step in nan_steps:
            # a non-finite loss whose gradients stay finite: the case a gradient-norm check alone misses
            out = (out[0] + torch.tensor(float("nan"), device=out[0].device), *out[1:])
        if here and step == args.stall_step and args.stall_in == "forward":
            _stall("STALLING IN FORWARD")
        if here and step == args.stall_step and args.stall_in == "backward":
            out[0].register_hook(lambda g: _stall("STALLING IN BACKWARD") or g)
        return out

    LossModule.forward = forward


def _stall(marker: str) -> None:
    print(f"{marker} {os.getpid()}", flush=True)
    time.sleep(600)  # bounded; the test SIGKILLs us long before


def _partition_everything(out: Path, rank: int) -> str:
    """A ZeRO-3 config folder whose persistence threshold is 0 (every parameter partitioned, however small)."""
    folder = out / "deepspeed"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        ds = json.loads(
            (Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero3.json").read_text()
        )
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        tmp = folder / "zero3.json.tmp"
        tmp.write_text(json.dumps(ds))
        os.replace(tmp, folder / "zero3.json")
    deadline = time.monotonic() + 120
    while not (folder / "zero3.json").is_file():  # the other ranks wait for rank 0's file
        if time.monotonic() > deadline:
            raise TimeoutError(f"{folder}/zero3.json not written")
        time.sleep(0.1)
    return str(folder)


def assert_partitioned(model: torch.nn.Module, world: int) -> int:
    """Every parameter is a ZeRO-3 partition: not persistent, released outside a forward, and this rank holds
    ``ceil(numel / world)`` of its elements (fewer than all of them when it has more than one). Returns the count."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    n = 0
    for name, p in model.named_parameters():
        assert hasattr(p, "ds_id"), f"{name} is not managed by ZeRO-3"
        assert not p.ds_persist, f"{name} ({p.ds_numel} elements) is persistent: whole on every rank"
        assert p.ds_status == ZeroParamStatus.NOT_AVAILABLE, f"{name} is {p.ds_status}, not partitioned"
        assert p.numel() == 0, f"{name} holds {p.numel()} elements outside a forward"
        local = p.ds_tensor.numel()
        assert local == -(-p.ds_numel // world), f"{name}: {local} of {p.ds_numel} elements on this rank"
        assert world == 1 or p.ds_numel == 1 or local < p.ds_numel, f"{name} is whole on this rank"
        n += 1
    return n


def _stop_after(step: int):
    """on_step that makes the ranks stop (with a checkpoint, exit 0) after optimizer step ``step``: at step - 1
    rank 0 sets fit's SIGTERM flag, which the ranks vote on in step ``step``'s all-reduce."""

    def on_step(metrics: dict[str, Any]) -> None:
        if metrics["step"] == step - 1:
            flag = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
            flag.requested = True

    return on_step


RUN_SEPARATOR = "+++"  # between the arguments of runs made one after the other in one process


def main(argv: list[str] | None = None) -> int:
    """Each run of ``argv`` (runs separated by ``+++``) in turn, in this process: one launch (imports, process
    group) for several runs. Every run starts by printing ``RUN <i> START`` (:func:`run_logs` splits a log); a run
    with ``--expect-error TEXT`` must fail with an exception whose message contains TEXT, and the next run goes on.
    """
    return run_in_turn(argv, run)


def run_in_turn(argv: list[str] | None, run_one) -> int:
    """``run_one(args, shut_down=...)`` for each run of ``argv`` (separated by ``+++``), see :func:`main`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    runs: list[list[str]] = [[]]
    for a in argv:
        if a == RUN_SEPARATOR:
            runs.append([])
        else:
            runs[-1].append(a)
    for i, run_argv in enumerate(runs):
        if i:  # every rank's output of the previous run is out before the marker
            _reset_accelerate()
            import torch.distributed as dist

            if dist.is_initialized():  # a plain one-process launch has no process group
                dist.barrier()
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"RUN {i} START", flush=True)
        last = i == len(runs) - 1
        if len(runs) > 1 and any(a in run_argv for a in ("--stall-in", "--stall-in-save", "--pause-at")):
            raise SystemExit("stalls and pauses are for a launch of one run (a test kills or signals it)")
        try:
            run_one(run_argv, shut_down=last)
        except SystemExit:  # --stop-after: the run stopped with a checkpoint (exit 0), as after a SIGTERM
            if last:
                raise
    return 0


def run_logs(log: str) -> list[str]:
    """The part of a multi-run launch's log that belongs to each run (both ranks' lines printed to stdout; stderr,
    which follows stdout in the log, goes to the last run)."""
    parts = log.split("RUN ")
    out: dict[int, list[str]] = {}
    for part in parts[1:]:
        head, _, rest = part.partition(" START")
        if head.isdigit():
            out.setdefault(int(head), []).append(rest)
        elif out:
            out[max(out)].append("RUN " + part)
    return ["".join(out[i]) for i in sorted(out)]


def launch_logs(log: str) -> list[str]:
    """The part of a tests/forkrun.py log that belongs to each launch (from its ``LAUNCH <i> START``; stderr, which
    follows stdout in the log, goes to the last launch)."""
    starts = [m.start() for m in re.finditer(r"LAUNCH \d+ START\n", log)]
    return [log[a:b] for a, b in zip(starts, [*starts[1:], len(log)])]


def _reset_accelerate() -> None:
    """Let the next run build its own Accelerator (another backend / DeepSpeed config) in this process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def run(argv: list[str], *, shut_down: bool = True) -> int:
    from videollama3_train.trainer import TrainConfig, fit

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="ddp")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="trainer.max_steps (-1: every step of --epochs)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--plan", choices=("grads", "textonly", "repeat", "ranked"), default="grads")
    p.add_argument("--rows-per-step", type=int, default=2, help="ranked: packed rows per step, all ranks (G)")
    p.add_argument("--ranked-samples", type=int, default=40, help="ranked: records in the synthetic data set")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e4)
    p.add_argument("--eps", type=float, default=1e4)
    p.add_argument("--schedule", default="constant")
    p.add_argument("--max-grad-norm", type=float, default=0.0)
    p.add_argument("--nan-tolerance", type=int, default=5)
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on every decoder layer's MLP output")
    p.add_argument("--partition-all", action="store_true", help="zero3: persistence threshold 0, asserted")
    p.add_argument(
        "--digests", action="store_true", help="print every rank's parameter digest before each step"
    )
    p.add_argument("--nan-steps", default="", help="comma-separated steps whose first micro-batch on")
    p.add_argument("--fault-rank", type=int, default=0, help="... this rank gets a NaN loss / the stall")
    p.add_argument("--stall-in", choices=("forward", "backward"), default=None)
    p.add_argument("--stall-step", type=int, default=0, help="sleep inside this step's forward/backward")
    p.add_argument("--stop-after", type=int, default=0, help="stop (checkpoint, exit 0) after this step")
    p.add_argument(
        "--stall-in-save", type=int, default=0, help="sleep inside the save of this step's checkpoint"
    )
    p.add_argument("--pause-at", type=int, default=0, help="rank 0 waits for <out>/go after this step")
    p.add_argument("--token-budget", type=int, default=0, help="ListLoader.token_budget (0: none)")
    p.add_argument("--shard-size", type=int, default=0, help="fsdp2: trainer.fsdp_shard_size")
    p.add_argument("--expect-error", default="", help="the run must fail with this in its message")
    args = p.parse_args(argv)

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.stdout.write(f"PID {rank} {os.getpid()}\n")  # one write with its newline: the ranks share one pipe
    sys.stdout.flush()
    if args.stall_in_save:
        _stall_in_save(args.stall_in_save)
    _install_hooks(args, rank)
    model, tok = tiny_setup()
    if args.dropout:
        for layer in model.model.language_model.layers:
            layer.mlp.register_forward_hook(
                lambda m, i, o: torch.nn.functional.dropout(o, p=args.dropout, training=m.training)
            )
    if args.plan == "ranked":
        loader = ranked_loader(tok, out, rank, world, args.ranked_samples, args.rows_per_step)
    else:
        if args.plan == "grads":
            all_batches = grad_check_batches(tok)
            per_rank = len(all_batches) // world
            batches = all_batches[rank * per_rank : (rank + 1) * per_rank]
        elif args.plan == "textonly":
            batches = textonly_batches(tok, rank, args.grad_accum * args.steps)
        else:
            batches = train_batches(tok)
        loader = ListLoader(batches, token_budget=args.token_budget)
    cfg = TrainConfig(
        lr_vision=args.lr,
        lr_projector=args.lr,
        lr_llm=args.lr,
        adam_eps=args.eps,
        max_grad_norm=args.max_grad_norm,
        lr_schedule=args.schedule,
        warmup_ratio=0.0,
        grad_accum=args.grad_accum,
        epochs=args.epochs,
        max_steps=args.steps,
        backend=args.backend,
        fsdp_shard_size=args.shard_size,
        precision="fp32",
        save_every=args.save_every,
        keep_last=3,
        log_every=1,
        nan_tolerance=args.nan_tolerance,
        deepspeed_config_dir=_partition_everything(out, rank) if args.partition_all else None,
    )
    on_step = None
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

    if args.stop_after:
        on_step = _stop_after(args.stop_after)

    try:
        fit(model, loader, cfg, out_dir=out, on_step=on_step)
    except SystemExit as e:  # SIGTERM: fit checkpointed and asks for a clean exit
        (out / f"exit_rank{rank}").write_text(f"{e.code}\n")
        if shut_down:
            _shut_down()
        raise
    except Exception as e:
        if not args.expect_error or args.expect_error not in str(e):
            raise
        print(f"EXPECTED ERROR {rank}: {e}", flush=True)
        if shut_down:
            _shut_down()
        return 1
    if args.expect_error:
        raise AssertionError(f"the run did not fail with {args.expect_error!r}")
    (out / f"exit_rank{rank}").write_text("0\n")
    if args.digests:
        _write_digest(out, rank, "final", model)
    if args.partition_all:
        print(f"PARTITIONED {rank} {assert_partitioned(model, world)} parameters", flush=True)
    if args.backend == "fsdp2":
        # one write with its newline: ranks share the launcher's stdout, and print writes the newline separately
        sys.stdout.write(f"FSDP2 LAYOUT {rank} {json.dumps(fsdp2_layout(model))}\n")
        sys.stdout.flush()
    state = full_state_dict(model)
    if rank == 0:
        torch.save(state, out / "params_after.pt")
        print("WORKER DONE", flush=True)
    if shut_down:
        _shut_down()
    return 0


def _shut_down() -> None:
    """Leave the process group together: a rank that exits with it alive may abort in its C++ teardown
    ("terminate called without an active exception"), failing a run that did everything right."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
