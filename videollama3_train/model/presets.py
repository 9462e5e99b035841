"""Model shapes. Dimensions follow docs/reference.md §1 (VideoLLaMA3 2B / 7B): a SigLIP-so400m-style NaViT tower
with 14px patches and a Qwen2.5 LLM. ``tiny`` keeps every structural feature (GQA, tied embeddings, axial RoPE with
head_dim divisible by 4) at a size that runs a forward+backward in well under a second on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Qwen2Config, VideoLlama3Config, VideoLlama3VisionConfig


@dataclass
class VisionShape:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 14  # transformers' default is 16; the checkpoints use 14


@dataclass
class TextShape:
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    vocab_size: int = 151936
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6


@dataclass
class ModelShape:
    vision: VisionShape = field(default_factory=VisionShape)
    text: TextShape = field(default_factory=TextShape)


PRESETS: dict[str, ModelShape] = {
    "videollama3_2b": ModelShape(),
    "videollama3_7b": ModelShape(
        text=TextShape(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            tie_word_embeddings=False,
        )
    ),
    "tiny": ModelShape(
        vision=VisionShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        text=TextShape(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=640,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            max_position_embeddings=32768,
        ),
    ),
}


def build_model_config(
    shape: ModelShape | str,
    *,
    image_token_id: int = 151655,
    video_token_id: int = 151656,
    vocab_size: int | None = None,
    attn_implementation: str = "sdpa",
) -> VideoLlama3Config:
    """A ``VideoLlama3Config`` for ``shape``; ``vocab_size`` overrides the preset (it must cover the tokenizer)."""
    if isinstance(shape, str):
        if shape not in PRESETS:
            raise ValueError(f"unknown model preset {shape!r}; choose one of {sorted(PRESETS)}")
        shape = PRESETS[shape]
    v, t = shape.vision, shape.text
    head_dim = v.hidden_size // v.num_attention_heads
    if v.hidden_size % v.num_attention_heads or head_dim % 4:
        raise ValueError(
            f"vision head_dim = hidden_size / heads must be an integer divisible by 4 (2D axial RoPE), got "
            f"{v.hidden_size}/{v.num_attention_heads}"
        )
    vocab = vocab_size or t.vocab_size
    if max(image_token_id, video_token_id) >= vocab:
        raise ValueError(
            f"vocab_size {vocab} does not cover the media token ids {image_token_id}, {video_token_id}"
        )
    vision_config = VideoLlama3VisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        patch_size=v.patch_size,
    )
    text_config = Qwen2Config(
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        vocab_size=vocab,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        tie_word_embeddings=t.tie_word_embeddings,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        use_sliding_window=False,
    )
    config = VideoLlama3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        tie_word_embeddings=t.tie_word_embeddings,
    )
    config._attn_implementation = attn_implementation
    return config
