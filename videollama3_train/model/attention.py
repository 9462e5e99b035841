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
"""

from __future__ import annotations

import inspect
import logging

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


def construction_backend(attn: str) -> str:
    """The backend to construct / load a model with when ``attn`` is to be used: ``sdpa`` for ours.

    transformers (5.24) treats every implementation whose name contains "flash" as a flash-attn kernel to import at
    model construction and fails for ours ("Could not find the currently requested flash attention
    implementation"); so the model is built with ``sdpa`` and switched by :func:`use_attention` afterwards. The
    attention modules read the config's implementation at every forward, so the switch is complete.
    """
    return "sdpa" if attn in VARLEN_BACKENDS else attn


def use_attention(model: torch.nn.Module, attn: str) -> None:
    """Switch a built model (and its text / vision sub-configs) to attention backend ``attn``."""
    if attn in VARLEN_BACKENDS:
        register_varlen()
    configs = [model.config] + [
        getattr(model.config, k) for k in ("text_config", "vision_config") if hasattr(model.config, k)
    ]
    for c in configs:
        c._attn_implementation_internal = attn


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
