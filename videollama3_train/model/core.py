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

import copy
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    GenerationConfig,
    Qwen2Config,
    VideoLlama3Config,
    VideoLlama3ForConditionalGeneration,
    VideoLlama3VisionConfig,
)

from .attention import construction_backend, select_attention, use_attention
from .presets import PRESETS, build_model_config
from .weights import (
    CheckpointWeights,
    RandomWeights,
    WeightSource,
    materialize,
    meta_model,
    safetensors_files,
)

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    preset: str = "tiny"  # shape for random init: tiny | videollama3_2b | videollama3_7b
    tokenizer: str = "tiny"  # tiny (small trained BPE) | qwen (real Qwen2 ids) | a local tokenizer directory
    init_from: str | None = None  # native / official-format directory; None = random `preset` weights
    init_kind: str = "auto"  # auto | random | native | official | assemble
    vision_from: str | None = None  # assemble: SigLIP vision-model directory
    llm_from: str | None = None  # assemble: Qwen2 causal-LM directory
    # auto | sdpa | eager | varlen | varlen_reference (CPU, tests) | flash_attention_2
    attn_implementation: str = "auto"
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


def model_config_for(cfg: ModelConfig) -> VideoLlama3Config:
    """The config ``build_model`` makes for ``cfg``, without weights or tokenizer: for its dimensions (the data
    planner's activation-memory model is built before the model). Media token ids are placeholders (the Qwen2 ones,
    or 0 and 1 for a random preset, whose vocabulary may be the tiny tokenizer's) and a random preset keeps its own
    vocabulary: no dimension the planner reads changes but, by a few entries, the vocabulary."""
    kind = cfg.init_kind
    if kind == "auto":
        kind = "random" if cfg.init_from is None else detect_init_kind(cfg.init_from)
    ids = {"image_token_id": 151655, "video_token_id": 151656}
    if kind == "native":
        return VideoLlama3Config.from_pretrained(cfg.init_from, local_files_only=True)
    if kind == "official":
        return official_config(json.loads((Path(cfg.init_from) / "config.json").read_text()), **ids)
    if kind == "assemble":
        return assemble_config(cfg.vision_from, cfg.llm_from, **ids)
    return build_model_config(cfg.preset, image_token_id=0, video_token_id=1)


def init_projector(model: VideoLlama3ForConditionalGeneration, std: float = 0.02) -> None:
    for m in model.model.projector.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------------------
# Public builder
# --------------------------------------------------------------------------------------------------------------


def build_model(
    cfg: ModelConfig, tokenizer, *, defer_weights: bool = False
) -> VideoLlama3ForConditionalGeneration:
    """The model for ``cfg``; media token ids come from ``tokenizer`` and must match a loaded checkpoint's.

    The model is constructed with its parameters on the meta device and filled tensor by tensor from its weight
    source (model/weights.py): no second copy of the weights is ever held. ``defer_weights``: leave the
    parameters on meta and attach the source as ``model.initial_weights`` (FSDP2 shards first and loads after).
    """
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
        config = VideoLlama3Config.from_pretrained(cfg.init_from, local_files_only=True)
        if (config.image_token_id, config.video_token_id) != (image_id, video_id):
            raise ValueError(
                f"{cfg.init_from}: media token ids {config.image_token_id}/{config.video_token_id} differ "
                f"from the tokenizer's {image_id}/{video_id}; use the tokenizer saved with the checkpoint"
            )
    elif kind == "random":
        config = build_model_config(
            cfg.preset,
            image_token_id=image_id,
            video_token_id=video_id,
            vocab_size=_vocab_for(cfg.preset, tokenizer),
            attn_implementation=built_with,
        )
    elif kind == "official":
        raw = json.loads((Path(cfg.init_from) / "config.json").read_text())
        config = official_config(raw, image_token_id=image_id, video_token_id=video_id)
    else:  # assemble
        config = assemble_config(
            cfg.vision_from, cfg.llm_from, image_token_id=image_id, video_token_id=video_id
        )
    config._attn_implementation = built_with

    as_built = copy.deepcopy(config)  # the config is changed after the build (generation defaults: pad id)

    def factory():
        return VideoLlama3ForConditionalGeneration(copy.deepcopy(as_built))

    model = meta_model(factory)
    source = _weight_source(cfg, kind, factory, dtype)
    model = model.to(dtype)  # meta parameters: free; buffers as today's build
    if defer_weights:
        model.initial_weights = source
    else:
        materialize(model, source, label=_source_label(cfg, kind))
    if kind == "native":
        model.generation_config = GenerationConfig.from_model_config(model.config)
        gen_file = Path(cfg.init_from) / "generation_config.json"
        if gen_file.is_file():
            model.generation_config = GenerationConfig.from_pretrained(cfg.init_from, local_files_only=True)
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {model.config.text_config.vocab_size}"
        )
    use_attention(model, attn)
    _set_generation_defaults(model, tokenizer)
    return model


def _source_label(cfg: ModelConfig, kind: str) -> str:
    if kind == "random":
        return f"random init of preset {cfg.preset}"
    return str(cfg.init_from) if kind != "assemble" else f"{cfg.vision_from} + {cfg.llm_from}"


def _weight_source(cfg: ModelConfig, kind: str, factory, dtype: torch.dtype) -> WeightSource:
    """Where ``model``'s weights come from (tensor by tensor): the preset's random init, or checkpoint files."""
    random = RandomWeights(factory, seed=cfg.seed, projector_std=cfg.projector_init_std, dtype=dtype)
    if kind == "random":
        return random
    if kind == "native":
        return CheckpointWeights([(safetensors_files(cfg.init_from), _native_key)], dtype=dtype)
    if kind == "official":
        return CheckpointWeights([(safetensors_files(cfg.init_from), _official_key)], dtype=dtype)
    return CheckpointWeights(
        [
            (safetensors_files(cfg.vision_from), _siglip_key),
            (safetensors_files(cfg.llm_from), lambda k: _qwen2_key(k, cfg.llm_from)),
        ],
        dtype=dtype,
        fill=random,
        fill_names=("model.projector.",),  # the projector starts random (stage 1 trains it from scratch)
    )


def _native_key(key: str) -> str:
    return key


def _official_key(key: str) -> str | None:
    if key.endswith("position_embedding.weight") or key.endswith("position_ids"):
        return None  # NaViT tower: no absolute position embedding
    return map_official_key(key)


def _siglip_key(key: str) -> str | None:
    """SigLIP ``vision_model.*`` -> ``model.vision_model.*``; position embedding, head and a text tower dropped."""
    key = key.removeprefix("vision_model.")
    if key.startswith("text_model.") or key.startswith("logit_"):
        return None  # a full SiglipModel directory also holds the text tower
    if key.startswith("head.") or "position_embedding" in key or key.endswith("position_ids"):
        return None
    return "model.vision_model." + key


def _qwen2_key(key: str, llm_dir) -> str:
    """Qwen2 ``model.*`` -> ``model.language_model.*``, ``lm_head`` kept."""
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    if key.startswith("lm_head."):
        return key
    raise KeyError(f"unexpected key {key!r} in Qwen2 checkpoint {llm_dir}")


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
