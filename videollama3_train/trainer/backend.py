"""How gradients are synchronised, clipped and applied: one strategy object per backend, so the loop has no
backend ``if``.

Every backend runs through accelerate (``build_accelerator``): plain data parallel (DDP: gloo on CPU, NCCL on CUDA),
DeepSpeed ZeRO-1/2/3 (accelerate's DeepSpeed plugin; on CPU DeepSpeed's CPU accelerator over gloo), or FSDP2
(``fully_shard`` called by us; accelerate gives the process group and the device; below the table). Sequence
parallelism is not a backend: it works with each of them (``sequence_parallel.py``). Where DDP and DeepSpeed
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
export            parameters are whole                         ZeRO-3: gathered (``whole_model``)
================  ===========================================  ===========================================

``grad_scale`` is the factor the loop multiplies the loss by so that the backend's own averaging cancels and the
gradients are exactly ``d(sum of token losses) / (label tokens of the global batch)`` (docs/reference.md §4: the official
code divides twice under DeepSpeed). The lr scheduler is not the backend's: the loop steps it once per applied
update (accelerate's scheduler wrapper would step it once per process).

Every fact of a backend is on its strategy, declared on :class:`Backend`: how it is built from the config
(``from_config``, ``build_accelerator``, ``drives``, ``check_config``: checks that read the config and write
nothing), whether it shards parameters (``shards_parameters``: then only ``whole_model`` may run the model on one
rank: an export, every evaluation), whether it reshards a checkpoint of another
world size (``reshards``, ``why_no_reshard``), ``prepare`` (wrap the loss module: it is the root whose
``forward`` the loop calls), ``sync`` / ``backward`` / ``clip`` / ``step`` where they differ, ``save_state`` /
``load_state``, and ``whole_model`` for an export. Nothing outside ``trainer/`` names a backend.

A new backend touches three files: its building blocks in a module of its own (as ``fsdp2.py`` and ``deepspeed.py``
hold FSDP2's and DeepSpeed's), one :class:`Backend` subclass here with its name in ``_STRATEGIES``, and its name in
``config.BACKENDS``. :class:`FSDP2Backend` is such a strategy: ``fully_shard`` units, gradient sync only on the last
micro-batch, mean over ranks (``grad_scale`` = world), ``clip_grad_norm_`` over DTensor gradients (a global norm),
DCP checkpoints that reshard, and a whole copy on rank 0 for the export.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from videollama3_train.model import api
from videollama3_train.trainer import deepspeed as ds
from videollama3_train.trainer.config import TrainConfig, resolve_precision
from videollama3_train.trainer.deepspeed import deepspeed_config

if TYPE_CHECKING:
    from accelerate import Accelerator


def backend_class(name: str) -> type[Backend]:
    """The strategy of ``trainer.backend=name``."""
    if name not in _STRATEGIES:
        raise ValueError(f"trainer.backend must be one of {sorted(_STRATEGIES)}, got {name!r}")
    return _STRATEGIES[name]


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """An ``Accelerator`` for ``cfg.backend`` and ``cfg.precision``; its process group fails a collective after
    ``cfg.collective_timeout_s`` and every rank's heartbeat runs (:mod:`~videollama3_train.trainer.liveness`)."""
    from videollama3_train.trainer import liveness

    accelerator = backend_class(cfg.backend).build_accelerator(cfg)
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
    return backend_class(cfg.backend).from_config(cfg, accelerator)


