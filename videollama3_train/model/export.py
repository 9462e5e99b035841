"""Export to a transformers-native directory that loads offline with the Auto classes.

Writes ``config.json``, safetensors weights (sharded above ``max_shard_size``), ``generation_config.json``, the
tokenizer with its chat template and the processor configs. Written into ``<out>.tmp`` and renamed, so a directory
named ``out`` is always complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch


def export_hf(
    model, processor, out_dir: str | os.PathLike, *, max_shard_size: str = "5GB", dtype=None
) -> Path:
    """Save ``model`` (unwrapped; PEFT adapters merged) and ``processor`` to ``out_dir`` atomically."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model = merge_adapters(model)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    processor.save_pretrained(tmp)
    old = out.with_name(out.name + ".old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return out


def merge_adapters(model):
    """A PEFT model merged into its base weights; any other model unchanged."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


@torch.no_grad()
def state_dict_for_export(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in merge_adapters(model).state_dict().items()}
