"""The model core: transformers' native ``VideoLlama3ForConditionalGeneration``, built by every init path.

Init paths (``ModelConfig.init_from`` / ``init_kind``):

* ``random``   - a preset's shape with random weights (projector normal(0, 0.02), bias 0).
* ``native``   - a transformers-native VideoLLaMA3 directory (``from_pretrained``, offline).
* ``official`` - an official-format checkpoint directory (training or hub remote-code key names), remapped to the
  native names of docs/reference.md §1 and loaded through safetensors.
* ``assemble`` - stage-1 initialisation: a SigLIP vision-model directory + a Qwen2 causal-LM directory; the learned
  position embedding and pooling head of SigLIP are dropped and the projector starts random.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    Qwen2Config,
    VideoLlama3Config,
    VideoLlama3ForConditionalGeneration,
    VideoLlama3VisionConfig,
)

from .attention import construction_backend, select_attention, use_attention
from .presets import PRESETS, build_model_config

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    preset: str = "tiny"  # shape for random init: tiny | videollama3_2b | videollama3_7b
    tokenizer: str = "tiny"  # tiny (small trained BPE) | qwen (real Qwen2 ids) | a local tokenizer directory
    init_from: str | None = None  # native / official-format directory; None = random `preset` weights
    init_kind: str = "auto"  # auto | random | native | official | assemble
    vision_from: str | None = None  # assemble: SigLIP vision-model directory
    llm_from: str | None = None  # assemble: Qwen2 causal-LM directory
    attn_implementation: str = (
        "auto"  # auto | sdpa | eager | varlen | varlen_reference (CPU, tests) | flash_attention_2
    )
    dtype: str = "float32"  # weights' dtype in memory (mixed precision is the trainer's business)
    projector_init_std: float = 0.02  # std of the projector's normal init (biases 0)
    seed: int = 0  # random init

    def __post_init__(self):
        if self.init_kind not in ("auto", "random", "native", "official", "assemble"):
            raise ValueError(
                f"model.init_kind must be auto, random, native, official or assemble, got {self.init_kind!r}"
            )
        if self.init_kind == "assemble" and not (self.vision_from and self.llm_from):
            raise ValueError(
                "model.init_kind=assemble needs model.vision_from (SigLIP) and model.llm_from (Qwen2)"
            )
        if self.preset not in PRESETS:
            raise ValueError(f"unknown model.preset {self.preset!r}; choose one of {sorted(PRESETS)}")


# --------------------------------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------------------------------


def load_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory's ``*.safetensors`` (sharded or not). Only safetensors: no pickle is loaded."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
        hint = f" (found {bins[0].name}: convert it to safetensors first)" if bins else ""
        raise FileNotFoundError(f"no *.safetensors weights in {path}{hint}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def detect_init_kind(path: str | Path) -> str:
    """``native`` or ``official`` from a checkpoint directory's config and weight names."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory: config.json is missing")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("model_type") == "video_llama_3":
        return "native"
    if "vision_encoder_config" in cfg or "videollama3" in str(cfg.get("model_type", "")).lower():
        return "official"
    raise ValueError(
        f"{path}: config.json model_type={cfg.get('model_type')!r} is neither native VideoLLaMA3 nor the official format;"
        " for a SigLIP + Qwen2 start use model.init_kind=assemble with model.vision_from / model.llm_from"
    )


_OFFICIAL_RULES = [
    (re.compile(r"^model\.vision_encoder\.vision_encoder\."), "model.vision_model."),
    (re.compile(r"^model\.vision_encoder\."), "model.vision_model."),
    (re.compile(r"^model\.mm_projector\."), "model.projector."),
    (re.compile(r"^model\.(embed_tokens|layers|norm)\."), r"model.language_model.\1."),
    (re.compile(r"^lm_head\."), "lm_head."),
]


