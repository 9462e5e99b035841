"""Weights built tensor by tensor (model/weights.py) are today's weights.

The oracle is the construction every init path used before: the whole model built under ``torch.manual_seed``
(transformers' constructors and ``post_init`` draw the values), ``init_projector``, a cast to the model dtype. The
checkpoint paths (official, assemble, native) are checked against the files' tensors in tests/test_model.py; here
the random init, whose values only a whole construction defined so far, and the meta construction itself.
"""

from __future__ import annotations

import pytest
import torch
from transformers import VideoLlama3ForConditionalGeneration

from videollama3_train.model.core import ModelConfig, _vocab_for, build_model, init_projector
from videollama3_train.model.presets import build_model_config


def _whole_construction(cfg: ModelConfig, tokenizer) -> VideoLlama3ForConditionalGeneration:
    config = build_model_config(
        cfg.preset,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vocab_size=_vocab_for(cfg.preset, tokenizer),
        attn_implementation="sdpa",
    )
    torch.manual_seed(cfg.seed)
    model = VideoLlama3ForConditionalGeneration(config)
    init_projector(model, cfg.projector_init_std)
    return model.to(getattr(torch, cfg.dtype))


@pytest.mark.parametrize(("seed", "dtype"), [(0, "float32"), (7, "bfloat16")])
def test_random_init_tensor_by_tensor_equals_the_whole_construction(tiny_tokenizer, seed, dtype):
    cfg = ModelConfig(preset="tiny", attn_implementation="sdpa", seed=seed, dtype=dtype)
    ref = _whole_construction(cfg, tiny_tokenizer)
    rng = torch.get_rng_state()  # where the whole construction left the generator (LoRA adapters draw next)
    model = build_model(cfg, tiny_tokenizer)
    assert torch.equal(torch.get_rng_state(), rng)
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    for (k, a), (_, b) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        assert torch.equal(a, b), k
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied again
    assert not any(p.device.type == "meta" for p in model.parameters())


def test_deferred_weights_stay_on_meta_and_stream_the_same_values(tiny_tokenizer):
    cfg = ModelConfig(preset="tiny", attn_implementation="sdpa")
    model = build_model(cfg, tiny_tokenizer, defer_weights=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    want = _whole_construction(cfg, tiny_tokenizer).state_dict()
    names = [n for n, _ in model.named_parameters()]
    streamed = dict(model.initial_weights)
    assert sorted(streamed) == sorted(names)  # every parameter once, a tied one under its first name
    for k, v in streamed.items():
        assert torch.equal(v, want[k]), k
