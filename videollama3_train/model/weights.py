"""A model's initial weights, one tensor at a time: no process holds a second copy of the model, and a sharded
backend's ranks need not hold a first one.

The model is constructed with its parameters on the ``meta`` device (:func:`meta_model`: no memory, no random
draws; buffers such as the rotary frequencies are real). Its weights then come from a :class:`WeightSource`, which
yields ``(native name, tensor)`` pairs in a fixed order:

* :class:`CheckpointWeights` - safetensors files opened with ``safe_open`` and read tensor by tensor, under a key
  mapping (``official`` and ``assemble`` names -> native names, docs/reference.md §1); the projector of an assembled
  model comes from :class:`RandomWeights`' stream.
* :class:`RandomWeights` - today's random initialisation reproduced exactly, module by module: constructing
  ``VideoLlama3ForConditionalGeneration`` under ``torch.manual_seed(seed)`` draws, in this order, each leaf
  module's constructor init (``reset_parameters``), and at the end of each ``PreTrainedModel``'s constructor its
  ``post_init`` re-initialises the modules not yet initialised (children first); ``init_projector`` draws last.
  The same draws are made here on one module's fresh tensors at a time, so the values are bit-identical to a
  whole-model construction (tests/test_model_weights.py) while at most one module (the 2B preset's embedding,
  0.9 GiB) is in memory.

Who consumes a source: :func:`materialize` (one process, DDP, ZeRO-1/2: each tensor copied into its parameter),
FSDP2 (rank 0 reads, ``set_model_state_dict(broadcast_from_rank0=True)`` scatters the shards: trainer/fsdp2.py),
ZeRO-3 (each partitioned parameter gathered, written by rank 0, repartitioned).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside is created on the ``meta`` device; buffers stay real (the rotary
    embeddings compute theirs in their constructors, and no weight source carries non-persistent buffers)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def meta_model(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` with every parameter on ``meta`` (no memory, no random draws). transformers' own ZeRO-3
    construction (``zero.Init`` around each sub-model, when a ZeRO-3 config is registered) is off meanwhile: it
    would try to partition meta tensors; the trainer partitions the model itself (trainer/sharded_init.py)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        with params_on_meta():
            return factory()
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


class WeightSource:
    """``(native name, tensor)`` pairs for every parameter of a model (tied parameters once, under their first
    name in ``named_parameters``); tensors are CPU, in ``dtype``."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError


class RandomWeights(WeightSource):
    """Today's random initialisation of the model ``factory()`` constructs, module by module (see the module
    docstring). The draws are replayed on a meta model of its own, built when iterated: the model being filled
    may have been sharded or partitioned since."""

    def __init__(
        self, factory: Callable[[], PreTrainedModel], *, seed: int, projector_std: float, dtype: torch.dtype
    ):
        super().__init__(dtype)
        self.factory, self.seed, self.projector_std = factory, seed, projector_std

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        model = meta_model(self.factory)
        names = {id(p): n for n, p in model.named_parameters()}  # first name of each (tied) parameter
        projector = {id(p) for p in model.model.projector.parameters()}
        # the global generator, seeded as the whole construction seeded it: it ends in the same state too (LoRA
        # adapters, drawn next, get today's values)
        torch.manual_seed(self.seed)
        for module, values in _simulate(model, set()):
            for leaf, value in values.items():
                p = module._parameters[leaf]
                if names.get(id(p)) is not None and id(p) not in projector:
                    yield names.pop(id(p)), value.to(self.dtype)
        for name, module in model.model.projector.named_modules():  # init_projector, last
            if isinstance(module, nn.Linear):
                c = _fresh(module)
                nn.init.normal_(c.weight, mean=0.0, std=self.projector_std)
                nn.init.zeros_(c.bias)
                prefix = "model.projector." + (f"{name}." if name else "")
                yield prefix + "weight", c.weight.detach().to(self.dtype)
                yield prefix + "bias", c.bias.detach().to(self.dtype)


