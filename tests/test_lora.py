"""LoRA fine-tuning of a released (transformers-native) checkpoint: adapters only train, the export is merged.

The fast tests cover ``model.lora.apply_lora`` and the component groups with adapter names; the fit test trains two
steps through the real loop; the slow tests run ``stage=finetune lora.enabled=true`` from a native directory, the
way docs/finetune.md describes, and compare the merged export with the checkpoint it started from.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_worker import ListLoader, tiny_setup, train_batches

from videollama3_train.model.groups import (
    apply_trainable,
    build_param_groups,
    group_of,
    named_group_parameters,
)
from videollama3_train.model.lora import LoraConfig, apply_lora

LLM_TARGET = re.compile(
    r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\."
)
VISION_TARGET = re.compile(
    r"model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\."
)
STAGE4_LRS = {"vision": 2e-6, "projector": 1e-5, "llm": 1e-5}


def _base_name(name: str) -> str:
    """A PEFT parameter name -> the plain model's name (``base_model.model.`` and ``base_layer.`` removed)."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _is_target(name: str, vision: bool) -> bool:
    return bool(LLM_TARGET.match(name) or (vision and VISION_TARGET.match(name)))


# ----------------------------------------------------------------------------------------------------------------
# apply_lora + component groups
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vision", [False, True])
def test_apply_lora_targets_and_groups(vision: bool) -> None:
    model, _ = tiny_setup()
    peft = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, vision=vision))
    adapters = [n for n, _ in peft.named_parameters() if "lora_" in n]
    assert adapters
    hosts = {_base_name(n).split(".lora_")[0] + "." for n in adapters}
    assert all(_is_target(h, vision) for h in hosts), sorted(hosts)
    assert any(LLM_TARGET.match(h) for h in hosts)
    assert any(VISION_TARGET.match(h) for h in hosts) is vision
    # Every adapter belongs to its host's group.
    groups = named_group_parameters(peft)
    for g, params in groups.items():
        for n, _ in params:
            if "lora_" in n:
                assert group_of(n.split(".lora_")[0]) == g


@pytest.mark.parametrize("vision", [False, True])
def test_apply_trainable_with_lora_trains_adapters_and_projector(vision: bool) -> None:
    model, _ = tiny_setup()
    peft = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, vision=vision))
    lrs = dict(STAGE4_LRS, vision=STAGE4_LRS["vision"] if vision else None)
    apply_trainable(peft, lrs, lora=True)
    for n, p in peft.named_parameters():
        g = group_of(n.split(".lora_")[0])
        expected = ("lora_" in n and lrs[g] is not None) or g == "projector"
        assert p.requires_grad is expected, n
    names = {g["name"] for g in build_param_groups(peft, lrs)}
    assert {"projector", "llm"} <= names and ("vision" in names) is vision


def test_apply_trainable_with_lora_keeps_frozen_group_frozen() -> None:
    """Stage-1-like lrs (LLM frozen): LLM adapters stay frozen too."""
    model, _ = tiny_setup()
    peft = apply_lora(model, LoraConfig(enabled=True, r=4))
    apply_trainable(peft, {"vision": 1e-5, "projector": 1e-3, "llm": None}, lora=True)
    assert not any(
        p.requires_grad for n, p in peft.named_parameters() if group_of(n.split(".lora_")[0]) == "llm"
    )


