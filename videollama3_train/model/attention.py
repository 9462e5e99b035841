"""Attention backends for packed rows.

``sdpa`` (the CPU default) keeps packed samples apart through per-sample ``position_ids`` with
``attention_mask=None`` (transformers detects the packed layout), and the vision tower loops over its segments.

``flash_varlen`` runs one variable-length attention call per layer for the whole packed row, in the LLM and in the
vision tower, on ``torch.nn.attention.varlen.varlen_attn``. The name contains "flash" on purpose: transformers'
VideoLLaMA3 vision attention hands ``cu_seqlens`` to the backend only for flash-type implementations, and the mask
builder then skips the dense (L, L) mask. It runs on CUDA only; :func:`select_attention` says so on CPU.
"""

from __future__ import annotations

import inspect
import logging

import torch

log = logging.getLogger(__name__)

VARLEN = "flash_varlen"
_registered = False


def _varlen_kernel():
    """``varlen_attn`` adapted to one calling convention (its signature changed between torch 2.10 and 2.12)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters

    def call(q, k, v, cu, max_len, *, causal: bool, scale: float | None):
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
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)

    return call


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
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (L, H, D)
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
    _registered = True


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
    if requested == "flash_attention_2" and not flash_attn_available():
        raise RuntimeError(
            "attention backend 'flash_attention_2' needs the flash-attn package and a CUDA device "
            "(pip install 'videollama3-train[gpu]'); use model.attn_implementation=sdpa or varlen"
        )
    if requested not in ("sdpa", "eager", "flash_attention_2"):
        raise ValueError(
            f"unknown attention backend {requested!r}: choose auto, sdpa, eager, varlen or flash_attention_2"
        )
    return requested
