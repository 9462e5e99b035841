"""What the trainer may know of the model, named once: transformers' ``VideoLlama3ForConditionalGeneration``
(``modeling_video_llama_3.py``, transformers 5.2x) seen through a handful of functions.

The trainer does not call ``model(**batch, labels=...)``: the native loss builds ``(L, V)`` logits and upcasts them
to fp32 (about 9 GiB at 16k tokens, docs/reference.md §4), and it runs the vision tower only for the modalities a
micro-batch has (ZeRO-3 would then gather different parameters on different ranks). So it takes the model apart:
the tower + projector (:func:`visual_features`), the LLM body (:func:`hidden_states`) and the output layer
(:func:`output_layer`). Those attribute paths live here and nowhere in ``trainer/``; a transformers release that
moves them changes this file only.

The attention backends are switched through here too: :func:`set_attention` on a config (the FSDP2 export's copy
runs on ``sdpa``), and for sequence parallelism :func:`use_llm_attention` (``ULYSSES``) with :func:`ulysses_slice`
around the forward (``model/attention.py``: the LLM sees one rank's slice and its attention is exchanged
all-to-all across the group).

A PEFT wrapper is looked through (:func:`base_model`): LoRA injects its adapters into the base model's modules in
place, so the base model's ``.model`` and ``.lm_head`` carry them, while the wrapper's attribute lookup would shadow
them.

Depends on transformers and torch only.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from torch import Tensor, nn

from videollama3_train.model.attention import ULYSSES, set_attention, ulysses_slice, use_llm_attention

# Module name of each tower under ``model.model`` (keys are the ``gradient_checkpointing`` choices).
TOWER_MODULES = {"llm": "language_model", "vision": "vision_model"}


def base_model(model: nn.Module) -> nn.Module:
    """The ``VideoLlama3ForConditionalGeneration`` under a PEFT wrapper (``get_base_model()``), else ``model``."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def visual_features(model: nn.Module, pixels: Tensor, grid_thw: Tensor, merge_sizes: Tensor) -> Any:
    """Vision tower + projector on ``pixels (sum t*h*w, C*p*p)`` of items ``grid_thw (n, 3)``, ``merge_sizes (n,)``.

    Returns transformers' ``BaseModelOutputWithPooling``: ``pooler_output`` is a tuple of ``(t*h*w/m^2, d)``
    tensors, one per item, in the LLM's width; pass it to :func:`hidden_states` as ``mm_encoder_outputs``.
    """
    return base_model(model).model.get_image_features(
        pixel_values=pixels, image_grid_thw=grid_thw, image_merge_sizes=merge_sizes
    )


def hidden_states(
    model: nn.Module, *, mm_encoder_outputs: dict[str, Any] | None = None, **forward_kwargs
) -> Tensor:
    """The LLM's last hidden state ``(B, L, d)``, no logits, no KV cache.

    ``forward_kwargs`` are the model's forward arguments (``input_ids``, ``position_ids``,
    ``video_compression_mask``, or the pixel tensors when the tower should run inside); ``mm_encoder_outputs``
    maps ``"image"`` / ``"video"`` to :func:`visual_features` outputs already computed.
    """
    out = base_model(model).model(**forward_kwargs, mm_encoder_outputs=mm_encoder_outputs, use_cache=False)
    return out.last_hidden_state


def language_model(model: nn.Module) -> nn.Module:
    """The LLM (a ``Qwen2Model``: embeddings excluded from its input, decoder layers, final norm)."""
    return base_model(model).model.language_model


def output_layer(model: nn.Module) -> nn.Linear:
    """The output projection (``lm_head``): ``weight (V, d)``, ``bias (V,)`` or None; tied to the embedding or not."""
    return base_model(model).lm_head


def patch_dim(model: nn.Module) -> int:
    """Values in one flattened patch row of ``pixel_values``: ``channels * patch_size**2`` (588 for 3 x 14 x 14)."""
    vision = base_model(model).config.vision_config
    return int(vision.num_channels) * int(vision.patch_size) ** 2


