"""Attention backends for packed rows.

``sdpa`` (the CPU default) keeps packed samples apart through per-sample ``position_ids`` with
``attention_mask=None`` (transformers detects the packed layout), and the vision tower loops over its segments.

``flash_varlen`` runs one variable-length attention call per layer for the whole packed row, in the LLM and in the
vision tower, on ``torch.nn.attention.varlen.varlen_attn``. The name contains "flash" on purpose: transformers'
VideoLLaMA3 vision attention hands ``cu_seqlens`` to the backend only for flash-type implementations, and the mask
builder then skips the dense (L, L) mask. It runs on CUDA only; :func:`select_attention` says so on CPU.

``flash_varlen_reference`` is the same plumbing (registration with transformers' attention and mask interfaces,
segments from ``cu_seq_lens_q`` or from packed ``position_ids``, the (1, H, L, D) -> (L, H, D) layout, GQA, causal
vs bidirectional) with :func:`reference_varlen_kernel` in place of the CUDA call: plain PyTorch, one
``scaled_dot_product_attention`` per segment. It runs anywhere, so the CPU tests exercise exactly the code path the
GPU runs, and only the kernel itself is left to the device check.

``flash_ulysses`` is Ulysses sequence parallelism's attention for the LLM (the trainer's
``trainer/sequence_parallel.py`` splits the row; this module does what happens inside the model): within
:func:`ulysses_slice` the LLM sees one rank's contiguous slice of the row, and in every layer q/k/v of the slice are
exchanged all-to-all so that each rank holds ``H / N`` heads for the whole row, the varlen kernel above runs per
packed sample (segments from the full row's positions), and a second all-to-all brings the output back to the slice
with all heads.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

VARLEN = "flash_varlen"
_HALF = (torch.float16, torch.bfloat16)
VARLEN_REFERENCE = "flash_varlen_reference"
_registered = False


def _varlen_kernel():
    """``varlen_attn`` adapted to one calling convention (its signature changed between torch 2.10 and 2.12)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters

    def call(q, k, v, cu, max_len, *, causal: bool, scale: float | None):
        in_dtype = q.dtype
        if in_dtype not in _HALF:  # the CUDA kernel takes fp16 / bf16 only (an fp32 run without autocast)
            q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        kwargs = {"scale": scale}
        if "window_size" in params:  # torch >= 2.11: causal is a (-1, 0) window
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        else:  # torch 2.10
            kwargs["is_causal"] = causal
        if "enable_gqa" in params and q.shape[1] != k.shape[1]:
            kwargs["enable_gqa"] = True
        elif q.shape[1] != k.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs).to(in_dtype)

    return call


def _kernel_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.dtype:
    """One dtype for q, k, v: the autocast dtype when autocast is on, else their common dtype, else the half one.

    Why: with bf16 autocast and fp32 master weights the LLM hands q and k over in fp32 (RoPE upcasts them) and v in
    bf16; the CUDA varlen kernel needs one half dtype for all three (the CPU reference hides this: CPU autocast
    casts inside sdpa). Found by recording the kernel's input dtypes in the device check's dry run.
    """
    dt = query.device.type
    if torch.is_autocast_enabled(dt):
        return torch.get_autocast_dtype(dt)
    if len({query.dtype, key.dtype, value.dtype}) == 1:
        return query.dtype
    return next((t.dtype for t in (value, query, key) if t.dtype in _HALF), query.dtype)


def reference_varlen_kernel(q, k, v, cu, max_len, *, causal: bool, scale: float | None):  # noqa: ARG001
    """The varlen call in plain PyTorch: ``q`` ``(L, Hq, D)``, ``k``/``v`` ``(L, Hkv, D)``, int32 ``cu`` ``(n + 1,)``.

    Returns ``(L, Hq, D)``. Each segment ``cu[i]:cu[i+1]`` attends only to itself; ``Hq`` may be a multiple of
    ``Hkv`` (grouped-query attention). Same signature and layout as the CUDA kernel of :func:`_varlen_kernel`.
    """
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b <= a:
            continue
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, s, D)
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=causal, scale=scale
        ).transpose(0, 1)
    return out


