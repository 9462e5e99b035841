"""FSDP2 building blocks: ``fully_shard`` units, mixed precision, DCP checkpoints, the full state dict for export.

We call ``torch.distributed.fsdp.fully_shard`` ourselves (as torchtitan does) rather than through accelerate's
``FullyShardedDataParallelPlugin(fsdp_version=2)``: accelerate 1.15 turns FSDP on only for GPU-type distributed
states, so under ``torchrun`` on a CPU host it silently falls back to DDP — the CPU tests would pass without
sharding anything. With ``fully_shard`` the same code shards on gloo and on NCCL, and the tests run what GPUs run.

Units (docs/reference.md §1): every vision-encoder block and every LLM decoder layer is its own unit (transformers marks
both as ``GradientCheckpointingLayer``); the root unit (last) holds what remains — patch embedding, vision
post-norm, projector, token embeddings, final norm and ``lm_head``. The root is the module whose ``forward`` the
loop calls (the loss module), not the model: the loss reads ``lm_head.weight`` and calls the tower and the LLM
directly, so only a root around that call gathers the root parameters at the right time.

Frozen groups: FSDP2 shards per parameter (DTensor), and a parameter without ``requires_grad`` gets no gradient, so
nothing of a frozen tower is reduce-scattered. The vision tower still runs on every rank every step (a dummy image
when a micro-batch has none), so every rank issues the same all-gathers in the same order.

Checkpoints go through ``torch.distributed.checkpoint`` (DCP): each rank writes its shards; a load reshards to the
world size at hand, so a run saved on 2 ranks resumes on 1 or 4.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

DCP_DIR = "dcp"  # sub-directory of a checkpoint holding the sharded model and optimizer


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become their own FSDP unit: every vision-encoder block and every LLM decoder layer."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def build_mesh(shard_size: int, device_type: str):
    """A 1-D mesh (plain FSDP) or, with ``0 < shard_size < world``, a 2-D (replicate, shard) mesh: HSDP shards within
    groups of ``shard_size`` ranks (a node) and replicates across them."""
    from torch.distributed.device_mesh import init_device_mesh

    world = torch.distributed.get_world_size()
    if shard_size <= 0 or shard_size >= world:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    if world % shard_size:
        raise ValueError(f"trainer.fsdp_shard_size={shard_size} must divide the world size {world}")
    return init_device_mesh(
        device_type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard")
    )


def apply_fsdp2(
    root: nn.Module,
    model: nn.Module,
    *,
    mesh,
    bf16: bool,
    reshard_after_forward: bool = True,
    offload: bool = False,
) -> nn.Module:
    """Shard ``model``'s layers as units, then ``root`` (which contains ``model``) as the root unit; in place.

    bf16: parameters are gathered and computed in bf16, gradients reduced in fp32, master weights and optimizer
    states stay fp32 (the sharded parameters keep their dtype).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for unit in shard_units(model):
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **kwargs)
    # the root is gathered for the whole step anyway (embeddings, projector, head): no reshard in between
    fully_shard(root, reshard_after_forward=False, **kwargs)
    return root


