"""The chunked cross-entropy equals transformers' loss and gradients, and never holds full-vocabulary logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from videollama3_train.trainer.loss import chunked_cross_entropy, shift_and_select


def _reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias=None) -> torch.Tensor:
    """What ``VideoLlama3ForConditionalGeneration(labels=)`` computes, with sum reduction: full fp32 logits."""
    logits = F.linear(hidden, weight, bias).float()  # (1, L, V)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def _inputs(L: int = 37, d: int = 16, V: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, L, d, generator=g, dtype=torch.float64).float()
    weight = torch.randn(V, d, generator=g) * 0.3
    labels = torch.randint(0, V, (1, L), generator=g)
    labels[0, torch.rand(L, generator=g) < 0.4] = -100  # prompt / media positions
    labels[0, 0] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_full_logits_loss_and_grads(chunk_size: int, with_bias: bool) -> None:
    hidden, weight, labels = _inputs()
    bias = torch.randn(weight.shape[0]) * 0.1 if with_bias else None
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b1 = bias.clone().requires_grad_() if with_bias else None
    ref = _reference(h1, w1, labels, b1)
    ref.backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b2 = bias.clone().requires_grad_() if with_bias else None
    sel_h, targets = shift_and_select(h2, labels)
    loss, n = chunked_cross_entropy(sel_h, w2, targets, chunk_size=chunk_size, bias=b2)
    loss.backward()

    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w2.grad, w1.grad, atol=1e-5, rtol=1e-5)
    if with_bias:
        torch.testing.assert_close(b2.grad, b1.grad, atol=1e-5, rtol=1e-5)


def test_token_losses_and_empty_selection() -> None:
    hidden, weight, labels = _inputs()
    sel_h, targets = shift_and_select(hidden, labels)
    loss, n, per_token = chunked_cross_entropy(sel_h, weight, targets, chunk_size=7, return_token_losses=True)
    assert per_token.shape == (n,) and not per_token.requires_grad
    torch.testing.assert_close(per_token.sum(), loss)
    ref = F.cross_entropy(sel_h @ weight.T, targets, reduction="none")
    torch.testing.assert_close(per_token, ref, atol=1e-5, rtol=1e-5)

    # No label at all: zero loss that still reaches the weight (DDP / ZeRO want every parameter in the graph).
    w = weight.clone().requires_grad_()
    empty, n0 = chunked_cross_entropy(sel_h[:0], w, targets[:0])
    empty.backward()
    assert n0 == 0 and empty.item() == 0.0 and w.grad is not None and not w.grad.any()


def test_matches_tiny_model_loss_with_tied_head(tiny_model) -> None:
    """On the real tiny model (tied lm_head / embeddings): same loss and same gradients as model(labels=)."""
    model = tiny_model.float()
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    g = torch.Generator().manual_seed(0)
    L = 24
    input_ids = torch.randint(0, 200, (1, L), generator=g)
    labels = input_ids.clone()
    labels[0, :9] = -100

    model.zero_grad()
    out = model(input_ids=input_ids, labels=labels, use_cache=False)
    n = int((labels[:, 1:] != -100).sum())
    (out.loss * n).backward()  # transformers averages over label tokens: scale back to the sum
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    ref_loss = F.cross_entropy(
        out.logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum"
    ).detach()

    model.zero_grad()
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    sel_h, targets = shift_and_select(hidden, labels)
    loss, n2 = chunked_cross_entropy(sel_h, model.lm_head.weight, targets, chunk_size=4)
    loss.backward()

    assert n2 == n
    torch.testing.assert_close(loss.detach(), ref_loss, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(loss.detach(), out.loss.detach() * n, atol=1e-4, rtol=1e-6)
    for k, p in model.named_parameters():
        if k in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[k], atol=1e-5, rtol=1e-4, msg=k)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op creates (bytes): the quantity a full-logits loss blows up."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_never_materialises_full_logits() -> None:
    """At 4096 label tokens and V=4096 the full fp32 logits are 64 MiB; a chunk of 256 rows is 4 MiB."""
    n, d, V, chunk = 4096, 32, 4096, 256
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = (torch.randn(V, d, generator=g) * 0.1).requires_grad_()
    targets = torch.randint(0, V, (n,), generator=g)

    def peak(fn) -> int:
        with _LargestAllocation() as probe:
            fn().backward()
        return probe.largest

    full = peak(lambda: F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum"))
    chunked = peak(lambda: chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk)[0])
    assert full >= n * V * 4
    # Largest tensor of the chunked loss: one (chunk, V) fp32 block (or the (V, d) / (n, d) gradients).
    assert chunked <= max(chunk * V, V * d, n * d) * 4
    assert chunked * 8 <= full


def test_input_validation() -> None:
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="disagree"):
        shift_and_select(hidden, labels[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden[0], weight, labels[0], chunk_size=0)
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        chunked_cross_entropy(hidden, weight, labels[0])
