"""Predicted training FLOPs of a sample, a packed row and a step: the one formula of docs/reference.md §6, shared by
the packer (rows dealt by predicted compute) and the MFU metric (``trainer.metrics.flops_per_step`` calls
:func:`training_flops`). The derivation is in docs/packing.md.

Everything here is plain numbers: the model's dimensions come in as a :class:`FlopsShape` (``model.api.
flops_dimensions`` reads them from a config; ``data/`` never imports the model), and the counts as Python ints (exact,
for the metric) or numpy arrays (one value per sample, for the packer).

The packer knows a sample by its cost-table row: ``(tokens, patches)`` and, from the cost pass (``data.costs``,
``encode.Plan.cost_row``), the visual tokens that reach the LLM and the tower's ``sum P_f^2`` over its attention
segments (images and frames). The tokens whose logits are computed are taken as the text tokens. Where the table
does not carry the last two (a table cached before they existed, or ``-1`` for a sample) they are estimated
(:class:`SampleCostModel`): visual tokens ``patches / merge^2``, one tower segment per sample (``P^2``: exact for one
image, an upper bound for a video, whose frames are separate segments).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FlopsShape", "SampleCostModel", "training_flops"]


@dataclass(frozen=True)
class FlopsShape:
    """The dimensions docs/reference.md §6 uses (names kept as there).

    LLM: hidden ``d``, query heads ``nq``, KV heads ``nkv``, head dim ``hd``, MLP intermediate ``ff``, layers
    ``Ll``, vocabulary ``V``. Vision tower: hidden ``dv``, MLP intermediate ``ffv``, layers ``Lv``, patch side
    ``patch`` in pixels (14 for every VideoLLaMA3 checkpoint; docs/reference.md §6 writes the constant 14).
    """

    d: int
    nq: int
    nkv: int
    hd: int
    ff: int
    Ll: int
    V: int
    dv: int
    ffv: int
    Lv: int
    patch: int = 14
    channels: int = 3

    def llm_layer_weights(self) -> int:
        """``W_layer``: q, k, v, o and the SwiGLU MLP of one LLM layer (multiply-accumulates per token)."""
        s = self
        return s.d * s.nq * s.hd + 2 * s.d * s.nkv * s.hd + s.nq * s.hd * s.d + 3 * s.d * s.ff

    def tower_weights(self) -> int:
        """``W_vit``: the tower's layers plus the patch-embedding matmul (``channels * patch^2 x dv``)."""
        s = self
        return s.Lv * (4 * s.dv * s.dv + 2 * s.dv * s.ffv) + s.channels * s.patch * s.patch * s.dv


def training_flops(
    shape: FlopsShape,
    *,
    tokens: Any,
    logit_tokens: Any,
    tokens_sq: Any,
    visual_llm_tokens: Any,
    patches: Any,
    patches_sq: Any,
    llm_trains: bool,
    vision_trains: bool,
) -> dict[str, Any]:
    """Training FLOPs (3x forward; recomputation not counted), term by term, docs/reference.md §6.

    ``tokens``: real LLM tokens; ``logit_tokens``: positions whose logits are computed; ``tokens_sq``: the sum of
    each sample's length squared (varlen attention runs per sample); ``visual_llm_tokens``: visual tokens reaching
    the LLM (projector); ``patches``: tower patches; ``patches_sq``: the sum of each image's / frame's patches
    squared (the tower attends per image and per frame). Python ints give exact ints; numpy arrays give one value
    per element (float64). A frozen LLM costs forward + input-gradient backward (``kl = 4``, gradients flow through
    it to the projector); a frozen tower its forward only (``kv = 2``); the projector always trains (6).
    Returns ``F_llm``, ``F_head``, ``F_attn``, ``F_proj``, ``F_vit``.
    """
    s = shape
    kl = 6 if llm_trains else 4
    kv = 6 if vision_trains else 2
    return {
        "F_llm": kl * s.Ll * s.llm_layer_weights() * tokens,
        "F_head": kl * s.d * s.V * logit_tokens,
        "F_attn": kl * s.Ll * s.nq * s.hd * tokens_sq,  # causal: half of 2 * kl
        "F_proj": 6 * (s.dv * s.d + s.d * s.d) * visual_llm_tokens,
        "F_vit": kv * s.tower_weights() * patches + 2 * kv * s.Lv * s.dv * patches_sq,
    }


@dataclass(frozen=True)
class SampleCostModel:
    """Predicted training FLOPs per sample from a cost table, for the packer.

    ``merge``: the spatial merge assumed for the patches of a sample whose visual tokens are not given (1: images
    at stages 1-3; 2: videos and stage-4 images; visual tokens = ``patches / merge^2``).
    """

    shape: FlopsShape
    llm_trains: bool = True
    vision_trains: bool = True
    merge: int = 1

    def sample_flops(
        self,
        costs: np.ndarray,
        *,
        visual_tokens: np.ndarray | None = None,
        patches_sq: np.ndarray | None = None,
    ) -> np.ndarray:
        """``(N,)`` predicted FLOPs of each sample of ``costs`` (``(N, 2)``: tokens, patches; failed rows ``-1`` cost
        0). ``visual_tokens`` / ``patches_sq`` per sample when known (a negative value: not known), else estimated
        (module docstring). A row's FLOPs are the sum of its samples' (every term of the formula is a sum over
        samples and segments)."""
        c = np.maximum(np.asarray(costs, dtype=np.float64)[:, :2], 0.0)
        tokens, patches = c[:, 0], c[:, 1]
        visual = patches / self.merge**2
        if visual_tokens is not None:
            given = np.asarray(visual_tokens, dtype=np.float64)
            visual = np.where(given >= 0, given, visual)
        visual = np.minimum(visual, tokens)
        sq = patches * patches
        if patches_sq is not None:
            given = np.asarray(patches_sq, dtype=np.float64)
            sq = np.where(given >= 0, given, sq)
        terms = training_flops(
            self.shape,
            tokens=tokens,
            logit_tokens=tokens - visual,
            tokens_sq=tokens * tokens,
            visual_llm_tokens=visual,
            patches=patches,
            patches_sq=sq,
            llm_trains=self.llm_trains,
            vision_trains=self.vision_trains,
        )
        return sum(terms.values())
