"""collate_packed: layout of a packed row, and the isolation invariant on the tiny native model.

The key test: the summed token loss and every gradient of one packed row equal those of running each sample
alone, for text-only, one-image, two-image and compressed-video samples. A negative control shows the
comparison is sensitive: without per-sample position_ids the same row lets samples attend to each other and
the loss moves.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import VideoLlama3ForConditionalGeneration

from videollama3_train.data.collate import IGNORE_INDEX, collate_packed, collate_padded, forward_kwargs
from videollama3_train.model.presets import build_model_config
from videollama3_train.model.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, build_tiny_tokenizer

PATCH_DIM = 3 * 14 * 14


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _text(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(0, 500, (n,), generator=gen)


def make_sample(
    tok,
    gen: torch.Generator,
    *,
    images: list[tuple[int, int]] = (),
    video: tuple[int, int, int] | None = None,
    keep: list[bool] | None = None,
    text_len: int = 12,
    answer_len: int = 8,
) -> dict:
    """A synthetic Sample: prompt text, media placeholders, answer. ``images``: (h, w) patch grids (merge 1);
    ``video``: (t, h, w) with merge 2 and optional compression mask ``keep`` over its t*h*w/4 tokens."""
    image_id, video_id = tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.convert_tokens_to_ids(VIDEO_TOKEN)
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    parts, sample = [torch.tensor([im_start]), _text(gen, 3)], {}
    if images:
        sample["pixel_values"] = torch.randn(sum(h * w for h, w in images), PATCH_DIM, generator=gen)
        sample["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in images])
        sample["image_merge_sizes"] = torch.ones(len(images), dtype=torch.long)
        for h, w in images:
            parts += [torch.full((h * w,), image_id), _text(gen, 1)]
    if video is not None:
        t, h, w = video
        n_tok = t * h * w // 4
        mask = (
            torch.tensor(keep, dtype=torch.bool) if keep is not None else torch.ones(n_tok, dtype=torch.bool)
        )
        assert mask.numel() == n_tok
        sample["pixel_values_videos"] = torch.randn(t * h * w, PATCH_DIM, generator=gen)
        sample["video_grid_thw"] = torch.tensor([[t, h, w]])
        sample["video_merge_sizes"] = torch.tensor([2])
        sample["video_compression_mask"] = mask
        parts += [torch.full((int(mask.sum()),), video_id)]
    parts += [
        _text(gen, text_len),
        torch.tensor([im_end, im_start]),
        _text(gen, answer_len),
        torch.tensor([im_end]),
    ]
    input_ids = torch.cat(parts).long()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[-(answer_len + 1) :] = input_ids[-(answer_len + 1) :]
    sample.update(input_ids=input_ids, labels=labels, meta={"dataset": "synthetic", "index": 0})
    return sample


@pytest.fixture(scope="module")
def samples(tok):
    gen = torch.Generator().manual_seed(0)
    keep = [True] * 4 + [True, False, False, True] + [False, True, False, False]  # frame 0 whole, then pruned
    return [
        make_sample(tok, gen),  # text only
        make_sample(tok, gen, images=[(4, 6)]),
        make_sample(tok, gen, images=[(2, 4), (6, 4)]),
        make_sample(tok, gen, video=(3, 4, 4), keep=keep),
    ]


@pytest.fixture(scope="module")
def model(tok):
    cfg = build_model_config(
        "tiny",
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tok.convert_tokens_to_ids(VIDEO_TOKEN),
        attn_implementation="sdpa",
    )
    # A larger init than the default 0.02 makes attention sharp, so a leak between samples moves the loss
    # visibly.
    cfg.text_config.initializer_range = 0.2
    cfg.vision_config.initializer_range = 0.2
    cfg.initializer_range = 0.2
    torch.manual_seed(0)
    return VideoLlama3ForConditionalGeneration(cfg).float().eval()


def _loss_sum(model, kwargs: dict, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token CE of one row; labels (1, L), shifted here as the model does internally."""
    logits = model(**kwargs, use_cache=False).logits
    return F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")


