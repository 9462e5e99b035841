"""Model construction for the sharded backends: no rank holds the whole model in host memory.

``build_model(defer_weights=True)`` returns the model with its parameters on the meta device and its weights as a
stream (``model.initial_weights``, model/weights.py). Then, per backend:

* FSDP2: ``fully_shard`` on the meta model, ``to_empty``, and rank 0 streams the weights into the shards through
  ``set_model_state_dict(broadcast_from_rank0=True)`` (:func:`videollama3_train.trainer.fsdp2.load_initial_weights`,
  called from ``FSDP2Backend.prepare``).
* ZeRO-3 (:func:`place`, right after the build): each leaf module gets memory for its parameters and is partitioned
  at once by ``deepspeed.zero.Init(module=...)`` (one module whole at a time), then rank 0 broadcasts each
  parameter from the stream (a large one by row blocks) and every rank copies its own partition out of it.

Other backends, and one process, build the model whole (materialised tensor by tensor, no second copy).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from videollama3_train.trainer.config import TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator


def wants_meta(cfg: TrainConfig, accelerator: Accelerator) -> bool:
    """Whether the model should be built on meta (weights deferred) for this backend and world."""
    return cfg.backend in ("fsdp2", "zero3") and accelerator.num_processes > 1


def place(model: nn.Module, cfg: TrainConfig, accelerator: Accelerator) -> nn.Module:
    """Give a meta-built model its weights where the backend wants them before ``prepare`` (ZeRO-3: partitioned
    now; FSDP2: nothing yet, ``prepare`` shards then loads); returns ``model``. A whole model is left as it is."""
    if cfg.backend == "zero3" and hasattr(model, "initial_weights"):
        _zero3_place(model, accelerator)
    return model


def _partition_only():
    """``deepspeed.zero.Init`` that partitions a module's parameters without first broadcasting them from rank 0.

    ``zero.Init(module=...)`` makes every rank's copy rank 0's before partitioning: here those are uninitialised
    memory (the weights come from the stream after), and the broadcast only makes every other rank write a whole
    module's worth of pages that rank 0 never touches (2B preset, before: rank 1 peaked 0.7 GiB above rank 0).
    Overrides DeepSpeed's ``_zero_init_param`` (0.19: convert, broadcast, partition); were it renamed, the
    broadcast would come back - more memory on the other ranks, the same weights."""
    import deepspeed

    class PartitionOnly(deepspeed.zero.Init):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    return PartitionOnly


@torch.no_grad()
def _zero3_place(model: nn.Module, accelerator: Accelerator) -> None:
    import torch.distributed as dist

    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    partition = _partition_only()
    made: dict[int, nn.Parameter] = {}  # meta parameter -> its partitioned replacement
    for module in list(model.modules()):
        own = [n for n, p in module._parameters.items() if p is not None and p.device.type == "meta"]
        if not own:
            continue
        for n in own:  # one module's parameters whole, partitioned right away
            p = module._parameters[n]
            if id(p) in made:  # a tied alias (the output layer): the one partitioned parameter, no second
                module._parameters[n] = made[id(p)]
                continue
            made[id(p)] = module._parameters[n] = nn.Parameter(
                torch.empty(p.shape, dtype=p.dtype), p.requires_grad
            )
        partition(module=module, config_dict_or_path=ds_config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # a module's own copy of a tied parameter (none expected) shares again
    params = dict(model.named_parameters())
    rank, source = dist.get_rank(), iter(model.initial_weights) if dist.get_rank() == 0 else None
    seen: set[str] = set()
    while True:
        item = next(source, None) if source is not None else None
        # the next parameter's name and whether it comes as row blocks (None: the end)
        head = [None if item is None else (item[0], is_rows(item[1]))]
        dist.broadcast_object_list(head, src=0)
        if head[0] is None:
            break
        name, by_rows = head[0]
        if name not in params:
            raise ValueError(f"initial weights: {name}: no such parameter")
        p = params[name]
        if by_rows:  # one block of rows in flight (the embedding of a large vocabulary)
            _load_rows(p, item[1] if item is not None else None, rank)
        else:  # one tensor whole in flight
            _load_flat(p, 0, item[1] if item is not None else None, tuple(p.ds_shape), rank)
        seen.add(name)
    if dist.get_rank() == 0:
        check_loaded(model, seen)
    del model.initial_weights


def is_rows(value) -> bool:
    """Whether a weight source's value is a tensor given as row blocks (model/weights.py's ``Rows``) rather than
    a tensor."""
    return not isinstance(value, torch.Tensor)


def _load_rows(p: nn.Parameter, rows, rank: int) -> None:
    import torch.distributed as dist

    blocks = iter(rows) if rows is not None else None
    row = math.prod(p.ds_shape[1:])
    while True:
        item = next(blocks, None) if blocks is not None else None
        head = [None if item is None else (item[0], tuple(item[1].shape))]
        dist.broadcast_object_list(head, src=0)
        if head[0] is None:
            return
        start, shape = head[0]
        _load_flat(p, start * row, item[1] if item is not None else None, shape, rank)
        item = None  # before the next block is made: one in flight


def _load_flat(
    p: nn.Parameter, offset: int, value: torch.Tensor | None, shape: tuple[int, ...], rank: int
) -> None:
    """Rank 0's ``value`` (elements ``[offset, offset + numel)`` of the flattened parameter ``p``; None elsewhere,
    ``shape`` its shape) to every rank, which keeps the part in its partition: the flattened parameter's
    ``[rank * n, (rank + 1) * n)`` elements, as DeepSpeed lays them out (collective)."""
    import torch.distributed as dist

    local = p.ds_tensor.data.view(-1)
    full = (
        value.to(local.device, local.dtype).contiguous()
        if value is not None
        else torch.empty(shape, dtype=local.dtype, device=local.device)
    )
    dist.broadcast(full, src=0)
    flat = full.view(-1)
    part = p.ds_tensor.ds_numel if hasattr(p.ds_tensor, "ds_numel") else p.ds_tensor.numel()
    lo, hi = part * rank, min(part * (rank + 1), p.ds_numel)
    a, b = max(lo, offset), min(hi, offset + flat.numel())
    if a < b:
        local[a - lo : b - lo].copy_(flat[a - offset : b - offset])
    if p.numel() == p.ds_numel:  # a persistent (small) parameter is also whole on every rank
        p.data.view(-1)[offset : offset + flat.numel()].copy_(flat)


def check_loaded(model: nn.Module, names: set[str]) -> None:
    """Every parameter of ``model`` (a tied one under its first name) was written by the weight stream."""
    missing = sorted({n for n, _ in model.named_parameters()} - names)
    if missing:
        raise ValueError(
            f"the initial weights lack {len(missing)} parameters: {missing[:8]}{'...' if len(missing) > 8 else ''}"
        )