def flops_dimensions(config: Any) -> dict[str, int]:
    """The dimensions docs/reference.md §6 counts FLOPs with, read from a ``VideoLlama3Config`` (or an object with the same
    fields), under the names used there: LLM ``d, nq, nkv, hd, ff, Ll, V``; tower ``dv, ffv, Lv``; ``patch`` side
    in pixels and image ``channels``."""
    text, vision = getattr(config, "text_config", None), getattr(config, "vision_config", None)
    if text is None or vision is None:
        raise ValueError(
            f"expected a VideoLlama3Config with text_config and vision_config, got {type(config)}"
        )
    nq = int(text.num_attention_heads)
    # Qwen2 configs may omit head_dim (then it is hidden / heads); a set value wins.
    hd = getattr(text, "head_dim", None) or text.hidden_size // nq
    patch = vision.patch_size
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise ValueError(f"non-square vision patch {patch} is not supported by the FLOPs count")
        patch = patch[0]
    return {
        "d": int(text.hidden_size),
        "nq": nq,
        "nkv": int(getattr(text, "num_key_value_heads", None) or nq),
        "hd": int(hd),
        "ff": int(text.intermediate_size),
        "Ll": int(text.num_hidden_layers),
        "V": int(text.vocab_size),
        "dv": int(vision.hidden_size),
        "ffv": int(vision.intermediate_size),
        "Lv": int(vision.num_hidden_layers),
        "patch": int(patch),
        "channels": int(getattr(vision, "num_channels", 3)),
    }


def memory_dimensions(config: Any) -> dict[str, Any]:
    """What the activation-memory model needs beyond :func:`flops_dimensions`: the tower's attention heads and
    whether the output layer shares the input embedding (one (V, d) matrix of parameters instead of two)."""
    return {
        "vision_heads": int(config.vision_config.num_attention_heads),
        "tied": bool(
            getattr(config, "tie_word_embeddings", getattr(config.text_config, "tie_word_embeddings", True))
        ),
    }


def preset_flops_dimensions(preset: str) -> dict[str, int]:
    """:func:`flops_dimensions` of a model preset (``model.presets.PRESETS``) without building its config: what the
    packer deals rows by, before any model exists."""
    from types import SimpleNamespace

    from videollama3_train.model.presets import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    shape = PRESETS[preset]
    return flops_dimensions(SimpleNamespace(text_config=shape.text, vision_config=shape.vision))


def uniform_backward(model: nn.Module) -> None:
    """Make the LLM's input embeddings always require grad, so that backward runs through every LLM layer on every
    rank, whatever the micro-batch holds.

    Why: with a frozen LLM and a trainable tower (stage 1), a micro-batch with images sends gradient back through
    the LLM layers to the projector, while a text-only one has nothing in the LLM that requires grad and skips
    them. A sharded backend (FSDP2, ZeRO-3) re-gathers each layer's parameters in backward, so the two ranks would
    issue different collectives and hang (measured: a gloo size mismatch on the first step). The cost is the
    backward through a frozen LLM on text-only micro-batches.
    """
    base_model(model).enable_input_require_grads()


def apply_gradient_checkpointing(model: nn.Module, mode: str, every_n_layers: int = 1) -> None:
    """Activation checkpointing of the decoder layers of the chosen tower(s) (``"none" | "llm" | "vision" |
    "both"``), every ``every_n_layers``-th layer of each.

    transformers enables all ``GradientCheckpointingLayer``s at once; the layers of the tower that is not selected,
    and the ones between every n-th, are switched back off (docs/reference.md §5: every 2nd LLM layer is the fast setting).
    Non-reentrant, so frozen embeddings need no ``enable_input_require_grads``.
    """
    if mode == "none":
        return
    if mode not in (*TOWER_MODULES, "both"):
        raise ValueError(f"gradient checkpointing mode must be none, llm, vision or both, got {mode!r}")
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = base_model(model)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    selected = set(TOWER_MODULES.values()) if mode == "both" else {TOWER_MODULES[mode]}
    vision = TOWER_MODULES["vision"]
    index: dict[str, int] = defaultdict(int)
    for name, module in model.named_modules():
        if not isinstance(module, GradientCheckpointingLayer):
            continue
        tower = vision if f".{vision}." in f".{name}." else TOWER_MODULES["llm"]
        module.gradient_checkpointing = tower in selected and index[tower] % every_n_layers == 0
        index[tower] += 1


__all__ = [
    "TOWER_MODULES",
    "ULYSSES",
    "set_attention",
    "ulysses_slice",
    "use_llm_attention",
    "apply_gradient_checkpointing",
    "base_model",
    "flops_dimensions",
    "preset_flops_dimensions",
    "hidden_states",
    "memory_dimensions",
    "output_layer",
    "patch_dim",
    "visual_features",
]
