"""Chunked cross-entropy: the LM loss without full-vocabulary fp32 logits.

transformers' causal-LM loss builds ``(L, V)`` logits and upcasts them to fp32 (about 9 GiB at 16k tokens and the
Qwen2 vocabulary, docs/reference.md §4). Here only positions that carry a label are used, and their logits exist one chunk
at a time: the forward keeps one fp32 logsumexp per token, the backward recomputes each chunk's logits. Peak extra
memory is ``chunk_size * V`` fp32 plus the ``(V, d)`` weight gradient.

With liger-kernel installed and CUDA tensors, its fused linear cross-entropy (same semantics) is used instead. It
returns the summed loss only, no per-token losses: when the caller asks for them (the per-dataset and per-modality
metrics), :func:`token_losses` computes them in a separate no-grad chunked pass.

Precision: whatever the activations' dtype, each chunk's logits are upcast to fp32 before the logsumexp, the
per-token losses and the loss sum are fp32, and the output layer's weight gradient is accumulated over chunks in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from videollama3_train.contract import IGNORE_INDEX


def shift_and_select(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Causal shift, then keep only positions whose next token is a label.

    Args:
        hidden: ``(1, L, d)`` (or ``(B, L, d)``) last hidden states.
        labels: ``(1, L)`` token ids, ``IGNORE_INDEX`` (-100) where no loss applies. In packed rows the first label of each sample
            is already ``-100``, so no position predicts across a sample boundary.

    Returns:
        ``hidden_sel (n, d)`` and ``targets (n,)``: hidden state at position ``i`` predicts ``labels[i + 1]``.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on (B, L)")
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    t = labels[:, 1:].reshape(-1).to(h.device)
    keep = t != IGNORE_INDEX
    return h[keep], t[keep]


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies of ``hidden @ weight.T (+ bias)`` against ``targets``, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        token_losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        for start in range(0, n, chunk_size):
            sl = slice(start, min(start + chunk_size, n))
            logits = _chunk_logits(hidden[sl], w, b)  # (c, V) fp32
            chunk_lse = torch.logsumexp(logits, dim=-1)
            lse[sl] = chunk_lse
            token_losses[sl] = chunk_lse - logits.gather(1, targets[sl, None]).squeeze(1)
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(token_losses)
        return token_losses.sum(), token_losses

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_token_losses: Tensor | None):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        n = hidden.shape[0]
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Weight/bias gradients accumulate over chunks in fp32, like an fp32 logits tensor would give them.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, n, chunk_size):
            sl = slice(start, min(start + chunk_size, n))
            logits = _chunk_logits(hidden[sl], w, b)
            # d(lse - z_t)/dz = softmax(z) - onehot(t), computed in place to keep one (c, V) buffer.
            probs = logits.sub_(lse[sl, None]).exp_()
            probs[torch.arange(probs.shape[0], device=probs.device), targets[sl]] -= 1.0
            probs.mul_(grad_out)
            if need_h:
                grad_h[sl] = (probs.to(hidden.dtype) @ w).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(probs.t(), hidden[sl].float())
            if need_b:
                grad_b += probs.sum(0)
            del logits, probs
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


def _chunk_logits(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``(c, d) @ (V, d).T`` in the activations' dtype (bf16 matmul under mixed precision), then fp32."""
    logits = h @ w.t()
    if b is not None:
        logits = logits + b
    return logits.float()


def _liger_loss_fn():
    """liger-kernel's fused linear cross-entropy (sum reduction), or None when it is not installed."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def fused_loss_fn(hidden: Tensor, use_liger: bool = True):
    """The fused kernel :func:`chunked_cross_entropy` uses for ``hidden``, or None (then the chunked one runs).

    A fused kernel is called as ``fn(weight, hidden, targets, bias) -> loss sum`` and gives no per-token losses.
    liger's, when it is installed, asked for and the tensors are on CUDA. (Tests replace this function to run a
    fake fused kernel on CPU.)
    """
    if not (use_liger and hidden.is_cuda):
        return None
    return _liger_loss_fn()


@torch.no_grad()
def token_losses(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, chunk_size: int = 4096, bias: Tensor | None = None
) -> Tensor:
    """Detached fp32 ``(n,)`` cross-entropy of each row of ``hidden`` against ``targets``, chunk by chunk, no graph.

    The same numbers as the chunked kernel's forward (same matmul dtype, fp32 logsumexp): the per-token losses of
    the metrics when a fused kernel computed the loss. Costs one more forward of the output layer over the
    labelled positions (no backward) and one ``(chunk_size, V)`` fp32 buffer.
    """
    n = hidden.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    w = weight.to(hidden.dtype)
    b = None if bias is None else bias.to(hidden.dtype)
    for start in range(0, n, chunk_size):
        sl = slice(start, min(start + chunk_size, n))
        logits = _chunk_logits(hidden[sl], w, b)
        out[sl] = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[sl, None]).squeeze(1)
        del logits
    return out


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 4096,
    bias: Tensor | None = None,
    use_liger: bool = True,
    return_token_losses: bool = False,
    recompute_token_losses: bool = True,
) -> tuple[Tensor, int] | tuple[Tensor, int, Tensor | None]:
    """Sum of cross-entropies of ``hidden @ weight.T + bias`` against ``labels`` (already shifted and selected).

    Args:
        hidden: ``(N, d)`` hidden states, one per predicted token (see :func:`shift_and_select`).
        weight: ``(V, d)`` output projection (the output layer's weight; tied or not).
        labels: ``(N,)`` target ids; ``-100`` entries are dropped here as well.
        chunk_size: rows whose ``(chunk, V)`` fp32 logits exist at once.
        bias: optional ``(V,)`` output bias.
        use_liger: use liger-kernel's fused kernel when importable and the tensors are on CUDA.
        return_token_losses: also return the detached ``(n_tokens,)`` fp32 per-token losses. The chunked kernel
            computes them anyway; a fused kernel (liger) gives none, so they then cost :func:`token_losses`, an
            extra no-grad pass over the output layer, or are None when ``recompute_token_losses`` is False.
        recompute_token_losses: see ``return_token_losses``.

    Returns:
        ``(loss_sum, n_tokens)``: fp32 scalar sum over the ``n_tokens`` labelled positions (no normalisation:
        the caller divides by the label count of the whole global batch), then the token losses if asked.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden (N, d) and weight (V, d), got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be (N,) with N = {hidden.shape[0]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    keep = labels != IGNORE_INDEX
    if not bool(keep.all()):
        hidden, labels = hidden[keep], labels[keep]
    n = int(labels.shape[0])
    per_token: Tensor | None
    if n == 0:
        # Keep the graph connected (DDP/ZeRO expect every used parameter to receive a gradient).
        loss_sum = (hidden.sum() * 0.0 + weight.sum() * 0.0).float()
        per_token = torch.zeros(0, dtype=torch.float32, device=hidden.device)
    elif (fused := fused_loss_fn(hidden, use_liger)) is not None:
        loss_sum = fused(weight, hidden, labels, bias).float()
        per_token = None
        if return_token_losses and recompute_token_losses:
            per_token = token_losses(
                hidden.detach(), weight.detach(), labels, chunk_size=chunk_size, bias=bias
            )
    else:
        loss_sum, per_token = _ChunkedCrossEntropy.apply(hidden, weight, bias, labels, chunk_size)
    return (loss_sum, n, per_token) if return_token_losses else (loss_sum, n)