def save_dcp(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Write the sharded model and optimizer state under ``path/dcp`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(Path(path) / DCP_DIR))


def load_dcp(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Load ``path/dcp`` into the sharded model and optimizer, resharding to this world size (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(path) / DCP_DIR
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{path} holds no FSDP2 checkpoint ({DCP_DIR}/ missing): it was written by another backend; resume it "
            "with the backend that wrote it (trainer.backend)"
        )
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict on CPU on every rank (collective; rank 0 writes it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# Bytes of full tensors rank 0 hands to one ``set_model_state_dict`` call (a larger tensor goes alone; one larger
# than model/weights.py's ROW_BLOCK_BYTES comes as row blocks and is scattered block by block): each call also copies
# every local shard into itself (non-strict load), so a few hundred MB keeps both rank 0's extra memory and that
# overhead small (2B preset: 30 calls).
LOAD_CHUNK_BYTES = 256 * 2**20


@torch.no_grad()
def load_initial_weights(model: nn.Module, root: nn.Module, device: torch.device) -> None:
    """Fill a model sharded while its parameters were on meta (``build_model(defer_weights=True)``): every rank
    gives its shards memory, rank 0 reads the weights from ``model.initial_weights`` tensor by tensor and
    ``set_model_state_dict(broadcast_from_rank0=True)`` scatters each to its shards (collective); a tensor that
    comes as row blocks (``Rows``: the embedding of a large vocabulary) is broadcast block by block, each rank
    keeping the rows of its shard. No rank holds the whole model, nor a whole large tensor: rank 0 holds its shards
    plus one chunk of tensors, the others their shards plus one tensor or block in flight."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from videollama3_train.trainer.sharded_init import check_loaded, is_rows

    buffers = {n: b for n, b in root.named_buffers()}
    root.to_empty(device=device)
    for name, b in buffers.items():  # to_empty gives buffers fresh, uninitialised memory too
        owner, _, leaf = name.rpartition(".")
        root.get_submodule(owner)._buffers[leaf] = b.to(device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    params = dict(model.named_parameters())
    source = iter(model.initial_weights) if dist.get_rank() == 0 else None
    seen: set[str] = set()
    pending: tuple[str, Any] | None = None  # the item that did not fit the last chunk
    while True:
        chunk: dict[str, torch.Tensor] = {}
        rows = None  # (name, Rows) sent on its own
        if source is not None:
            size = 0
            while (item := pending or next(source, None)) is not None:
                name, value = item
                nbytes = value.numel() * value.element_size()
                if chunk and (is_rows(value) or size + nbytes > LOAD_CHUNK_BYTES):
                    pending = item
                    break
                pending = None
                if is_rows(value):
                    rows = item
                    break
                chunk[name] = value
                size += nbytes
        # what comes next: a chunk (""), a parameter by row blocks (its name), or the end (None)
        head = [rows[0] if rows is not None else ("" if chunk else None)]
        dist.broadcast_object_list(head, src=0)
        if head[0] is None:
            break
        if head[0]:
            if head[0] not in params:
                raise ValueError(f"initial weights: {head[0]}: no such parameter")
            scatter_rows(params[head[0]], rows[1] if rows is not None else None)
            seen.add(head[0])
            continue
        seen.update(chunk)
        set_model_state_dict(model, chunk, options=options)
        chunk.clear()
    if dist.get_rank() == 0:
        check_loaded(model, seen)
    del model.initial_weights


def scatter_rows(param: nn.Parameter, rows) -> None:
    """Rank 0's row blocks of a sharded parameter (``rows``: model/weights.py's ``Rows``; None on the other ranks)
    to every rank, one block in flight, each rank copying the rows its shard holds (collective)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if isinstance(param, DTensor):
        local = param.to_local()
        shape, offset = compute_local_shape_and_global_offset(
            param.shape, param.device_mesh, param.placements
        )
        lo, hi = offset[0], offset[0] + shape[0]
    else:  # a world of one: the parameter is whole
        local, lo, hi = param.data, 0, param.shape[0]
    # NCCL moves device tensors only; gloo CPU ones
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else local.device
    blocks = iter(rows) if rows is not None else None
    while True:
        item = next(blocks, None) if blocks is not None else None
        head = [None if item is None else (item[0], tuple(item[1].shape))]
        dist.broadcast_object_list(head, src=0)
        if head[0] is None:
            return
        start, shape_ = head[0]
        block = (
            item[1].to(comm, local.dtype)
            if item is not None
            else torch.empty(shape_, dtype=local.dtype, device=comm)
        )
        dist.broadcast(block, src=0)
        a, b = max(lo, start), min(hi, start + shape_[0])
        if a < b:
            local[a - lo : b - lo].copy_(block[a - start : b - start])
        item = block = None  # before the next block is made: one in flight