def _loss_and_grads(
    model, runs: list[tuple[dict, torch.Tensor]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    # normalised like the trainer does it: the sum of token losses over the label tokens of the whole batch
    n_labels = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels in runs)
    for kwargs, labels in runs:
        loss = _loss_sum(model, kwargs, labels) / n_labels
        loss.backward()
        total = total + loss.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads


def _alone(sample: dict) -> tuple[dict, torch.Tensor]:
    kwargs = {k: v for k, v in sample.items() if k not in ("labels", "meta")}
    kwargs["input_ids"] = sample["input_ids"][None]
    return kwargs, sample["labels"][None]


def test_packed_row_layout(samples):
    batch = collate_packed(samples)
    lengths = [int(s["input_ids"].numel()) for s in samples]
    L = sum(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, L)
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
    assert batch["max_seqlen"] == max(lengths)
    assert "attention_mask" not in batch
    assert batch["sample_lengths"] == lengths and len(batch["meta"]) == len(samples)
    for s, (a, b) in zip(
        samples, zip(batch["cu_seqlens"][:-1], batch["cu_seqlens"][1:], strict=True), strict=True
    ):
        assert batch["position_ids"][0, a:b].tolist() == list(range(b - a))
        assert batch["labels"][0, a] == IGNORE_INDEX
        assert torch.equal(batch["labels"][0, a + 1 : b], s["labels"][1:])
        assert torch.equal(batch["input_ids"][0, a:b], s["input_ids"])
    assert batch["pixel_values"].shape == (4 * 6 + 2 * 4 + 6 * 4, PATCH_DIM)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6], [1, 2, 4], [1, 6, 4]]
    assert batch["video_compression_mask"].shape == (12,)
    assert "cu_seqlens" not in forward_kwargs(batch) and "meta" not in forward_kwargs(batch)


def test_text_only_row_has_no_visual_keys(tok):
    gen = torch.Generator().manual_seed(1)
    batch = collate_packed([make_sample(tok, gen), make_sample(tok, gen)])
    assert not any(k in batch for k in ("pixel_values", "pixel_values_videos", "video_compression_mask"))


def test_missing_compression_mask_becomes_all_true(tok):
    gen = torch.Generator().manual_seed(2)
    a = make_sample(tok, gen, video=(2, 2, 2))
    del a["video_compression_mask"]
    b = make_sample(tok, gen, video=(2, 2, 4), keep=[True, True, False, True])
    mask = collate_packed([a, b])["video_compression_mask"]
    assert mask.tolist() == [True, True, True, True, False, True]


def test_pixel_rows_must_match_grid(tok):
    gen = torch.Generator().manual_seed(3)
    s = make_sample(tok, gen, images=[(2, 2)])
    s["pixel_values"] = s["pixel_values"][:3]
    with pytest.raises(ValueError, match="rows"):
        collate_packed([s])


def test_packed_equals_unpacked_loss_and_grads(model, samples):
    ref_loss, ref_grads = _loss_and_grads(model, [_alone(s) for s in samples])
    batch = collate_packed(samples)
    kwargs = forward_kwargs(batch)
    labels = kwargs.pop("labels")
    loss, grads = _loss_and_grads(model, [(kwargs, labels)])

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    # every component trains here: vision tower, projector and LLM all received gradient from the row
    assert any(n.startswith("model.vision_model") for n in grads) and any("projector" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(
            g, ref_grads[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )

    # Negative control: the same row without per-sample positions is one causal sequence; samples see each
    # other.
    del kwargs["position_ids"]
    with torch.no_grad():
        leaked = _loss_sum(model, kwargs, labels) / int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert abs(leaked.item() - ref_loss.item()) > 1e-3 * abs(ref_loss.item())  # measured: ~5%


def test_collate_padded(tok, samples):
    pad = tok.pad_token_id
    for side in ("right", "left"):
        batch = collate_padded(samples, pad_id=pad, padding_side=side)
        lengths = [int(s["input_ids"].numel()) for s in samples]
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (len(samples), max(lengths))
        assert batch["attention_mask"].sum(1).tolist() == lengths
        for i, s in enumerate(samples):
            real = batch["attention_mask"][i].bool()
            assert torch.equal(batch["input_ids"][i][real], s["input_ids"])
            assert torch.equal(batch["labels"][i][real], s["labels"])
            assert (batch["labels"][i][~real] == IGNORE_INDEX).all()
            assert (batch["input_ids"][i][~real] == pad).all()
        first_real = batch["attention_mask"].argmax(1)
        assert (first_real == 0).all() if side == "right" else (first_real > 0).any()
