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

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ActivationModel",
    "FlopsShape",
    "SampleCostModel",
    "default_activation_gb",
    "MODEL_STATES",
    "parameter_count",
    "training_flops",
]


def sample_columns(
    costs: np.ndarray, merge: int, visual_tokens: np.ndarray | None, patches_sq: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(tokens, patches, visual, sq)`` per sample, float64, what the FLOPs and the memory model both read: tokens
    and patches of ``costs`` (failed rows ``-1`` count 0), visual LLM tokens (given where >= 0, else ``patches /
    merge^2``; never above the tokens) and the tower's ``sum P_f^2`` (given where >= 0, else one segment: ``P^2``)."""
    c = np.maximum(np.asarray(costs, dtype=np.float64)[:, :2], 0.0)
    tokens, patches = c[:, 0], c[:, 1]
    visual = patches / merge**2
    if visual_tokens is not None:
        given = np.asarray(visual_tokens, dtype=np.float64)
        visual = np.where(given >= 0, given, visual)
    sq = patches * patches
    if patches_sq is not None:
        given = np.asarray(patches_sq, dtype=np.float64)
        sq = np.where(given >= 0, given, sq)
    return tokens, patches, np.minimum(visual, tokens), sq


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
        tokens, patches, visual, sq = sample_columns(costs, self.merge, visual_tokens, patches_sq)
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


# ============================================================================================================
# Activation memory of a packed row (docs/packing.md, "Memory")
# ============================================================================================================

ATTENTION_KINDS = ("flash", "sdpa", "eager")  # how the attention workspace grows: linear / per-segment square


@dataclass(frozen=True)
class ActivationModel:
    """Predicted activation memory of one packed row in a training step (forward + backward), in bytes, from the
    model's dimensions and how it trains: ``peak = base + sum over samples of add_i + max over samples of peak_i``.

    ``add_i`` is linear in the sample's tokens, visual tokens, patches and tower ``sum P_f^2``: what its tokens and
    patches keep alive for the backward (every layer's input under checkpointing, every saved tensor of a layer
    without) plus one layer's recompute and backward workspace. ``peak_i``: the vision tower's attention workspace
    of its largest segment under ``sdpa`` / ``eager`` (the tower runs one segment at a time there), 0 with flash /
    varlen attention (linear, in ``add_i``). ``base``: what every row holds whatever its samples: the chunked
    loss's logits chunk and the output layer's fp32 weight gradient, and under ``sdpa`` / ``eager`` the LLM's
    ``(L, L)`` attention mask / scores at the row's token budget. The derivation, term by term: docs/packing.md.

    ``vision_heads``: the tower's attention heads. ``llm_checkpointed`` / ``vision_checkpointed`` /
    ``every_n_layers``: ``trainer.gradient_checkpointing`` and ``trainer.checkpoint_every_n_layers``.
    ``loss_chunk``: ``trainer.loss_chunk_size`` (label tokens per logits chunk). ``attention``: ``flash`` (varlen /
    FlashAttention), ``sdpa`` or ``eager``. ``act_bytes``: 2 for bf16 activations, 4 for fp32. ``max_tokens``: the
    row's token budget. ``merge``: the merge assumed where a sample's visual tokens are not known.
    """

    shape: FlopsShape
    vision_heads: int
    llm_checkpointed: bool = True
    vision_checkpointed: bool = True
    every_n_layers: int = 1
    loss_chunk: int = 4096
    attention: str = "flash"
    act_bytes: int = 2
    max_tokens: int = 16384
    merge: int = 1

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")

    # --- per token / patch coefficients (bytes) -------------------------------------------------------------
    def llm_layer_elements(self) -> int:
        """Elements one LLM layer saves per token for its backward (bf16 units): the two RMSNorms, which upcast to
        fp32 (input, normalised copy and their product with the weight, ~7d each), the normed inputs of q/k/v and of
        the MLP (2d), q and k before and after RoPE with the rotated halves (4(nq + nkv)hd, v and the attention
        output included) and RoPE's fp32 cos / sin (4hd), the MLP's gate, SiLU(gate), up and their product (4ff).
        Checked on CPU under bf16 autocast against the tensors autograd saves (B12: 136.8 KB per token and layer at
        the 2B shape; this count 136.2 KB) and against the GPU anchor of docs/reference.md §5 (139 KB)."""
        s = self.shape
        return 16 * s.d + 4 * (s.nq + s.nkv) * s.hd + 4 * s.hd + 4 * s.ff

    def vision_layer_elements(self) -> int:
        """Elements one tower layer saves per patch (bf16 units): its two LayerNorms (fp32 input under autocast and
        the bf16 copy its linears read), q/k/v around the 2D RoPE, the attention output, fc1's input and GELU's input
        and output (2ffv): ``10dv + 2ffv``, fitted to the tensors autograd saves at two tower shapes (B12: 9.9dv +
        2.0ffv; 40.1 KB per patch and layer at the 2B shape, this count 40.3 KB)."""
        s = self.shape
        return 10 * s.dv + 2 * s.ffv

    def _stored_layers(self, layers: int, checkpointed: bool) -> tuple[int, int]:
        """``(layers keeping only their input, layers keeping everything)``: checkpointed layers are 0, n, 2n..."""
        ck = -(-layers // self.every_n_layers) if checkpointed else 0
        return ck, layers - ck

    def per_token(self) -> int:
        """Bytes per LLM token: stored layer inputs / activations, one layer recomputed and back-propagated, the
        final norm and the hidden state handed to the loss (8d), the loss's fp32 logsumexp and token loss."""
        s, b = self.shape, self.act_bytes
        ck, full = self._stored_layers(s.Ll, self.llm_checkpointed)
        work = self.llm_layer_elements() * (
            2 if ck else 1
        )  # recompute (when checkpointed) + backward buffers
        return b * (ck * s.d + full * self.llm_layer_elements() + work + 8 * s.d) + 8

    def per_patch(self) -> int:
        """Bytes per tower patch: its fp32 pixels (4 x channels x patch^2), the patch embedding's input, stored layer
        inputs / activations, one layer recomputed and back-propagated, the post-LayerNorm (fp32 input)."""
        s, b = self.shape, self.act_bytes
        ck, full = self._stored_layers(s.Lv, self.vision_checkpointed)
        work = self.vision_layer_elements() * (2 if ck else 1)
        pix = s.channels * s.patch * s.patch
        return 4 * pix + b * (pix + ck * s.dv + full * self.vision_layer_elements() + work + 3 * s.dv)

    def per_visual_token(self) -> int:
        """Bytes per visual LLM token in the projector (its input and the GELU's input and output)."""
        return self.act_bytes * (self.shape.dv + 2 * self.shape.d)

    def per_segment_sq(self) -> int:
        """Bytes per unit of ``sum P_f^2`` kept for the backward: eager saves each layer's attention probabilities
        (heads x P_f^2, bf16) in every layer that keeps its activations, plus the recomputed one."""
        if self.attention != "eager":
            return 0
        ck, full = self._stored_layers(self.shape.Lv, self.vision_checkpointed)
        return self.vision_heads * self.act_bytes * (full + (1 if ck else 0))

    def base(self) -> int:
        """Bytes every row holds whatever its samples: one logits chunk (bf16 matmul output and its fp32 copy), the
        output layer's fp32 weight gradient, and under sdpa / eager the LLM's attention over the whole packed row
        (a bool (L, L) mask; eager: fp32 scores and softmax, bf16 probabilities saved per layer) at L = max_tokens."""
        s = self.shape
        chunk = min(self.loss_chunk, self.max_tokens)
        out = chunk * s.V * (self.act_bytes + 4) + s.V * s.d * 4
        sq = self.max_tokens * self.max_tokens
        if self.attention == "sdpa":
            out += sq
        elif self.attention == "eager":
            ck, full = self._stored_layers(s.Ll, self.llm_checkpointed)
            out += sq + s.nq * sq * (8 + self.act_bytes * (full + (1 if ck else 0)))
        return int(out)

    def sample_memory(
        self,
        costs: np.ndarray,
        *,
        visual_tokens: np.ndarray | None = None,
        patches_sq: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(add, peak)``, int64 ``(N,)`` bytes of each sample of ``costs`` (``(N, 2)``: tokens, patches; failed rows
        ``-1`` count 0); ``visual_tokens`` / ``patches_sq`` per sample where known (negative: not known), else
        estimated as for the FLOPs (visual ``patches / merge^2``, one tower segment). The largest segment's
        ``P_f^2`` is bounded by ``sum P_f^2`` (exact for one image, above it for several images or frames)."""
        tokens, patches, visual, sq = sample_columns(costs, self.merge, visual_tokens, patches_sq)
        add = (
            tokens * self.per_token()
            + visual * self.per_visual_token()
            + patches * self.per_patch()
            + sq * self.per_segment_sq()
        )
        # one segment's attention at a time in the tower under sdpa / eager: fp32 scores and softmax
        peak = sq * self.vision_heads * 8 if self.attention != "flash" else np.zeros_like(sq)
        return np.ceil(add).astype(np.int64), np.ceil(peak).astype(np.int64)

    def bound(self, table: np.ndarray, limit_bytes: int, budgets: tuple[int, int] | None = None):
        """The packer's :class:`~.binpack.MemoryBound` of the samples of ``table`` (a cost table: tokens, patches
        and, when present, the visual-token and ``sum P_f^2`` columns) under ``limit_bytes`` per row. With
        ``budgets`` (the row's tokens and patches) it carries an upper bound of any row's peak: every token visual,
        ``sum P_f^2 <= (sum P)^2``, the largest workspace of all samples."""
        from .binpack import MemoryBound
        from .costs import PATCHES_SQ, VISUAL_TOKENS

        extra = {}
        if table.shape[1] > PATCHES_SQ:
            extra = {"visual_tokens": table[:, VISUAL_TOKENS], "patches_sq": table[:, PATCHES_SQ]}
        add, peak = self.sample_memory(table[:, :2], **extra)
        cap = None
        if budgets is not None:
            t, p = budgets
            cap = self.base() + t * (self.per_token() + self.per_visual_token()) + p * self.per_patch()
            cap += self.per_segment_sq() * p * p + int(peak.max(initial=0))
        return MemoryBound(add, peak, self.base(), int(limit_bytes), cap)


def parameter_count(shape: FlopsShape, *, tied: bool = True) -> int:
    """Parameters of a model of ``shape``: LLM layers (weights, q/k/v biases, two norms), final norm, embeddings
    (and an untied output layer), tower layers (weights, biases, two LayerNorms), patch embedding, post-LayerNorm,
    projector."""
    s = shape
    layers = s.Ll * (s.llm_layer_weights() + (s.nq + 2 * s.nkv) * s.hd + 2 * s.d)
    llm = layers + s.d + s.V * s.d * (1 if tied else 2)
    vit = s.tower_weights() + s.Lv * (4 * s.dv + s.ffv + s.dv + 4 * s.dv) + 3 * s.dv
    projector = s.dv * s.d + s.d * s.d + 2 * s.d
    return int(llm + vit + projector)


# bytes per parameter of the model states a rank holds: fp32 weights, fp32 gradients, AdamW's two fp32 moments, and
# the bf16 copy of each weight that autocast makes and keeps for the backward (B12: 89 MB per 2B LLM layer, 2 bytes
# for each of its 47M weights)
_STATES = {"weights": 4, "grads": 4, "adam": 8, "bf16": 2}
# the names of those states (a backend names the ones it shards: ``trainer.backend.sharded_states``)
MODEL_STATES = tuple(_STATES)


def default_activation_gb(
    shape: FlopsShape, *, tied: bool, sharded: Collection[str], world_size: int, device_gb: float = 80.0
) -> float:
    """The default bound on a row's predicted activation peak (GB, 1e9 bytes): ``device_gb`` (80: an H100 / A100
    80GB, the recipes' device) less 10% kept free (CUDA context, allocator fragmentation, communication buffers)
    less the model states one rank holds over ``world_size`` ranks, those named in ``sharded`` (of
    :data:`MODEL_STATES`) divided among them (fp32 weights, gradients and
    AdamW moments and autocast's bf16 weight copies, 18 bytes per parameter, trainable or not: an upper bound for a
    stage that freezes a tower). 0 when the states alone do not fit."""
    n = parameter_count(shape, tied=tied)
    per_param = sum(size / (world_size if name in sharded else 1) for name, size in _STATES.items())
    return max(0.0, 0.9 * device_gb - n * per_param / 1e9)
