"""DeepSpeed ZeRO building blocks: the engine's JSON config, the checks on it, resharding ZeRO-1/2 optimizer
partitions, and gathering ZeRO-3 parameters for an export or an evaluation on one rank.

The strategies that use them (:class:`~videollama3_train.trainer.backend.DeepSpeedBackend` for ZeRO-1/2,
:class:`~videollama3_train.trainer.backend.ZeRO3Backend`) live with the other strategies in ``backend.py``; this
module knows DeepSpeed and accelerate's DeepSpeed plugin and nothing of the loop, as ``fsdp2.py`` knows FSDP2.

The JSON files are ``zero{1,2,3}.json`` in ``trainer.deepspeed_config_dir`` (None: the package's own copy,
:data:`videollama3_train.paths.DEEPSPEED_CONFIG_DIR`); every ``"auto"`` in them is resolved from the trainer's config
(our loader is not a DataLoader, so accelerate cannot infer batch sizes).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from videollama3_train.paths import DEEPSPEED_CONFIG_DIR as DEFAULT_DEEPSPEED_DIR
from videollama3_train.trainer.config import TrainConfig, resolve_precision

if TYPE_CHECKING:
    from accelerate import Accelerator

# The folder accelerate's save_state gives the DeepSpeed engine inside a checkpoint directory.
DEEPSPEED_TAG = "pytorch_model"


def zero_stage_of(backend: str) -> int:
    """The ZeRO stage of a ``trainer.backend`` name ``zero1`` / ``zero2`` / ``zero3``."""
    return int(backend[-1])


def config_path(cfg: TrainConfig) -> Path:
    """The ZeRO JSON ``cfg.backend`` reads: ``<deepspeed_config_dir>/zero<stage>.json`` (the package's copy when the
    folder is None)."""
    folder = Path(cfg.deepspeed_config_dir) if cfg.deepspeed_config_dir else DEFAULT_DEEPSPEED_DIR
    return folder / f"zero{zero_stage_of(cfg.backend)}.json"


def check_config(cfg: TrainConfig) -> None:
    """Raise ``FileNotFoundError`` naming the key when the ZeRO JSON of ``cfg.backend`` is missing (before anything is
    built); reads ``cfg``, writes nothing."""
    path = config_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(
            f"trainer.backend={cfg.backend} needs {path}, which does not exist: set trainer.deepspeed_config_dir to "
            "a folder of zero1/2/3.json"
        )


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The ZeRO json of ``cfg.backend`` with every ``"auto"`` resolved from ``cfg``."""
    stage, path = zero_stage_of(cfg.backend), config_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config for backend {cfg.backend!r} not found at {path}")
    ds = json.loads(path.read_text())
    # One packed row per micro-batch; DeepSpeed's engine steps after grad_accum of them.
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.grad_accum * world_size
    ds["gradient_clipping"] = cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0
    bf16 = resolve_precision(cfg) == "bf16"
    # check_grad_overflow: a non-finite gradient norm skips the update in bf16 too (older DeepSpeed: off by default)
    ds["bf16"] = {"enabled": bf16, "check_grad_overflow": True}
    ds["fp16"] = {"enabled": False}
    ds.setdefault("zero_optimization", {})["stage"] = stage
    if ds["zero_optimization"].get("compute_grad_norm") is False:
        # get_global_grad_norm() would be None: every step would count as non-finite while the engine updates
        raise ValueError(
            f"{path}: zero_optimization.compute_grad_norm=false; the trainer needs the gradient norm"
        )
    return ds


