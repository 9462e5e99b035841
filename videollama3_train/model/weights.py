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
  whole-model construction (tests/test_model_weights.py) while at most one module, or one block of rows of a
  large one (below), is in memory.

A tensor larger than :data:`ROW_BLOCK_BYTES` (the 2B preset's embedding: 151,936 x 1,536, 0.9 GiB in fp32; an
untied output layer) comes as :class:`Rows`, consecutive blocks of rows, so that no process ever holds it whole:
the random init draws it block by block (bit-identical: CPU ``normal_`` and ``uniform_`` draw one uniform per
element in order, and ``normal_`` transforms them in groups of 16 - a block's element count is a multiple of 16,
and the last group of the tensor is redrawn the same way), a checkpoint reads it with ``safe_open``'s
``get_slice``.

Who consumes a source: :func:`materialize` (one process, DDP, ZeRO-1/2: each tensor copied into its parameter),
FSDP2 (rank 0 reads, ``set_model_state_dict(broadcast_from_rank0=True)`` scatters the shards, a :class:`Rows`
tensor block by block: trainer/fsdp2.py), ZeRO-3 (rank 0 broadcasts each tensor or block, every rank keeps its
partition: trainer/sharded_init.py).
"""

from __future__ import annotations

import copy
import math
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


# Bytes above which a source yields a tensor as Rows blocks of at most this size (and at least 16 rows): one such
# block is what a rank holds of it in flight. 256 MiB: the 2B preset's embedding in 4 blocks.
ROW_BLOCK_BYTES = 256 * 2**20


class Rows:
    """A tensor of ``shape`` and ``dtype`` given as consecutive blocks along its first dimension: iterating yields
    ``(first row, block)`` in order, once. A source's consumer iterates it before asking the source for its next
    item (the random init draws the blocks then)."""

    def __init__(
        self, shape: tuple[int, ...], dtype: torch.dtype, blocks: Iterator[tuple[int, torch.Tensor]]
    ):
        self.shape, self.dtype, self._blocks = torch.Size(shape), dtype, blocks

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        return self._blocks

    def to(self, dtype: torch.dtype) -> Rows:
        return self if dtype == self.dtype else Rows(self.shape, dtype, _cast(self._blocks, dtype))

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def _cast(
    blocks: Iterator[tuple[int, torch.Tensor]], dtype: torch.dtype
) -> Iterator[tuple[int, torch.Tensor]]:
    for i, b in blocks:
        b = b.to(dtype)
        yield i, b
        del b  # before the next block is made: one in memory at a time


def block_rows(shape: tuple[int, ...], element_size: int) -> int | None:
    """Rows per :class:`Rows` block for a tensor of ``shape``, a multiple of 16; None when it goes whole."""
    row = max(1, math.prod(shape[1:])) * element_size
    if len(shape) < 2 or row * shape[0] <= ROW_BLOCK_BYTES or shape[0] <= 16:
        return None
    return max(16, ROW_BLOCK_BYTES // row // 16 * 16)


class WeightSource:
    """``(native name, tensor)`` pairs for every parameter of a model (tied parameters once, under their first
    name in ``named_parameters``); tensors are CPU, in ``dtype``, and :class:`Rows` above :data:`ROW_BLOCK_BYTES`."""

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
                elif isinstance(value, Rows):
                    drain(value)  # its draws still happen, in their place
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


def drain(value: torch.Tensor | Rows) -> None:
    """Consume a value that is not used (a :class:`Rows` of the random init must still draw its blocks)."""
    if isinstance(value, Rows):
        blocks = iter(value)
        while next(blocks, None) is not None:  # no block kept while the next one is drawn
            pass


def _row_blocked(module: nn.Module) -> int | None:
    """Rows per block when ``module``'s initialisation is replayed block by block: a module whose one parameter is
    a large ``weight`` whose rows are drawn independently (an embedding, a linear layer without bias; their
    initialisers depend on the row length only), else None."""
    if not isinstance(module, (nn.Embedding, nn.Linear)) or [
        n for n, p in module._parameters.items() if p is not None
    ] != ["weight"]:
        return None
    w = module._parameters["weight"]
    return block_rows(tuple(w.shape), torch.empty((), dtype=torch.get_default_dtype()).element_size())


def _block_of(module: nn.Module, start: int, stop: int) -> nn.Module:
    """A fresh copy of ``module`` (an embedding or a linear layer) holding rows ``[start, stop)`` of its weight."""
    c = copy.copy(module)
    shape = (stop - start, *module._parameters["weight"].shape[1:])
    weight = nn.Parameter(torch.empty(shape), module._parameters["weight"].requires_grad)
    c._parameters = {**dict.fromkeys(module._parameters), "weight": weight}  # bias stays None
    c._modules, c._is_hf_initialized = {}, False
    if isinstance(module, nn.Embedding):
        c.num_embeddings = stop - start
        pad = module.padding_idx
        c.padding_idx = pad - start if pad is not None and start <= pad < stop else None
    else:
        c.out_features = stop - start
    return c


def _blocks(
    module: nn.Module, rows: int, init: Callable[[nn.Module], None]
) -> Iterator[tuple[int, torch.Tensor]]:
    n = module._parameters["weight"].shape[0]
    for start in range(0, n, rows):
        c = _block_of(module, start, min(n, start + rows))
        init(c)
        yield start, c._parameters["weight"].detach()
        del c  # before the next block is made: one in memory at a time (the consumer drops its own reference)


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
        # the constructor's draws (overwritten by post_init, but drawn)
        rows = _row_blocked(module)
        if rows is None:
            _fresh(module).reset_parameters()
        else:
            shape = tuple(module._parameters["weight"].shape)
            drain(
                Rows(shape, torch.get_default_dtype(), _blocks(module, rows, lambda c: c.reset_parameters()))
            )


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
    rows = _row_blocked(module)
    if rows is not None:  # drawn block by block while the consumer iterates it

        def guarded(c: nn.Module) -> None:
            with torch.no_grad(), initialization.guard_torch_init_functions():
                init(c)

        w = module._parameters["weight"]
        yield (
            module,
            {"weight": Rows(tuple(w.shape), torch.get_default_dtype(), _blocks(module, rows, guarded))},
        )
        return
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
                            yield name, _read(handle, key, self.dtype)
        if self.fill is not None:
            for name, value in self.fill:
                if name.startswith(self.fill_names):
                    yield name, value
                else:
                    drain(value)


def _read(handle, key: str, dtype: torch.dtype) -> torch.Tensor | Rows:
    """One tensor of an open safetensors file in ``dtype``; a large one as :class:`Rows` read slice by slice."""
    part = handle.get_slice(key)
    shape = tuple(part.get_shape())
    probe = part[:1] if shape else handle.get_tensor(key)
    rows = block_rows(shape, probe.element_size()) if shape else None
    if rows is None:
        return handle.get_tensor(key).to(dtype)
    return Rows(shape, dtype, _cast(((i, part[i : i + rows]) for i in range(0, shape[0], rows)), dtype))


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
        if isinstance(value, Rows):
            blocks = iter(value)
            while (item := next(blocks, None)) is not None:
                p[item[0] : item[0] + item[1].shape[0]].copy_(item[1])
                item = None  # before the next block is made
        else:
            p.copy_(value)
        seen.add(first[id(p)])
    check_coverage(model, seen, source=label)
