"""LoRA adapters on the model's linear layers (peft), for fine-tuning a released checkpoint.

Adapters sit on the LLM's attention and MLP projections and, with ``vision=True``, on the vision tower's. Each
adapter belongs to its host layer's component group (``model/groups.py``), so a group without a learning rate
keeps its adapters frozen too. The stage export merges the adapters into the base weights (``model/export.py``).
Reference: peft ``LoraConfig`` / ``get_peft_model``; the layer names are transformers'
``modeling_video_llama_3.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Linear layers that get adapters, as regular expressions over the unwrapped model's parameter paths.
LLM_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
VISION_TARGETS = r"model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))"


@dataclass
class LoraConfig:
    # train low-rank adapters instead of full weights (the export merges them into the base weights)
    enabled: bool = False
    r: int = 16  # adapter rank (inner dimension of the two low-rank matrices)
    alpha: int = 32  # adapter scale numerator: the update is scaled by alpha / r (dimensionless)
    dropout: float = 0.05  # dropout probability on the adapter's input, in [0, 1)
    vision: bool = False  # also put adapters on the vision tower's linear layers (else LLM only)

    def __post_init__(self):
        if self.r < 1 or self.alpha <= 0:
            raise ValueError(f"lora.r must be >= 1 and lora.alpha > 0, got r={self.r}, alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


def apply_lora(model, cfg: LoraConfig):
    """``model`` wrapped with peft LoRA adapters on the LLM's (and with ``cfg.vision`` the tower's) linear layers."""
    try:
        from peft import LoraConfig as PeftLora
        from peft import get_peft_model
    except ImportError as e:
        raise ImportError(
            "lora.enabled=true needs the peft package: pip install 'videollama3-train[lora]'"
        ) from e
    target = f"({LLM_TARGETS}|{VISION_TARGETS})" if cfg.vision else LLM_TARGETS
    pcfg = PeftLora(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target)
    return get_peft_model(model, pcfg)