def set_grad_accum(accelerator: Accelerator, grad_accum: int) -> None:
    """Make the DeepSpeed config of ``accelerator`` (read when the engine is built, in ``prepare``) step after
    ``grad_accum`` micro-batches: the trainer may settle it after the accelerator was built (a global batch of G
    packed rows gives ``ceil(G / world)``, known once the data is planned)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["gradient_accumulation_steps"] = grad_accum
    ds["train_batch_size"] = (
        grad_accum * accelerator.num_processes * ds.get("train_micro_batch_size_per_gpu", 1)
    )


def zero_stage(accelerator: Accelerator) -> int | None:
    """The ZeRO stage ``accelerator`` runs, or None when it does not run DeepSpeed."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def saved_zero_world_size(path: str | os.PathLike) -> int | None:
    """Data-parallel ranks that wrote the ZeRO optimizer partitions of checkpoint ``path`` (None: none found)."""
    files = list((Path(path) / DEEPSPEED_TAG).glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    return len(files) or None


def register_external_parameters(module: nn.Module, params: list[nn.Parameter]) -> None:
    """Tell ZeRO-3 to gather ``params`` for ``module``'s forward, which reads them outside their own module's."""
    import deepspeed

    for p in params:
        deepspeed.zero.register_external_parameter(module, p)


def gathered(model: nn.Module) -> AbstractContextManager:
    """Context in which every ZeRO-3 partitioned parameter of ``model`` is whole on every rank (collective)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


@contextmanager
def hooks_off(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with the ZeRO-3 engine's forward hooks taken off every module (put back, in their order, on exit),
    so that one rank may run a gathered model alone.

    The engine hooks every module: before its forward it fetches the module's parameters and prefetches the next
    ones along the recorded trace, after it releases them (re-partitions, gathered ones included) - each an
    all-gather that every rank must enter. Rank 0 evaluating alone inside :func:`gathered` would release the
    gathered weights and all-gather for them again while the other ranks wait outside any collective: a hang
    (seen at the end of a run with a held-out set). The hooks are the engine's own closures, recognised by
    their module (``deepspeed.``); ours and transformers' stay."""
    saved = []
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            ours = [k for k, h in hooks.items() if getattr(h, "__module__", "").startswith("deepspeed.")]
            if ours:
                saved.append((hooks, dict(hooks)))
                for k in ours:
                    del hooks[k]
    try:
        yield model
    finally:
        for hooks, before in saved:
            hooks.clear()
            hooks.update(before)


def load_zero12_resharded(engine, tag_dir: str | os.PathLike) -> None:
    """Load the ZeRO-1/2 optimizer state that ``tag_dir`` (the engine's checkpoint folder, e.g.
    ``step-.../pytorch_model``) holds for N data-parallel ranks into ``engine``, which runs on another number of
    ranks (DeepSpeed refuses that itself: "Automatic adjustment of ZeRO's optimizer state partitioning with a new
    world size is not currently supported").

    ZeRO-1/2 keep, per parameter group, one flat fp32 vector (the group's parameters in order, zero-padded at the
    end to a multiple of the ranks) cut into equal partitions, one per rank, and AdamW's moments cut the same way.
    Every saved rank's partitions are concatenated and the padding dropped, then this rank's slice of the new
    layout is copied in: fp32 master weights, ``exp_avg``, ``exp_avg_sq``, the step count and the group's
    hyper-parameters (the lr the schedule had set). The module weights come from the checkpoint's module file
    (``load_state(..., load_module_only=True)`` before this). Collective-free; every rank reads every file.
    """
    import torch.distributed as dist

    pattern = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
    files = sorted(
        (f for f in Path(tag_dir).iterdir() if pattern.search(f.name)),
        key=lambda f: int(pattern.search(f.name).group(1)),
    )
    if not files:
        raise FileNotFoundError(f"no ZeRO optimizer partitions (zero_pp_rank_*) in {tag_dir}")
    saved = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    if any(sd.get("zero_stage", 2) not in (1, 2) for sd in saved) or any(
        sd.get("partition_count", [len(files)]) != saved[0].get("partition_count") for sd in saved
    ):
        raise RuntimeError(
            f"{tag_dir}: not a complete ZeRO-1/2 checkpoint (stages / partition counts differ)"
        )
    opt = engine.optimizer
    for g, part in enumerate(opt.single_partition_of_fp32_groups):
        rank = dist.get_rank(group=opt.real_dp_process_group[g])
        numel = sum(p.numel() for p in opt.bit16_groups[g])
        where = f"{tag_dir}, parameter group {g}"
        fp32 = [sd["single_partition_of_fp32_groups"][g] for sd in saved]
        part.data.copy_(_my_partition(fp32, part, numel, rank, where))
        states = [sd["base_optimizer_state"]["state"][g] for sd in saved]
        opt.optimizer.state[part] = {
            k: _my_partition([st[k] for st in states], part, numel, rank, where)
            if torch.is_tensor(v) and v.dim() > 0
            else v
            for k, v in states[0].items()
        }
        for k, v in saved[0]["base_optimizer_state"]["param_groups"][g].items():
            if k != "params":
                opt.optimizer.param_groups[g][k] = v


def _my_partition(
    partitions: list[torch.Tensor], like: torch.Tensor, numel: int, rank: int, where: str
) -> torch.Tensor:
    """This rank's partition (shaped and typed as ``like``) of the flat vector whose saved partitions, in saved-rank
    order, are ``partitions`` (``numel`` values, then zero padding)."""
    full = torch.cat([t.reshape(-1).to(like.dtype) for t in partitions])
    if full.numel() < numel:
        raise RuntimeError(f"{where}: the checkpoint holds {full.numel()} values, the model {numel}")
    out = torch.zeros(like.numel(), dtype=like.dtype)
    chunk = full[:numel][rank * like.numel() : (rank + 1) * like.numel()]
    out[: chunk.numel()] = chunk
    return out.to(like.device)


__all__ = [
    "DEEPSPEED_TAG",
    "check_config",
    "config_path",
    "deepspeed_config",
    "gathered",
    "hooks_off",
    "load_zero12_resharded",
    "register_external_parameters",
    "saved_zero_world_size",
    "set_grad_accum",
    "zero_stage",
]
