"""B12: the activation-memory model's per-token count of an LLM layer and per-patch count of a tower layer
(``data/cost_model.py`` ``ActivationModel.llm_layer_elements`` / ``vision_layer_elements``) against what autograd
actually saves, on CPU.

A slice of the 2B preset's LLM (its dimensions, 2 layers, a 1,024-entry vocabulary) runs one packed row forward
under bf16 autocast (as on a GPU: matmuls in bf16, RMSNorm in fp32); ``torch.autograd.graph.saved_tensors_hooks``
records every tensor saved for the backward, counted once per storage. Two row lengths separate the per-token part
(what the packer's bound sums over samples) from the per-layer constant (autocast's bf16 copies of the weights):
``saved(L) = L * per_token + const``. The tower (2B dimensions, ``--layers`` layers) likewise, on four images of
16 x 16 and of 24 x 24 patches.

    python benchmarks/bench_activation.py --lengths 1024 2048
"""

from __future__ import annotations

import argparse
import json

import torch


def saved_bytes(llm, hidden: int, length: int) -> int:
    """Bytes of the distinct storages autograd saves in one forward of a packed row of ``length`` tokens (four
    samples: per-sample positions, no mask, as training packs them)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    pos = torch.cat([torch.arange(n) for n in (length // 4,) * 4])[None]
    x = torch.randn(1, length, hidden, requires_grad=True)
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        llm(inputs_embeds=x, position_ids=pos, use_cache=False)
    return sum(seen.values())


def tower_saved_bytes(tower, patch_dim: int, side: int, images: int) -> int:
    """Bytes of the distinct storages autograd saves in one tower forward over ``images`` square images of
    ``side x side`` patches (merge 1), fp32 pixels under bf16 autocast."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    pixels = torch.randn(images * side * side, patch_dim, requires_grad=True)
    grid = torch.tensor([[1, side, side]] * images)
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        tower(pixels, grid_thw=grid, merge_sizes=torch.ones(images, dtype=torch.long))
    return sum(seen.values())


def main(argv: list[str] | None = None) -> None:
    from transformers import VideoLlama3ForConditionalGeneration

    from videollama3_train.data.cost_model import ActivationModel, FlopsShape
    from videollama3_train.model.api import flops_dimensions
    from videollama3_train.model.presets import ModelShape, TextShape, VisionShape, build_model_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs=2, default=[1024, 2048])
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    # the 2B preset's dimensions, ``--layers`` layers in each tower, a small vocabulary (no LM head is run)
    shape = ModelShape(
        vision=VisionShape(num_hidden_layers=args.layers),
        text=TextShape(num_hidden_layers=args.layers, vocab_size=1024),
    )
    config = build_model_config(shape, image_token_id=0, video_token_id=1, attn_implementation="sdpa")
    full = VideoLlama3ForConditionalGeneration(config).model
    (l1, l2), hidden = args.lengths, config.text_config.hidden_size
    s1, s2 = (saved_bytes(full.language_model, hidden, n) for n in (l1, l2))
    per_token = (s2 - s1) / (l2 - l1) / args.layers
    const = (s1 - l1 * per_token * args.layers) / args.layers
    am = ActivationModel(FlopsShape(**flops_dimensions(config)), 16)
    model = am.llm_layer_elements() * 2
    # the tower: 4 images of 16 x 16 patches against 4 of 24 x 24 (same segments, more patches)
    patch_dim = 3 * 14 * 14
    v1, v2 = (tower_saved_bytes(full.vision_model, patch_dim, side, 4) for side in (16, 24))
    per_patch = (v2 - v1) / (4 * (24 * 24 - 16 * 16)) / args.layers
    out = {
        "per_token_per_layer_measured": per_token,
        "per_token_per_layer_model": model,
        "model_over_measured": model / per_token,
        "per_layer_constant_bytes": const,
        "tower_per_patch_per_layer_measured": per_patch,
        "tower_per_patch_per_layer_model": am.vision_layer_elements() * 2,
        "tower_model_over_measured": am.vision_layer_elements() * 2 / per_patch,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