def _fresh(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` with new, uninitialised CPU parameters and no children."""
    c = copy.copy(module)
    # today's construction draws in the default dtype (fp32), whatever dtype the model is cast to afterwards
    c._parameters = {
        n: None
        if p is None
        else nn.Parameter(torch.empty(p.shape, dtype=torch.get_default_dtype()), p.requires_grad)
        for n, p in module._parameters.items()
    }
    c._modules = {}
    c._is_hf_initialized = False
    return c


def _simulate(model: PreTrainedModel, done: set[int]) -> Iterator[tuple[nn.Module, dict[str, torch.Tensor]]]:
    """The random draws of constructing ``model`` (a PreTrainedModel), in order; yields each module whose
    ``post_init`` values are final, with those values."""
    yield from _construct(model, done)
    yield from _post_init(model, model._initialize_weights, done)


def _construct(module: nn.Module, done: set[int]) -> Iterator[tuple[nn.Module, dict[str, torch.Tensor]]]:
    for child in module.children():
        if isinstance(child, PreTrainedModel):  # its own post_init runs at the end of its constructor
            yield from _simulate(child, done)
        else:
            yield from _construct(child, done)
    if module._parameters and hasattr(module, "reset_parameters") and not isinstance(module, PreTrainedModel):
        _fresh(module).reset_parameters()  # the constructor's draws (overwritten by post_init, but drawn)


def _post_init(
    module: nn.Module, init, done: set[int]
) -> Iterator[tuple[nn.Module, dict[str, torch.Tensor]]]:
    """transformers' ``initialize_weights``: children first, each sub-model with its own ``_initialize_weights``,
    a module initialised once."""
    from transformers import initialization

    for child in module.children():
        yield from _post_init(
            child, child._initialize_weights if isinstance(child, PreTrainedModel) else init, done
        )
    if id(module) in done:
        return
    done.add(id(module))
    c = _fresh(module)
    with torch.no_grad(), initialization.guard_torch_init_functions():
        init(c)
    yield module, {n: p.detach() for n, p in c._parameters.items() if p is not None}


class CheckpointWeights(WeightSource):
    """Tensors of safetensors files read one at a time (``safe_open``): ``parts`` is a list of (files, mapping), the
    mapping turning a file's key into a native name (None: skip the key); the names starting with ``fill_names``
    come from ``fill`` instead (an assembled model's random projector)."""

    def __init__(
        self,
        parts: list[tuple[list[Path], Callable[[str], str | None]]],
        *,
        dtype: torch.dtype,
        fill: WeightSource | None = None,
        fill_names: tuple[str, ...] = (),
    ):
        super().__init__(dtype)
        self.parts, self.fill, self.fill_names = parts, fill, fill_names

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for files, mapping in self.parts:
            for f in files:
                with safe_open(str(f), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                        name = mapping(key)
                        if name is not None:
                            yield name, handle.get_tensor(key).to(self.dtype)
        if self.fill is not None:
            for name, value in self.fill:
                if name.startswith(self.fill_names):
                    yield name, value


def safetensors_files(path: str | Path) -> list[Path]:
    """The ``*.safetensors`` files of a checkpoint directory (sharded or not). Only safetensors: no pickle."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
        hint = f" (found {bins[0].name}: convert it to safetensors first)" if bins else ""
        raise FileNotFoundError(f"no *.safetensors weights in {path}{hint}")
    return files


def check_coverage(model: nn.Module, names: set[str], *, source: str) -> None:
    """Every parameter of ``model`` (tied ones once) has a tensor in ``names``, and nothing else is there."""
    wanted = {n for n, _ in model.named_parameters()}
    missing, unexpected = sorted(wanted - names), sorted(names - wanted)
    if missing or unexpected:
        raise ValueError(
            f"weights from {source} do not fit the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )


@torch.no_grad()
def materialize(
    model: nn.Module, source: WeightSource, *, device: str | torch.device = "cpu", label: str
) -> None:
    """Give the meta parameters of ``model`` memory on ``device`` and fill them from ``source``, one tensor at a
    time (never a whole state dict beside the model). Tied parameters are tied again; every parameter must be
    written exactly once, else a clear error."""
    buffers = {n: b for n, b in model.named_buffers()}
    model.to_empty(device=device)
    for name, b in buffers.items():  # to_empty gives buffers fresh, uninitialised memory too
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = b.to(device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    params = dict(
        model.named_parameters(remove_duplicate=False)
    )  # a tied alias (lm_head) may be in a file too
    first = {id(p): n for n, p in model.named_parameters()}
    seen: set[str] = set()
    for name, value in source:
        p = params.get(name)
        if p is None or p.shape != value.shape:
            got = "no such parameter" if p is None else f"shape {tuple(value.shape)} for {tuple(p.shape)}"
            raise ValueError(f"weights from {label}: {name}: {got}")
        p.copy_(value)
        seen.add(first[id(p)])
    check_coverage(model, seen, source=label)