# ----------------------------------------------------------------------------------------------------------------
# fit() on a PEFT model
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_fit_on_lora_model_trains_only_adapters_and_projector(tmp_path: Path) -> None:
    """Two steps of the real loop on ``apply_lora(model)``, as ``run_stage`` calls it with lora.enabled=true.

    Fails while fit() reaches the model as ``model.model`` (through the PEFT wrapper that is the whole
    ``VideoLlama3ForConditionalGeneration``, whose output has no ``last_hidden_state``) or while it calls
    ``apply_trainable`` without ``lora=True`` (every base weight of a group with an lr would train).
    """
    from videollama3_train.trainer import TrainConfig, fit

    model, tok = tiny_setup()
    peft = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    before = {n: p.detach().clone() for n, p in peft.named_parameters()}
    cfg = TrainConfig(
        lr_vision=None,
        lr_projector=1e-3,
        lr_llm=1e-3,
        precision="fp32",
        save_every=0,
        log_every=1,
        lr_schedule="constant",
        warmup_ratio=0.0,
        max_steps=2,
    )
    fit(peft, ListLoader(train_batches(tok, n=2)), cfg, out_dir=tmp_path / "run")
    after = dict(peft.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert any("lora_B" in n for n in changed)  # B starts at zero: a changed B means the adapter trained
    assert any(group_of(n) == "projector" for n in changed)
    wrong = sorted(n for n in changed if "lora_" not in n and group_of(n) != "projector")
    assert not wrong, f"base weights changed under LoRA: {wrong[:5]}"


# ----------------------------------------------------------------------------------------------------------------
# stage=finetune lora.enabled=true from a released checkpoint, end to end
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """A 'released checkpoint': a transformers-native directory (weights, config, tokenizer, processor)."""
    from videollama3_train.model.core import ModelConfig, build_model
    from videollama3_train.model.export import export_hf
    from videollama3_train.model.tokenizer import build_processor, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_model(ModelConfig(preset="tiny", attn_implementation="sdpa", seed=7), tok)
    return export_hf(model, build_processor(tok), tmp_path_factory.mktemp("released") / "VideoLLaMA3-tiny-HF")


@pytest.fixture(scope="module")
def own_data(tmp_path_factory) -> Path:
    from test_sample_data import gen

    out = tmp_path_factory.mktemp("own_data")
    gen.generate(out, seed=5, n_train=24, n_heldout=4)
    return out


def _load(path: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()


def _logits(model, processor) -> torch.Tensor:
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[img], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("vision", [False, True], ids=["llm", "llm+vision"])
def test_finetune_lora_from_released_checkpoint(tmp_path: Path, released: Path, own_data: Path, vision: bool):
    from safetensors import safe_open
    from transformers import AutoProcessor

    from videollama3_train.config import compose_stage
    from videollama3_train.run import run_stage

    overrides = [
        "model=tiny",
        "data=file",
        f"data.path={own_data / 'train.jsonl'}",
        f"data.root={own_data}",
        f"data.heldout_path={own_data / 'heldout.jsonl'}",
        "logger=disabled",
        "lora.enabled=true",
        f"lora.vision={str(vision).lower()}",
        "lora.dropout=0",
        "trainer.max_steps=3",
        "trainer.precision=fp32",
        # LLM-only LoRA: the tower has no adapters, so freeze it (it would otherwise train in full at lr_vision).
        *([] if vision else ["trainer.lr_vision=null"]),
    ]
    cfg = compose_stage("finetune", overrides, tmp_path / "ft", str(released))
    assert cfg.stage == "finetune" and cfg.lora.enabled and cfg.init_from == str(released)
    result = run_stage(cfg)
    export = Path(result["export"])

    # Merged: plain native key names only.
    keys = []
    for f in sorted(export.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys += list(st.keys())
    assert keys and not [k for k in keys if "lora_" in k or "base_layer" in k]

    base, tuned = _load(released), _load(export)
    processor = AutoProcessor.from_pretrained(export, local_files_only=True)
    b, t = base.state_dict(), tuned.state_dict()
    assert b.keys() == t.keys()
    changed = {k for k in b if not torch.equal(b[k], t[k])}
    assert any(LLM_TARGET.match(k) for k in changed)
    assert any(VISION_TARGET.match(k) for k in changed) is vision
    assert any(k.startswith("model.projector.") for k in changed)
    # Norms, embeddings, the tower without adapters: untouched.
    wrong = sorted(k for k in changed if not (_is_target(k, vision) or k.startswith("model.projector.")))
    assert not wrong, f"weights without adapters changed: {wrong[:5]}"
    assert not torch.allclose(_logits(base, processor), _logits(tuned, processor))
    # The merged export is an ordinary native checkpoint: a further stage can start from it.
    assert tuned.config.model_type == base.config.model_type == "video_llama_3"
