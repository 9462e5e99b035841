"""The varlen attention plumbing on CPU, with the plain-PyTorch reference kernel in place of the CUDA call.

What runs here is what runs on the GPU except the kernel: registration with transformers' attention and mask
interfaces, ``cu_seqlens`` from packed ``position_ids`` (LLM) and from the grids (vision tower), GQA, causal vs
bidirectional. The oracle is independent of that plumbing: each sample run alone through the ``sdpa`` model.
Also here: the training step's numerics under bf16 autocast on CPU (the GPU default precision).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_collate import _alone, _loss_and_grads, make_sample
from transformers import VideoLlama3ForConditionalGeneration

from videollama3_train.contract import IGNORE_INDEX, forward_kwargs
from videollama3_train.data.collate import collate_packed
from videollama3_train.model import attention
from videollama3_train.model.presets import build_model_config
from videollama3_train.model.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, build_tiny_tokenizer
from videollama3_train.trainer.loss import chunked_cross_entropy, shift_and_select


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def sdpa_model(tok):
    cfg = build_model_config(
        "tiny",
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tok.convert_tokens_to_ids(VIDEO_TOKEN),
        attn_implementation="sdpa",
    )
    # sharp attention (large init), so that a leak between samples moves the loss visibly
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c.initializer_range = 0.2
    torch.manual_seed(0)
    return VideoLlama3ForConditionalGeneration(cfg).float().eval()


@pytest.fixture(scope="module")
def ref_model(sdpa_model):
    assert attention.select_attention("varlen_reference") == attention.VARLEN_REFERENCE
    model = copy.deepcopy(sdpa_model)
    attention.use_attention(model, attention.VARLEN_REFERENCE)
    assert model.config.vision_config._attn_implementation == attention.VARLEN_REFERENCE
    assert model.config.text_config._attn_implementation == attention.VARLEN_REFERENCE
    return model


@pytest.fixture(scope="module")
def samples(tok):
    """Text-only, one image, two images, and a pruned video: the mix a packed row of stage 3 holds."""
    gen = torch.Generator().manual_seed(0)
    keep = [True] * 4 + [True, False, False, True] + [False, True, False, False]
    return [
        make_sample(tok, gen),
        make_sample(tok, gen, images=[(4, 6)]),
        make_sample(tok, gen, images=[(2, 4), (6, 4)]),
        make_sample(tok, gen, video=(3, 4, 4), keep=keep),
    ]


def _packed(samples):
    kwargs = forward_kwargs(collate_packed(samples))
    labels = kwargs.pop("labels")
    return kwargs, labels


def _count_segments(monkeypatch) -> list[int]:
    """Record the number of segments of every kernel call (LLM layers and vision-tower layers)."""
    calls: list[int] = []
    kernel = attention.reference_varlen_kernel

    def counting(q, k, v, cu, max_len, **kw):
        calls.append(int(cu.numel()) - 1)
        return kernel(q, k, v, cu, max_len, **kw)

    monkeypatch.setattr(attention, "reference_varlen_kernel", counting)
    return calls


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_reference_kernel_equals_block_diagonal_sdpa(causal: bool, heads: tuple[int, int]) -> None:
    """Oracle: one dense SDPA over the whole row with a block-diagonal (and causal) boolean mask."""
    hq, hkv = heads
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 1, 9, 3]
    L, D = sum(lengths), 8
    q = torch.randn(L, hq, D, generator=gen)
    k, v = torch.randn(L, hkv, D, generator=gen), torch.randn(L, hkv, D, generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = attention.reference_varlen_kernel(q, k, v, cu, max(lengths), causal=causal, scale=None)

    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask &= torch.ones(L, L, dtype=torch.bool).tril()
    rep = hq // hkv
    dense = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(rep, dim=1).transpose(0, 1),
        v.repeat_interleave(rep, dim=1).transpose(0, 1),
        attn_mask=mask,
    ).transpose(0, 1)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)


def test_cu_seqlens_from_position_ids() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3]])
    assert attention.cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 4, 8]


def test_packed_equals_unpacked_through_varlen_plumbing(sdpa_model, ref_model, samples, monkeypatch) -> None:
    """Loss and every gradient of one packed row through the varlen backend (LLM and vision tower) equal the
    samples run one by one through ``sdpa`` (fp32, 1e-5)."""
    ref_loss, ref_grads = _loss_and_grads(sdpa_model, [_alone(s) for s in samples])
    calls = _count_segments(monkeypatch)
    loss, grads = _loss_and_grads(ref_model, [_packed(samples)])

    # every layer of the tower saw one segment per image (1 + 2, one call) and per video frame (3, one call);
    # every LLM layer one segment per sample
    lv = ref_model.config.vision_config.num_hidden_layers
    ll = ref_model.config.text_config.num_hidden_layers
    assert calls == [3] * lv + [3] * lv + [len(samples)] * ll
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    assert any(n.startswith("model.vision_model") for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(
            g, ref_grads[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("tower", ["llm", "vision"])
def test_one_segment_for_the_row_breaks_isolation(ref_model, samples, monkeypatch, tower: str) -> None:
    """Negative control: the same plumbing with the per-segment split removed (one segment for the whole row, in
    the LLM or in the vision tower) no longer matches the unpacked reference."""
    kwargs, labels = _packed(samples)
    with torch.no_grad():
        good = _row_loss(ref_model, kwargs, labels)
    kernel = attention.reference_varlen_kernel
    llm_heads = ref_model.config.text_config.num_attention_heads

    def one_segment(q, k, v, cu, max_len, **kw):
        is_llm = q.shape[1] == llm_heads and kw["causal"]
        if (tower == "llm") == is_llm:
            cu = cu[[0, -1]]
        return kernel(q, k, v, cu, max_len, **kw)

    monkeypatch.setattr(attention, "reference_varlen_kernel", one_segment)
    with torch.no_grad():
        leaked = _row_loss(ref_model, kwargs, labels)
    assert abs(leaked.item() - good.item()) > 1e-3 * abs(good.item())


def _row_loss(model, kwargs, labels) -> torch.Tensor:
    logits = model(**kwargs, use_cache=False).logits
    return F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")


# ---------------------------------------------------------------------------------------------------------------
# bf16 on CPU: the GPU default precision (autocast bf16 compute, fp32 weights, fp32 loss)
# ---------------------------------------------------------------------------------------------------------------

# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%): over a few layers of a tiny model the summed loss of
# a row measured within 0.5% of the fp32 value; 2% bounds it with margin without hiding a leak (~5%, see
# test_collate's negative control).
BF16_RTOL = 2e-2


def _bf16_loss_and_grads(model, runs):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return _loss_and_grads(model, runs)


def test_bf16_packed_equals_unpacked(ref_model, sdpa_model, samples) -> None:
    ref_loss, _ = _loss_and_grads(sdpa_model, [_alone(s) for s in samples])  # fp32 oracle
    alone_loss, alone_grads = _bf16_loss_and_grads(sdpa_model, [_alone(s) for s in samples])
    loss, grads = _bf16_loss_and_grads(ref_model, [_packed(samples)])
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    torch.testing.assert_close(loss, alone_loss, rtol=BF16_RTOL, atol=0)
    torch.testing.assert_close(loss, ref_loss, rtol=BF16_RTOL, atol=0)
    # gradients: compared as whole-model directions (per-element bf16 noise is large on near-zero entries)
    flat = torch.cat([grads[n].flatten() for n in sorted(grads)])
    flat_ref = torch.cat([alone_grads[n].flatten() for n in sorted(grads)])
    cos = F.cosine_similarity(flat, flat_ref, dim=0)
    assert cos > 0.99, cos


def test_bf16_chunked_loss_equals_transformers_loss(sdpa_model, samples) -> None:
    """The chunked cross-entropy on bf16 hidden states equals transformers' own loss (``labels=``, full fp32
    logits) under the same autocast, within the bf16 tolerance; the loss itself is accumulated in fp32."""
    kwargs, labels = _packed(samples)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = sdpa_model.model(**kwargs, use_cache=False).last_hidden_state
        sel, targets = shift_and_select(hidden, labels)
        loss_sum, n = chunked_cross_entropy(sel, sdpa_model.lm_head.weight, targets, chunk_size=7)
        ref = sdpa_model(**kwargs, labels=labels, use_cache=False).loss
    assert (
        loss_sum.dtype == torch.float32
    )  # the final norm returns fp32 hidden states; logits chunks are bf16
    torch.testing.assert_close(loss_sum / n, ref.float(), rtol=BF16_RTOL, atol=0)


def test_build_model_with_a_varlen_backend_random_and_from_a_directory(tmp_path) -> None:
    """transformers refuses to construct a model under an unknown "flash" name; build_model builds with sdpa and
    switches, for the random init and for a native directory (the path every GPU fine-tune takes)."""
    from videollama3_train.model.core import ModelConfig, build_model

    tok = build_tiny_tokenizer()
    model = build_model(ModelConfig(preset="tiny", attn_implementation="varlen_reference"), tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = build_model(
        ModelConfig(preset="tiny", attn_implementation="varlen_reference", init_from=str(tmp_path)), tok
    )
    sdpa = build_model(ModelConfig(preset="tiny", attn_implementation="sdpa", init_from=str(tmp_path)), tok)
    for m in (model, loaded):
        assert m.config.text_config._attn_implementation == attention.VARLEN_REFERENCE
        assert m.config.vision_config._attn_implementation == attention.VARLEN_REFERENCE
    ids = torch.randint(0, 300, (1, 12))
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        packed = loaded(input_ids=ids, position_ids=pos, use_cache=False).logits
        second = sdpa(input_ids=ids[:, 5:], use_cache=False).logits
    torch.testing.assert_close(packed[:, 5:], second, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# The CUDA call itself: what ``varlen_attn`` receives from the adapter, with the kernel faked on CPU
# ----------------------------------------------------------------------------------------------------------------


def _fake_varlen_attn(new_api: bool, calls: list):
    """A stand-in for ``torch.nn.attention.varlen.varlen_attn`` with the signature of torch >= 2.11 (``window_size``,
    ``enable_gqa``) or of torch 2.10 (``is_causal``, no GQA); it records its arguments and answers like the kernel
    (the reference, in the input dtype)."""

    def check_and_answer(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
        assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype  # one half dtype
        assert cu_q.dtype == torch.int32 and cu_k is cu_q and max_q == max_k
        return attention.reference_varlen_kernel(q, k, v, cu_q, max_q, causal=causal, scale=scale)

    if new_api:

        def varlen_attn(
            q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
        ):
            calls.append({"q": q, "k": k, "v": v, "cu": cu_q, "max": max_q, "scale": scale,
                          "window_size": window_size, "enable_gqa": enable_gqa})  # fmt: skip
            assert enable_gqa == (q.shape[1] != k.shape[1])  # GQA said exactly when the heads differ
            return check_and_answer(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size == (-1, 0))

    else:

        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=False):
            calls.append(
                {"q": q, "k": k, "v": v, "cu": cu_q, "max": max_q, "scale": scale, "is_causal": is_causal}
            )
            assert q.shape[1] == k.shape[1]  # no GQA in this kernel: the adapter repeats the key/value heads
            return check_and_answer(q, k, v, cu_q, cu_k, max_q, max_k, scale, is_causal)

    return varlen_attn


@pytest.mark.parametrize("new_api", [True, False], ids=["window_size", "is_causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("hq", "hkv", "causal"), [(4, 2, True), (4, 4, False)], ids=["gqa-causal", "mha-bidi"]
)
def test_cuda_adapter_call(monkeypatch, new_api, dtype, hq, hkv, causal) -> None:
    """``flash_varlen``'s call of the CUDA kernel: half-precision q/k/v (fp32 cast to bf16, the answer cast back),
    causal as ``window_size=(-1, 0)`` (torch >= 2.11) or ``is_causal`` (2.10), GQA as ``enable_gqa`` or repeated
    heads, int32 ``cu_seqlens`` of the packed samples, the longest as max length, the scale passed through; and the
    answer is the per-sample attention of each packed sample."""
    import torch.nn.attention.varlen as varlen_mod

    calls: list = []
    monkeypatch.setattr(varlen_mod, "varlen_attn", _fake_varlen_attn(new_api, calls))
    gen = torch.Generator().manual_seed(0)
    lengths, d = [5, 3, 7], 8
    n = sum(lengths)
    query, key, value = (torch.randn(1, h, n, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    position_ids = torch.cat([torch.arange(s) for s in lengths]).unsqueeze(0)
    module = torch.nn.Module()
    module.is_causal = causal
    out, _ = attention.varlen_attention_forward(
        module, query, key, value, None, scaling=0.3, position_ids=position_ids
    )
    (call,) = calls
    half = torch.bfloat16 if dtype == torch.float32 else dtype
    assert call["q"].dtype == call["k"].dtype == call["v"].dtype == half
    assert call["q"].shape == (n, hq, d)
    assert call["k"].shape == call["v"].shape == ((n, hkv, d) if new_api else (n, hq, d))
    assert call["cu"].tolist() == [0, 5, 8, 15] and call["max"] == 7 and call["scale"] == 0.3
    if new_api:
        assert call["window_size"] == ((-1, 0) if causal else (-1, -1))
        assert call["enable_gqa"] == (hq != hkv)
    else:
        assert call["is_causal"] is causal
    assert out.shape == (1, n, hq, d) and out.dtype == dtype  # back in the caller's dtype
    rep = hq // hkv
    for a, b in [(0, 5), (5, 8), (8, 15)]:  # oracle: each sample alone, in the kernel's dtype
        qs = query[0, :, a:b].to(half)
        ks, vs = (t[0, :, a:b].to(half).repeat_interleave(rep, dim=0) for t in (key, value))
        want = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=0.3).transpose(0, 1)
        torch.testing.assert_close(out[0, a:b], want.to(dtype), atol=1e-2, rtol=1e-2)
