"""How gradients are synchronised, clipped and applied: one strategy object per backend, so the loop has no
backend ``if``.

Every backend runs through accelerate (``build_accelerator``): plain data parallel (DDP: gloo on CPU, NCCL on CUDA)
or DeepSpeed ZeRO-1/2/3 (accelerate's DeepSpeed plugin; on CPU DeepSpeed's CPU accelerator over gloo). Where they
differ, and what each strategy does about it:

================  ===========================================  ===========================================
                  :class:`DDPBackend`                          :class:`DeepSpeedBackend` (ZeRO-1/2/3)
================  ===========================================  ===========================================
micro-batches     ``no_sync`` on all but the last: one         the engine counts micro-batches and reduces
                  all-reduce per optimizer step                on the last (``sync_gradients=final``)
averaging         mean over ranks                              mean over ranks and over ``grad_accum``
``grad_scale``    ``world``                                    ``world * grad_accum``
clip              ``clip_grad_norm_``; returns the pre-clip    the engine clips inside the last backward;
                  norm                                         its global (pre-clip) norm is returned
update            ``optimizer.step()`` when finite, by us      the engine steps inside the last backward
                                                               and skips a non-finite update itself
export            parameters are whole                         ZeRO-3: gathered (:func:`whole_model`)
================  ===========================================  ===========================================

``grad_scale`` is the factor the loop multiplies the loss by so that the backend's own averaging cancels and the
gradients are exactly ``d(sum of token losses) / (label tokens of the global batch)`` (docs/reference.md §4: the official
code divides twice under DeepSpeed). The lr scheduler is not the backend's: the loop steps it once per applied
update (accelerate's scheduler wrapper would step it once per process).

The strategy is chosen by ``cfg.backend``; an accelerator passed in must be one that strategy can drive
(``drives``). Adding a backend (FSDP2, say) is one more :class:`Backend` subclass: its ``build_accelerator`` and
``drives``, ``prepare`` (wrap the loss module: it is the root whose ``forward`` the loop calls), ``sync`` /
``backward`` / ``clip`` / ``step`` where they differ, ``save_state`` / ``load_state`` when its checkpoint format is
its own (sharded DCP), ``whole_model`` for the export; and its name in ``_STRATEGIES`` and ``config.BACKENDS``.
:class:`FSDP2Backend` is such a strategy: ``fully_shard`` units, gradient sync only on the last micro-batch,
mean over ranks (``grad_scale`` = world), ``clip_grad_norm_`` over DTensor gradients (a global norm), DCP checkpoints
that reshard, and a whole copy on rank 0 for the export.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from videollama3_train.model import api
from videollama3_train.paths import DEEPSPEED_CONFIG_DIR as DEFAULT_DEEPSPEED_DIR
from videollama3_train.trainer.config import TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

    from videollama3_train.trainer.step import LossModule


def resolve_precision(cfg: TrainConfig) -> str:
    """``"bf16"`` or ``"fp32"``; ``auto`` means bf16 exactly when CUDA is available."""
    if cfg.precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return cfg.precision


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The ZeRO json of ``cfg.backend`` with every ``"auto"`` resolved from ``cfg`` (our loader is not a DataLoader,
    so accelerate cannot infer batch sizes)."""
    stage = int(cfg.backend[-1])
    folder = Path(cfg.deepspeed_config_dir) if cfg.deepspeed_config_dir else DEFAULT_DEEPSPEED_DIR
    path = folder / f"zero{stage}.json"
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


def set_deepspeed_grad_accum(accelerator: Accelerator, grad_accum: int) -> None:
    """Make the DeepSpeed config of ``accelerator`` (read when the engine is built, in ``prepare``) step after
    ``grad_accum`` micro-batches: the trainer may settle it after the accelerator was built (a global batch of G
    packed rows gives ``ceil(G / world)``, known once the data is planned)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["gradient_accumulation_steps"] = grad_accum
    ds["train_batch_size"] = (
        grad_accum * accelerator.num_processes * ds.get("train_micro_batch_size_per_gpu", 1)
    )


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """An ``Accelerator`` for ``cfg.backend`` and ``cfg.precision``; its process group fails a collective after
    ``cfg.collective_timeout_s`` and every rank's heartbeat runs (:mod:`~videollama3_train.trainer.liveness`)."""
    from videollama3_train.trainer import liveness

    accelerator = _STRATEGIES[cfg.backend].build_accelerator(cfg)
    liveness.start()
    return accelerator