def check_backend_config(cfg: TrainConfig) -> None:
    """The checks ``cfg.backend`` makes on the config before anything is built (reads ``cfg``, writes nothing)."""
    backend_class(cfg.backend).check_config(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------------------


class Backend:
    """What the loop asks of a backend, with the semantics of plain data parallel (no gradient partitioning)."""

    name = "base"
    # whether load_state reads a checkpoint written at another world size (checkpoint.load_checkpoint refuses it
    # at start otherwise, naming why_no_reshard)
    reshards = False
    why_no_reshard = ""
    # whether each rank holds only a shard of each parameter: then the model runs on one rank alone only through
    # whole_model (rank 0 alone would wait for the others' shards)
    shards_parameters = False

    def __init__(self, accelerator: Accelerator, cfg: TrainConfig):
        self.accelerator = accelerator
        self.cfg = cfg
        self.max_grad_norm = cfg.max_grad_norm  # <= 0: no clipping (the norm is still measured and logged)

    @classmethod
    def from_config(cls, cfg: TrainConfig, accelerator: Accelerator | None = None) -> Backend:
        """This strategy for ``cfg``, driving ``accelerator`` (built from ``cfg`` when None)."""
        if accelerator is None:
            accelerator = cls.build_accelerator(cfg)
        elif not cls.drives(accelerator):
            stage = ds.zero_stage(accelerator)
            raise ValueError(
                f"trainer.backend={cfg.backend!r} but the accelerator given to fit runs "
                f"{'no DeepSpeed' if stage is None else f'DeepSpeed ZeRO-{stage}'}: build it with "
                "build_accelerator(cfg)"
            )
        return cls(accelerator, cfg)

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        """Raise ``ValueError`` / ``FileNotFoundError`` naming the key when ``cfg`` cannot run this backend; called
        before anything is built. Reads ``cfg``, writes nothing."""

    @classmethod
    def build_accelerator(cls, cfg: TrainConfig) -> Accelerator:
        raise NotImplementedError

    @classmethod
    def drives(cls, accelerator: Accelerator) -> bool:
        """Whether this strategy can drive ``accelerator`` (one built by another backend's recipe cannot)."""
        return ds.zero_stage(accelerator) is None

    def set_grad_accum(self, grad_accum: int) -> None:
        """Micro-batches per rank per optimizer step, when the loader settled it after this backend was built
        (before :meth:`prepare`)."""
        self.cfg = dataclasses.replace(self.cfg, grad_accum=grad_accum)

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """Wrap the loss module (:class:`~videollama3_train.trainer.step.LossModule`) and the optimizer for this
        backend; returns the wrapped pair."""
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
        """Context yielding a model whose parameters are whole, for an export, an evaluation or a full ``state_dict``
        (collective: every rank enters). Here ``model`` itself; ZeRO-3 gathers the shards in place; FSDP2 gives rank
        0 a whole copy (the other ranks get ``model`` back and must not run it).

            with backend.whole_model(model) as m:
                if backend.accelerator.is_main_process:
                    export_hf(m, processor, out)
        """
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
    reshards = True  # ZeRO-1/2 optimizer partitions: deepspeed.load_zero12_resharded

    @classmethod
    def from_config(cls, cfg: TrainConfig, accelerator: Accelerator | None = None) -> Backend:
        backend = super().from_config(cfg, accelerator)
        backend.set_grad_accum(cfg.grad_accum)
        return backend

    def set_grad_accum(self, grad_accum: int) -> None:
        super().set_grad_accum(grad_accum)
        ds.set_grad_accum(self.accelerator, grad_accum)  # read when the engine is built, in prepare

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        ds.check_config(cfg)

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
        return ds.zero_stage(accelerator) in (1, 2)

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
        saved = ds.saved_zero_world_size(path)
        if saved in (None, self.accelerator.num_processes):
            return super().load_state(path)
        # another world size: DeepSpeed refuses it; module weights and RNG through accelerate, the optimizer's
        # partitions resharded from every saved rank's file
        self.accelerator.load_state(str(path), load_module_only=True)
        ds.load_zero12_resharded(self._engine, Path(path) / ds.DEEPSPEED_TAG)
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
    shards_parameters = True
    why_no_reshard = (
        "ZeRO-3 keeps parameters and optimizer states partitioned per rank and resharding them is not supported "
        "here; the checkpoint's zero_to_fp32.py recovers the weights alone, for a new run from them"
    )

    @classmethod
    def drives(cls, accelerator: Accelerator) -> bool:
        return ds.zero_stage(accelerator) == 3

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        # The output layer's weight is read outside that layer's forward (the chunked loss multiplies by it):
        # ZeRO-3 must be told to gather it for the loss module's forward.
        ds.register_external_parameters(module, module.external_parameters())
        if not all(p.requires_grad for p in module.parameters()):  # a frozen group: see api.uniform_backward
            api.uniform_backward(module.model)
        return super().prepare(module, optimizer)

    def whole_model(self, model: nn.Module) -> AbstractContextManager[nn.Module]:
        return _zero3_whole(model)  # gathered in place on every rank


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
    shards_parameters = True

    def __init__(self, accelerator: Accelerator, cfg: TrainConfig):
        super().__init__(accelerator, cfg)
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

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
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


# the model states (``data.cost_model.MODEL_STATES``) each backend divides among the data-parallel ranks: the
# default activation bound (``run.activation_budget``) is what a device holds beyond them; ZeRO-3 and FSDP2 gather
# one layer's weights at a time (and autocast's bf16 copies with them)
_SHARDED_STATES: dict[str, tuple[str, ...]] = {
    "ddp": (),
    "zero1": ("adam",),
    "zero2": ("adam", "grads"),
    "zero3": ("weights", "grads", "adam", "bf16"),
    "fsdp2": ("weights", "grads", "adam", "bf16"),
}


def sharded_states(name: str) -> tuple[str, ...]:
    """The model states ``trainer.backend=name`` divides among the data-parallel ranks."""
    backend_class(name)  # the one error for an unknown name
    return _SHARDED_STATES[name]


_STRATEGIES: dict[str, type[Backend]] = {
    "ddp": DDPBackend,
    "zero1": DeepSpeedBackend,
    "zero2": DeepSpeedBackend,
    "zero3": ZeRO3Backend,
    "fsdp2": FSDP2Backend,
}


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
    # our attention backends are switched on after construction (model/attention.py); rank 0's export and
    # evaluation of the copy run unsplit on sdpa
    api.set_attention(config, "sdpa")
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
    """``model`` gathered in place on every rank (collective on entry and exit), without the engine's hooks: any
    rank may then run it alone (``ds.hooks_off`` says which collectives the hooks would issue)."""
    with ds.gathered(model), ds.hooks_off(model):
        yield model


__all__ = [
    "Backend",
    "DDPBackend",
    "DeepSpeedBackend",
    "FSDP2Backend",
    "ZeRO3Backend",
    "backend_class",
    "build_accelerator",
    "build_backend",
    "check_backend_config",
    "deepspeed_config",
    "resolve_precision",
]