def map_official_key(key: str) -> str:
    """Official training / hub key name -> native name (docs/reference.md §1)."""
    for pattern, repl in _OFFICIAL_RULES:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    raise KeyError(f"official checkpoint key {key!r} has no native counterpart")


def map_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.endswith("position_embedding.weight") or k.endswith("position_ids"):
            continue  # NaViT tower: no absolute position embedding
        out[map_official_key(k)] = v
    return out


def official_config(cfg: dict, *, image_token_id: int, video_token_id: int) -> VideoLlama3Config:
    """Native config from an official-format ``config.json`` (Qwen2 fields at top level + ``vision_encoder_config``)."""
    text_keys = Qwen2Config().to_dict().keys()
    text = {k: v for k, v in cfg.items() if k in text_keys and k not in ("architectures", "model_type")}
    text.pop("transformers_version", None)
    v = cfg.get("vision_encoder_config") or {}
    vision = VideoLlama3VisionConfig(
        hidden_size=v.get("hidden_size", 1152),
        intermediate_size=v.get("intermediate_size", 4304),
        num_hidden_layers=v.get("num_hidden_layers", 27),
        num_attention_heads=v.get("num_attention_heads", 16),
        patch_size=v.get("patch_size", 14),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
    )
    return VideoLlama3Config(
        text_config=Qwen2Config(**text),
        vision_config=vision,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def assemble_config(vision_dir: str | Path, llm_dir: str | Path, *, image_token_id: int, video_token_id: int):
    """Native config from a SigLIP vision config and a Qwen2 config (stage-1 assembly)."""
    vcfg = json.loads((Path(vision_dir) / "config.json").read_text())
    vcfg = vcfg.get("vision_config", vcfg)  # a full SiglipModel directory nests it
    tcfg = Qwen2Config.from_pretrained(llm_dir, local_files_only=True)
    vision = VideoLlama3VisionConfig(
        hidden_size=vcfg["hidden_size"],
        intermediate_size=vcfg["intermediate_size"],
        num_hidden_layers=vcfg["num_hidden_layers"],
        num_attention_heads=vcfg["num_attention_heads"],
        patch_size=vcfg.get("patch_size", 14),
        layer_norm_eps=vcfg.get("layer_norm_eps", 1e-6),
        hidden_act=vcfg.get("hidden_act", "gelu_pytorch_tanh"),
    )
    if vision.patch_size != 14:
        log.warning("SigLIP patch_size is %d, VideoLLaMA3 uses 14", vision.patch_size)
    return VideoLlama3Config(
        text_config=tcfg,
        vision_config=vision,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        tie_word_embeddings=bool(tcfg.tie_word_embeddings),
    )


def assemble_state_dict(vision_dir: str | Path, llm_dir: str | Path) -> dict[str, torch.Tensor]:
    """SigLIP ``vision_model.*`` -> ``model.vision_model.*`` (position embedding and head dropped); Qwen2
    ``model.*`` -> ``model.language_model.*``, ``lm_head`` kept."""
    out: dict[str, torch.Tensor] = {}
    for k, v in load_safetensors_dir(vision_dir).items():
        k = k.removeprefix("vision_model.")
        if k.startswith("text_model.") or k.startswith("logit_"):
            continue  # a full SiglipModel directory also holds the text tower
        if k.startswith("head.") or "position_embedding" in k or k.endswith("position_ids"):
            continue
        out["model.vision_model." + k] = v
    for k, v in load_safetensors_dir(llm_dir).items():
        if k.startswith("model."):
            out["model.language_model." + k[len("model.") :]] = v
        elif k.startswith("lm_head."):
            out[k] = v
        else:
            raise KeyError(f"unexpected key {k!r} in Qwen2 checkpoint {llm_dir}")
    return out


def _load_into(
    model: nn.Module, state: dict[str, torch.Tensor], *, source: str, allow_missing: tuple[str, ...] = ()
):
    """Strict load apart from the prefixes in ``allow_missing`` (and a tied lm_head), with a clear report."""
    result = model.load_state_dict(state, strict=False)
    tied = model.config.tie_word_embeddings
    missing = [
        k
        for k in result.missing_keys
        if not k.startswith(allow_missing) and not (tied and k == "lm_head.weight")
    ]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"weights from {source} do not fit the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )


def init_projector(model: VideoLlama3ForConditionalGeneration, std: float = 0.02) -> None:
    for m in model.model.projector.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------------------
# Public builder
# --------------------------------------------------------------------------------------------------------------


def build_model(cfg: ModelConfig, tokenizer) -> VideoLlama3ForConditionalGeneration:
    """The model for ``cfg``; media token ids come from ``tokenizer`` and must match a loaded checkpoint's."""
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    attn = select_attention(cfg.attn_implementation)
    built_with = construction_backend(attn)  # ours are switched on after construction (see attention.py)
    dtype = getattr(torch, cfg.dtype)
    kind = cfg.init_kind
    if kind == "auto":
        kind = "random" if cfg.init_from is None else detect_init_kind(cfg.init_from)
    if kind in ("native", "official") and cfg.init_from is None:
        raise ValueError(f"model.init_kind={kind} needs model.init_from=<directory>")

    if kind == "native":
        model = VideoLlama3ForConditionalGeneration.from_pretrained(
            cfg.init_from, local_files_only=True, dtype=dtype, attn_implementation=built_with
        )
        if (model.config.image_token_id, model.config.video_token_id) != (image_id, video_id):
            raise ValueError(
                f"{cfg.init_from}: media token ids {model.config.image_token_id}/{model.config.video_token_id} differ "
                f"from the tokenizer's {image_id}/{video_id}; use the tokenizer saved with the checkpoint"
            )
    else:
        torch.manual_seed(cfg.seed)
        if kind == "random":
            config = build_model_config(
                cfg.preset,
                image_token_id=image_id,
                video_token_id=video_id,
                vocab_size=_vocab_for(cfg.preset, tokenizer),
                attn_implementation=built_with,
            )
            state = None
        elif kind == "official":
            raw = json.loads((Path(cfg.init_from) / "config.json").read_text())
            config = official_config(raw, image_token_id=image_id, video_token_id=video_id)
            state = map_official_state_dict(load_safetensors_dir(cfg.init_from))
        else:  # assemble
            config = assemble_config(
                cfg.vision_from, cfg.llm_from, image_token_id=image_id, video_token_id=video_id
            )
            state = assemble_state_dict(cfg.vision_from, cfg.llm_from)
        config._attn_implementation = built_with
        model = VideoLlama3ForConditionalGeneration(config)
        init_projector(model, cfg.projector_init_std)
        if state is not None:
            allow = ("model.projector.",) if kind == "assemble" else ()
            _load_into(model, state, source=str(cfg.init_from or cfg.llm_from), allow_missing=allow)
            if config.tie_word_embeddings:
                model.tie_weights()
        model = model.to(dtype)
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {model.config.text_config.vocab_size}"
        )
    use_attention(model, attn)
    _set_generation_defaults(model, tokenizer)
    return model


def _vocab_for(preset: str, tokenizer) -> int:
    """The preset's vocabulary, grown (to a multiple of 64) when the tokenizer is larger."""
    vocab = PRESETS[preset].text.vocab_size
    if len(tokenizer) > vocab:
        vocab = (len(tokenizer) + 63) // 64 * 64
    return vocab


def _set_generation_defaults(model, tokenizer) -> None:
    """``<|im_end|>`` ends an assistant turn; pad is ``<|endoftext|>`` — so generate() stops where a chat answer does."""
    gc = model.generation_config
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    gc.eos_token_id = im_end
    gc.pad_token_id = pad
    gc.bos_token_id = None
    model.config.text_config.eos_token_id = im_end
    model.config.text_config.pad_token_id = pad