def process_group_kwargs(cfg: TrainConfig, **kwargs: Any):
    """accelerate's ``InitProcessGroupKwargs`` with ``timeout=cfg.collective_timeout_s`` (and ``kwargs``)."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    handler = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_s), **kwargs)
    # accelerate passes on only the values that differ from its defaults (600 s): a timeout of exactly 600 s would be
    # dropped and gloo's own 1800 s used; pass it always (the handler's class must stay accelerate's own)
    given = handler.to_kwargs()
    handler.to_kwargs = lambda: {**given, "timeout": handler.timeout}
    return handler


def build_backend(cfg: TrainConfig, accelerator: Accelerator | None = None) -> Backend:
    """The strategy of ``cfg.backend``, driving ``accelerator`` (built from ``cfg`` when None)."""
    strategy = _STRATEGIES[cfg.backend]
    if accelerator is None:
        accelerator = strategy.build_accelerator(cfg)
    elif not strategy.drives(accelerator):
        stage = _zero_stage(accelerator)
        raise ValueError(
            f"trainer.backend={cfg.backend!r} but the accelerator given to fit runs "
            f"{'no DeepSpeed' if stage is None else f'DeepSpeed ZeRO-{stage}'}: build it with build_accelerator(cfg)"
        )
    if strategy is FSDP2Backend:
        return strategy(accelerator, max_grad_norm=cfg.max_grad_norm, cfg=cfg)
    if issubclass(strategy, DeepSpeedBackend):
        set_deepspeed_grad_accum(accelerator, cfg.grad_accum)
    return strategy(accelerator, max_grad_norm=cfg.max_grad_norm)


def whole_model(model: nn.Module, accelerator: Accelerator | None) -> AbstractContextManager[nn.Module]:
    """Context yielding a model whose parameters are whole, for an export, an evaluation or a full ``state_dict``
    (collective: every rank enters). Under ZeRO-3 each rank holds a shard of each parameter: they are gathered in
    place. Under FSDP2 rank 0 gets a whole copy (see :func:`_fsdp2_whole`; the other ranks get ``model`` back and
    must not run it). Every other backend: ``model`` itself.

        with whole_model(model, accelerator) as m:
            if accelerator.is_main_process:
                export_hf(m, processor, out)
    """
    if _is_fsdp2(model):
        return _fsdp2_whole(model)
    if accelerator is None or _zero_stage(accelerator) != 3:
        return nullcontext(model)
    return _zero3_whole(model)


# ----------------------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------------------


class Backend:
    """What the loop asks of a backend, with the semantics of plain data parallel (no gradient partitioning)."""

    name = "base"
    # whether load_state reads a checkpoint written at another world size (checkpoint.load_checkpoint refuses it
    # at start otherwise)
    reshards = False

    def __init__(self, accelerator: Accelerator, *, max_grad_norm: float):
        self.accelerator = accelerator
        self.max_grad_norm = max_grad_norm  # <= 0: no clipping (the norm is still measured and logged)

    @classmethod
    def build_accelerator(cls, cfg: TrainConfig) -> Accelerator:
        raise NotImplementedError

    @classmethod
    def drives(cls, accelerator: Accelerator) -> bool:
        """Whether this strategy can drive ``accelerator`` (one built by another backend's recipe cannot)."""
        return _zero_stage(accelerator) is None

    def prepare(self, module: LossModule, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """Wrap the loss module and the optimizer for this backend; returns the wrapped pair."""
        return self.accelerator.prepare(module, optimizer)

    @property
    def grad_scale(self) -> float:
        """Factor on the loss that cancels the backend's averaging of gradients (valid after :meth:`prepare`)."""
        return float(self.accelerator.num_processes)

    def sync(self, module: nn.Module, final: bool) -> AbstractContextManager:
        """Context of one micro-batch's forward + backward; gradients are reduced over ranks only when ``final``."""
        return nullcontext() if final else self.accelerator.no_sync(module)

    def backward(self, loss: Tensor, final: bool) -> None:
        self.accelerator.backward(loss)  # the sync context decides whether this one reduces

    def clip(self, module: nn.Module) -> Tensor:
        """Clip the summed gradients to ``max_grad_norm``; returns the global norm before clipping (0-d tensor)."""
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        return self.accelerator.clip_grad_norm_(module.parameters(), max_norm)

    def step(self, optimizer: Any, apply: bool) -> None:
        """Apply the update when ``apply`` (the loss and the norm are finite), then drop the gradients."""
        if apply:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def save_state(self, path: Path) -> None:
        """Write model, optimizer and every rank's RNG states into the checkpoint directory ``path`` (collective)."""
        self.accelerator.save_state(str(path), safe_serialization=True)

    def load_state(self, path: Path) -> None:
        """Restore what :meth:`save_state` wrote (collective)."""
        self.accelerator.load_state(str(path))

    def whole_model(self, model: nn.Module) -> AbstractContextManager[nn.Module]:
        """Context yielding ``model`` with every parameter whole (see :func:`whole_model`)."""
        return nullcontext(model)


class DDPBackend(Backend):
    """Plain data parallel (one process without a launcher is the world-of-one case)."""

    name = "ddp"
    reshards = True  # model and optimizer states are whole in the checkpoint

    @classmethod
    def build_accelerator(cls, cfg: TrainConfig) -> Accelerator:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        mixed = "bf16" if resolve_precision(cfg) == "bf16" else "no"
        # Every parameter gets a gradient every step (dummy tower pass), so the unused-parameter search is off.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
        # Without cpu=True accelerate ignores a torchrun launch on a CUDA-less host (each rank would train alone).
        return Accelerator(
            mixed_precision=mixed,
            kwargs_handlers=[ddp, process_group_kwargs(cfg)],
            cpu=not torch.cuda.is_available(),
        )


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO-1 / ZeRO-2 through accelerate: the engine owns accumulation, clipping and the update."""

    name = "zero"
    reshards = True  # ZeRO-1/2 optimizer partitions: checkpoint.load_zero12_resharded

    @classmethod
    def build_accelerator(cls, cfg: TrainConfig) -> Accelerator:
        from accelerate import Accelerator, DeepSpeedPlugin

        mixed = "bf16" if resolve_precision(cfg) == "bf16" else "no"
        # The launcher's WORLD_SIZE: accelerate's state must not be created before the Accelerator (a singleton).
        world = int(os.environ.get("WORLD_SIZE", "1"))
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, world))
        # DeepSpeed runs on CPU with its CPU accelerator over gloo, but accelerate, finding no device backend,
        # would record a world of one process; naming gloo makes it read the real world size and rank.
        pg = (
            process_group_kwargs(cfg)
            if torch.cuda.is_available()
            else process_group_kwargs(cfg, backend="gloo")
        )
        return Accelerator(mixed_precision=mixed, deepspeed_plugin=plugin, kwargs_handlers=[pg])

    @classmethod
    def drives(cls, accelerator: Accelerator) -> bool:
        return _zero_stage(accelerator) in (1, 2)

    @property
    def _engine(self):
        return self.accelerator.deepspeed_engine_wrapped.engine

    @property
    def grad_scale(self) -> float:
        return float(self.accelerator.num_processes * self._engine.gradient_accumulation_steps())

    def sync(self, module: nn.Module, final: bool) -> AbstractContextManager:
        return nullcontext()  # the engine knows which micro-batch is the last from backward(sync_gradients=)

    def backward(self, loss: Tensor, final: bool) -> None:
        # The engine steps (clip + AdamW) inside the last micro-batch's backward and skips the update only when the
        # gradient norm is not finite. A non-finite loss could leave its gradients finite: times NaN, this rank's
        # gradients become NaN, the reduced norm on every rank too, so every engine skips the step the loop skips.
        finite = torch.isfinite(loss.detach())
        loss = loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype)
        self.accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=final)

    def clip(self, module: nn.Module) -> Tensor:
        # clipped by the engine inside the last backward already; its norm is the pre-clip one (inf when skipped)
        norm = self._engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError(
                "DeepSpeed returned no gradient norm (zero_optimization.compute_grad_norm=false?)"
            )
        return torch.as_tensor(norm, dtype=torch.float32).to(self.accelerator.device).reshape(())

    def load_state(self, path: Path) -> None:
        saved = _zero_world_size(path)
        if saved in (None, self.accelerator.num_processes):
            return super().load_state(path)
        # another world size: DeepSpeed refuses it; module weights and RNG through accelerate, the optimizer's
        # partitions resharded from every saved rank's file
        from videollama3_train.trainer.checkpoint import load_zero12_resharded

        self.accelerator.load_state(str(path), load_module_only=True)
        load_zero12_resharded(self._engine, Path(path) / DEEPSPEED_TAG)
        return None

    def step(self, optimizer: Any, apply: bool) -> None:
        # Already stepped in backward; on non-finite gradients the ZeRO optimizer skipped its update itself.
        return None


class ZeRO3Backend(DeepSpeedBackend):
    """ZeRO-3: parameters are partitioned too; every forward gathers them, module by module."""

    name = "zero3"
    # parameters are partitioned too: a checkpoint moves to another world size only through DeepSpeed's universal
    # checkpoint conversion (not wired in); checkpoint.load_checkpoint says so at start
    reshards = False
    why_no_reshard = (
        "ZeRO-3 keeps parameters and optimizer states partitioned per rank and resharding them is not supported "
        "here; the checkpoint's zero_to_fp32.py recovers the weights alone, for a new run from them"
    )

    @classmethod
    def drives(cls, accelerator: Accelerator) -> bool:
        return _zero_stage(accelerator) == 3

    def prepare(self, module: LossModule, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        import deepspeed

        # The output layer's weight is read outside that layer's forward (the chunked loss multiplies by it):
        # ZeRO-3 must be told to gather it for the loss module's forward.
        for p in module.external_parameters():
            deepspeed.zero.register_external_parameter(module, p)
        if not all(p.requires_grad for p in module.parameters()):  # a frozen group: see api.uniform_backward
            api.uniform_backward(module.model)
        return super().prepare(module, optimizer)

    def whole_model(self, model: nn.Module) -> AbstractContextManager[nn.Module]:
        return _zero3_whole(model)


class FSDP2Backend(Backend):
    """PyTorch FSDP2 (``fully_shard``): parameters, gradients and optimizer states sharded per parameter; see
    :mod:`videollama3_train.trainer.fsdp2` for the units, the precision policy and why accelerate only provides the
    process group and device here.

    Gradients are reduce-scattered as a mean over ranks (``grad_scale`` = world, as DDP); on all but the last
    micro-batch of a step gradient sync is off (``set_requires_gradient_sync``), so accumulation costs no
    communication. Clipping is ``clip_grad_norm_`` over the sharded gradients (DTensor norms are global).
    Checkpoints: the sharded model and optimizer through DCP (resharded on load), RNG states per rank.
    """

    name = "fsdp2"
    reshards = True  # DCP reshards the model and optimizer states to the world size at hand

    def __init__(self, accelerator: Accelerator, *, max_grad_norm: float, cfg: TrainConfig | None = None):
        super().__init__(accelerator, max_grad_norm=max_grad_norm)
        self.cfg = cfg or TrainConfig(backend="fsdp2")
        self.module: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def build_accelerator(cls, cfg: TrainConfig) -> Accelerator:
        from accelerate import Accelerator

        # bf16 comes from FSDP2's MixedPrecisionPolicy (parameters gathered in bf16, fp32 reduction and master
        # weights), not from accelerate's autocast. cpu=True on a CUDA-less host for the same reason as DDP.
        return Accelerator(
            mixed_precision="no",
            kwargs_handlers=[process_group_kwargs(cfg)],
            cpu=not torch.cuda.is_available(),
        )

    def prepare(self, module: LossModule, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        from videollama3_train.trainer import fsdp2

        if any(".lora_" in n for n, _ in module.named_parameters()):
            raise ValueError(
                "LoRA adapters with trainer.backend=fsdp2 are not supported (the adapters would be sharded with "
                "their base layers and the merge on export needs them whole): use trainer.backend=ddp or zero2"
            )
        if not all(p.requires_grad for p in module.parameters()):  # a frozen group: see api.uniform_backward
            api.uniform_backward(module.model)
        names = {id(p): n for n, p in module.named_parameters()}
        mesh = fsdp2.build_mesh(self.cfg.fsdp_shard_size, self.accelerator.device.type)
        deferred = hasattr(module.model, "initial_weights")  # built on meta: sharded first, then loaded
        if not deferred:
            module.to(self.accelerator.device)
        fsdp2.apply_fsdp2(
            module,
            module.model,
            mesh=mesh,
            bf16=resolve_precision(self.cfg) == "bf16",
            reshard_after_forward=self.cfg.fsdp_reshard_after_forward,
            offload=self.cfg.fsdp_offload,
        )
        if deferred:
            # sharded parameters live where the offload policy keeps them
            where = torch.device("cpu") if self.cfg.fsdp_offload else self.accelerator.device
            fsdp2.load_initial_weights(module.model, module, where)
        # fully_shard replaced every parameter by a sharded one: point the optimizer (built on the whole ones, no
        # step taken yet) at them, keeping its groups and their learning rates.
        sharded = dict(module.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        self.module, self.optimizer = module, optimizer
        return module, optimizer

    def sync(self, module: nn.Module, final: bool) -> AbstractContextManager:
        module.set_requires_gradient_sync(final)
        return nullcontext()

    def backward(self, loss: Tensor, final: bool) -> None:
        loss.backward()

    def clip(self, module: nn.Module) -> Tensor:
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        params = [p for p in module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def save_state(self, path: Path) -> None:
        from videollama3_train.trainer import fsdp2

        self.accelerator.save_state(str(path))  # nothing is registered with accelerate: RNG states only
        fsdp2.save_dcp(self.module, self.optimizer, path)

    def load_state(self, path: Path) -> None:
        from videollama3_train.trainer import fsdp2

        fsdp2.load_dcp(self.module, self.optimizer, path)
        # RNG states only (nothing is registered with accelerate); a rank the saving run did not have keeps its
        # seeded state (accelerate logs that it found none)
        self.accelerator.load_state(str(path))

    def whole_model(self, model: nn.Module) -> AbstractContextManager[nn.Module]:
        return _fsdp2_whole(model)


_STRATEGIES: dict[str, type[Backend]] = {
    "ddp": DDPBackend,
    "zero1": DeepSpeedBackend,
    "zero2": DeepSpeedBackend,
    "zero3": ZeRO3Backend,
    "fsdp2": FSDP2Backend,
}


# The folder accelerate's save_state gives the DeepSpeed engine inside a checkpoint directory.
DEEPSPEED_TAG = "pytorch_model"


def _zero_world_size(path: Path) -> int | None:
    """Data-parallel ranks that wrote the ZeRO optimizer partitions of checkpoint ``path`` (None: none found)."""
    files = list((Path(path) / DEEPSPEED_TAG).glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    return len(files) or None


def _zero_stage(accelerator: Accelerator) -> int | None:
    """The ZeRO stage ``accelerator`` runs, or None when it does not run DeepSpeed."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def _is_fsdp2(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextmanager
def _fsdp2_whole(model: nn.Module) -> Iterator[nn.Module]:
    """A whole copy of an FSDP2-sharded ``model`` on rank 0 (collective on entry: every rank enters).

    Unsharding in place does not serve an export: ``state_dict()`` (which ``save_pretrained`` calls) reshards a
    unit's parameters by design, and a unit whose forward runs on rank 0 alone would all-gather and wait for ranks
    that are not there. So the full state dict is gathered to rank 0's CPU memory (the other ranks hold nothing)
    and loaded into a plain model of the same config; rank 0 exports and evaluates that copy.
    """
    from accelerate import PartialState

    from videollama3_train.trainer import fsdp2

    full = fsdp2.full_state_dict(model)
    if not PartialState().is_main_process:
        yield model
        return
    config = copy.deepcopy(model.config)
    for c in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if (
            c is not None
        ):  # our attention backends are switched on after construction (model/attention.py); rank
            c._attn_implementation_internal = (
                "sdpa"  # 0's export and evaluation of the copy run unsplit on sdpa
            )
    with torch.device("meta"):
        whole = type(model)(config)
    whole.load_state_dict(full, assign=True, strict=False)
    for (
        name,
        buf,
    ) in model.named_buffers():  # FSDP2 leaves buffers whole; non-persistent ones are not in ``full``
        owner, _, leaf = name.rpartition(".")
        whole.get_submodule(owner)._buffers[leaf] = buf.detach().to("cpu", copy=True)
    missing = {k for k, _ in whole.named_parameters()} - set(full)
    if hasattr(whole, "tie_weights"):
        whole.tie_weights()
        missing -= {k for k, p in whole.named_parameters() if p.device.type != "meta"}
    if missing:
        raise RuntimeError(f"FSDP2 full state dict lacks {sorted(missing)[:5]}")
    whole.generation_config = model.generation_config
    whole.train(model.training)
    yield whole


@contextmanager
def _zero3_whole(model: nn.Module) -> Iterator[nn.Module]:
    with _gather_all(model):
        yield model


def _gather_all(model: nn.Module) -> AbstractContextManager:
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


__all__ = [
    "Backend",
    "DDPBackend",
    "DeepSpeedBackend",
    "FSDP2Backend",
    "ZeRO3Backend",
    "build_accelerator",
    "build_backend",
    "deepspeed_config",
    "whole_model",
    "resolve_precision",
]