def _reference_attention_forward(*args, **kwargs):
    return varlen_attention_forward(*args, kernel=reference_varlen_kernel, **kwargs)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``(1, L)`` positions restarting at 0 per sample -> int32 ``(n + 1,)`` cumulative lengths."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    total = torch.tensor([pos.numel()], device=pos.device, dtype=starts.dtype)
    return torch.cat([starts, total]).to(torch.int32)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    kernel=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function.

    ``query``: ``(1, Hq, L, D)``; ``key``/``value``: ``(1, Hkv, L, D)``; returns ``(1, L, Hq, D)`` like the other
    backends. Segments come from ``cu_seq_lens_q`` (vision tower) or from ``position_ids`` (packed LLM row).
    """
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN} expects one packed row (batch 1), got batch {query.shape[0]}")
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError(f"{VARLEN} works on packed rows without padding; pass attention_mask=None")
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            cu = torch.tensor([0, query.shape[2]], device=query.device, dtype=torch.int32)
        else:
            cu = cu_seqlens_from_position_ids(position_ids)
    cu = cu.to(device=query.device, dtype=torch.int32)
    max_len = kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max())
    dtype = _kernel_dtype(query, key, value)
    q, k, v = (t[0].transpose(0, 1).to(dtype).contiguous() for t in (query, key, value))  # (L, H, D)
    causal = bool(getattr(module, "is_causal", True))
    call = kernel or _varlen_kernel()
    out = call(q, k, v, cu, max_len, causal=causal, scale=scaling)
    return out.unsqueeze(0), None


def register_varlen() -> None:
    """Register ``flash_varlen`` with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)
    AttentionInterface.register(VARLEN_REFERENCE, _reference_attention_forward)
    AttentionMaskInterface.register(VARLEN_REFERENCE, flash_attention_mask)
    _registered = True


VARLEN_BACKENDS = (VARLEN, VARLEN_REFERENCE)

# ----------------------------------------------------------------------------------------------------------------
# Ulysses: the LLM's attention over a row split across a group of ranks
# ----------------------------------------------------------------------------------------------------------------

ULYSSES = "flash_ulysses"  # "flash" in the name: transformers then builds no dense mask (see register_varlen)
_ulysses = threading.local()  # the full row's segment table and the group, set around one forward


@contextmanager
def ulysses_slice(
    language_model: torch.nn.Module, position_ids: torch.Tensor, bounds: tuple[int, int], group
) -> Iterator[None]:
    """Within the context, ``language_model`` sees only the slice ``[start, stop)`` of ``inputs_embeds`` /
    ``position_ids`` (per-sample positions kept, so RoPE is right), and Ulysses attention knows the full row's
    segments (from ``position_ids (1, L)``) and the process ``group`` that shares the row."""
    a, b = bounds

    def pre_hook(module, args, kwargs):
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"][:, a:b]
        kwargs["position_ids"] = kwargs["position_ids"][:, a:b]
        return args, kwargs

    handle = language_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    # kept after the context: activation checkpointing recomputes the layers' forward inside this micro-batch's
    # backward, after the context has exited (the next micro-batch's forward sets them anew)
    _ulysses.cu = cu_seqlens_from_position_ids(position_ids)
    _ulysses.group = group
    try:
        yield
    finally:
        handle.remove()


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Autograd all-to-all of ``x (N, ...)``: chunk ``j`` goes to rank ``j``; result ``[i]`` came from rank ``i``.

    ``contiguous()`` first: a permuted view would otherwise be sent in its memory order (measured: wrong outputs)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    return wait_tensor(all_to_all_single_autograd(x.contiguous(), None, None, group))


def ulysses_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: ``query (1, Hq, L/N, D)``, ``key``/``value`` ``(1, Hkv, L/N, D)``
    of the local slice; returns ``(1, L/N, Hq, D)``."""
    group, cu = _ulysses.group, _ulysses.cu
    n = torch.distributed.get_world_size(group)
    hq, hkv = query.shape[1], key.shape[1]
    if hq % n:
        raise ValueError(f"sequence parallelism {n} needs the attention heads ({hq}) divisible by it")
    if hkv % n:  # fewer KV heads than ranks: give every rank the KV heads its query heads read
        key, value = (t.repeat_interleave(hq // hkv, dim=1) for t in (key, value))
        hkv = hq

    def scatter_heads(t: torch.Tensor) -> torch.Tensor:  # (1, H, Ls, D) -> (H/N, L, D)
        h, ls, d = t.shape[1:]
        chunks = t[0].reshape(n, h // n, ls, d)
        got = _all_to_all(chunks, group)  # [i] = rank i's slice of my heads
        return got.permute(1, 0, 2, 3).reshape(h // n, n * ls, d)

    dtype = _kernel_dtype(query, key, value)  # one dtype for the kernel
    q, k, v = (scatter_heads(t.to(dtype)).transpose(0, 1) for t in (query, key, value))  # (L, H/N, D)
    kernel = _varlen_kernel() if q.is_cuda else reference_varlen_kernel
    max_len = int((cu[1:] - cu[:-1]).max())
    out = kernel(q, k, v, cu.to(q.device), max_len, causal=True, scale=scaling)  # (L, Hq/N, D)
    L, hn, d = out.shape
    back = _all_to_all(out.reshape(n, L // n, hn, d), group)  # [i] = my slice, heads of rank i
    return back.permute(1, 0, 2, 3).reshape(L // n, n * hn, d).unsqueeze(0), None


def register_ulysses() -> None:
    """Register the Ulysses attention with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ULYSSES, ulysses_attention_forward)
    AttentionMaskInterface.register(ULYSSES, flash_attention_mask)


