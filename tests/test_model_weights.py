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


def _collect(source, block_bytes: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A weight source's tensors (row blocks joined, each checked: in order, at most ``block_bytes`` or 16 rows)
    and the names that came as row blocks."""
    from videollama3_train.model.weights import Rows

    out, blocked = {}, []
    for name, value in source:  # each block consumed before the next item, as the loaders do
        if isinstance(value, Rows):
            got = [(start, b.clone()) for start, b in value]
            rows = got[0][1].shape[0]
            assert [s for s, _ in got] == list(range(0, value.shape[0], rows)), name
            assert rows == 16 or rows * got[0][1][0].numel() * value.element_size() <= block_bytes, name
            value = torch.cat([b for _, b in got])
            blocked.append(name)
        out[name] = value
    return out, blocked


def test_large_tensors_stream_by_row_blocks_with_the_same_values(tiny_tokenizer, monkeypatch, tmp_path):
    """Above ``ROW_BLOCK_BYTES`` a tensor streams as row blocks (the 2B embedding: 0.9 GiB never whole): the random
    init draws it block by block with the same values as the whole construction, a checkpoint reads it by
    slices, and the built model is today's."""
    from safetensors.torch import save_file

    from videollama3_train.model import weights

    cfg = ModelConfig(preset="tiny", attn_implementation="sdpa", seed=5)
    want = _whole_construction(cfg, tiny_tokenizer).state_dict()
    block = 16 * 2**10  # the tiny embedding, 640 x 128 fp32 = 320 KB, in 20 blocks
    monkeypatch.setattr(weights, "ROW_BLOCK_BYTES", block)
    streamed, blocked = _collect(build_model(cfg, tiny_tokenizer, defer_weights=True).initial_weights, block)
    assert "model.language_model.embed_tokens.weight" in blocked
    assert any(".mlp." in n for n in blocked)  # bias-free linear layers too (an untied output layer's path)
    for k, v in streamed.items():
        assert torch.equal(v, want[k]), k
    rng = torch.get_rng_state()
    _whole_construction(cfg, tiny_tokenizer)
    after_whole = torch.get_rng_state()
    torch.set_rng_state(rng)
    model = build_model(cfg, tiny_tokenizer)  # materialised block by block
    assert torch.equal(torch.get_rng_state(), after_whole)  # the same draws in all (LoRA adapters draw next)
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in want.items() if k != "lm_head.weight"}, str(file))
    read, blocked = _collect(weights.CheckpointWeights([([file], lambda k: k)], dtype=torch.bfloat16), block)
    assert "model.language_model.embed_tokens.weight" in blocked
    for k, v in read.items():
        assert torch.equal(v, want[k].to(torch.bfloat16)), k
