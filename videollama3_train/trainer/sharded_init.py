"""Model construction for the sharded backends: no rank holds the whole model in host memory.

``build_model(defer_weights=True)`` returns the model with its parameters on the meta device and its weights as a
stream (``model.initial_weights``, model/weights.py). Then, per backend:

* FSDP2: ``fully_shard`` on the meta model, ``to_empty``, and rank 0 streams the weights into the shards through
  ``set_model_state_dict(broadcast_from_rank0=True)`` (:func:`videollama3_train.trainer.fsdp2.load_initial_weights`,
  called from ``FSDP2Backend.prepare``).
* ZeRO-3 (:func:`place`, right after the build): each leaf module gets memory for its parameters and is partitioned
  at once by ``deepspeed.zero.Init(module=...)`` (one module whole at a time), then rank 0 broadcasts each
  parameter from the stream and every rank copies its own partition out of it.

Other backends, and one process, build the model whole (materialised tensor by tensor, no second copy).
"""

from __future__ import annotations

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


@torch.no_grad()
def _zero3_place(model: nn.Module, accelerator: Accelerator) -> None:
    import deepspeed
    import torch.distributed as dist

    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    for module in list(model.modules()):
        own = [n for n, p in module._parameters.items() if p is not None and p.device.type == "meta"]
        if not own:
            continue
        for n in own:  # one module's parameters whole, partitioned right away
            p = module._parameters[n]
            module._parameters[n] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
        deepspeed.zero.Init(module=module, config_dict_or_path=ds_config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # each module got its own parameter above: the tied output layer shares again
    params = dict(model.named_parameters())
    rank, source = dist.get_rank(), iter(model.initial_weights) if dist.get_rank() == 0 else None
    seen: set[str] = set()
    while True:
        item = next(source, None) if source is not None else None
        name = [None if item is None else item[0]]
        dist.broadcast_object_list(name, src=0)
        if name[0] is None:
            break
        if name[0] not in params:
            raise ValueError(f"initial weights: {name[0]}: no such parameter")
        p = params[name[0]]
        # rank 0's tensor to every rank (one parameter whole in flight), each rank keeps its partition: the
        # flattened parameter's [rank * n, (rank + 1) * n) elements, as DeepSpeed lays them out
        full = (
            item[1].contiguous()
            if item is not None
            else torch.empty(tuple(p.ds_shape), dtype=p.ds_tensor.dtype)
        )
        dist.broadcast(full, src=0)
        part = p.ds_tensor.ds_numel if hasattr(p.ds_tensor, "ds_numel") else p.ds_tensor.numel()
        start = part * rank
        n = max(0, min(part, p.ds_numel - start))
        if n:
            p.ds_tensor.data.view(-1)[:n].copy_(full.view(-1)[start : start + n])
        if p.numel() == p.ds_numel:  # a persistent (small) parameter is also whole on every rank
            p.data.copy_(full.view(p.data.shape))
        seen.add(name[0])
    if dist.get_rank() == 0:
        check_loaded(model, seen)
    del model.initial_weights


def check_loaded(model: nn.Module, names: set[str]) -> None:
    """Every parameter of ``model`` (a tied one under its first name) was written by the weight stream."""
    missing = sorted({n for n, _ in model.named_parameters()} - names)
    if missing:
        raise ValueError(
            f"the initial weights lack {len(missing)} parameters: {missing[:8]}{'...' if len(missing) > 8 else ''}"
        )