def use_llm_attention(model: torch.nn.Module, attn: str) -> str:
    """Switch the LLM alone (not the vision tower) to attention backend ``attn`` (``flash_ulysses``: registered
    first); returns the implementation it had, to switch back with the same call."""
    if attn == ULYSSES:
        register_ulysses()
    text = model.config.text_config
    previous = text._attn_implementation
    text._attn_implementation_internal = attn
    return previous


def construction_backend(attn: str) -> str:
    """The backend to construct / load a model with when ``attn`` is to be used: ``sdpa`` for ours.

    transformers (5.24) treats every implementation whose name contains "flash" as a flash-attn kernel to import at
    model construction and fails for ours ("Could not find the currently requested flash attention
    implementation"); so the model is built with ``sdpa`` and switched by :func:`use_attention` afterwards. The
    attention modules read the config's implementation at every forward, so the switch is complete.
    """
    return "sdpa" if attn in VARLEN_BACKENDS else attn


def set_attention(config, attn: str) -> None:
    """Set attention backend ``attn`` on a model config and its text / vision sub-configs (before or after the
    model is built: the attention modules read the config's implementation at every forward)."""
    if attn in VARLEN_BACKENDS:
        register_varlen()
    configs = [config] + [getattr(config, k) for k in ("text_config", "vision_config") if hasattr(config, k)]
    for c in configs:
        if c is not None:
            c._attn_implementation_internal = attn


def use_attention(model: torch.nn.Module, attn: str) -> None:
    """Switch a built model (and its text / vision sub-configs) to attention backend ``attn``."""
    set_attention(model.config, attn)


def varlen_available() -> tuple[bool, str]:
    """Whether ``flash_varlen`` can run here, and why not."""
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        return False, f"torch {torch.__version__} has no torch.nn.attention.varlen (needs >= 2.10)"
    if not torch.cuda.is_available():
        return False, "varlen attention runs on CUDA only and no CUDA device is visible"
    return True, ""


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def select_attention(requested: str = "auto") -> str:
    """Resolve ``requested`` to an implementation that runs here, or raise a clear error.

    ``auto``: ``flash_attention_2`` if the package and CUDA are there, else ``flash_varlen`` on CUDA, else ``sdpa``.
    """
    if requested == "auto":
        if flash_attn_available():
            return "flash_attention_2"
        ok, _ = varlen_available()
        if ok:
            register_varlen()
            return VARLEN
        return "sdpa"
    if requested in ("varlen", VARLEN):
        ok, why = varlen_available()
        if not ok:
            raise RuntimeError(
                f"attention backend '{VARLEN}' cannot run here: {why}. Use model.attn_implementation=sdpa"
            )
        register_varlen()
        return VARLEN
    if requested in ("varlen_reference", VARLEN_REFERENCE):
        # the varlen plumbing with a plain-PyTorch kernel: runs anywhere, slow; for tests and debugging
        register_varlen()
        return VARLEN_REFERENCE
    if requested == "flash_attention_2" and not flash_attn_available():
        raise RuntimeError(
            "attention backend 'flash_attention_2' needs the flash-attn package and a CUDA device "
            "(pip install 'videollama3-train[gpu]'); use model.attn_implementation=sdpa or varlen"
        )
    if requested not in ("sdpa", "eager", "flash_attention_2"):
        raise ValueError(
            f"unknown attention backend {requested!r}: choose auto, sdpa, eager, varlen, varlen_reference or "
            "flash_attention_2"
        )
    return requested
