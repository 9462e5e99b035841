"""Held-out evaluation: loss, exact-match accuracy and a few logged generations.

Exact match is measured by teacher forcing: greedy decoding reproduces the reference answer (and its closing
``<|im_end|>``) exactly when, at every answer position, the argmax given the reference prefix is the reference
token. So one forward pass per sample gives the accuracy that greedy ``generate`` would, without the decode loop;
a few real ``generate`` calls are logged so people see what the model says.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch

from .data.collate import VISUAL_KEYS, forward_kwargs

log = logging.getLogger(__name__)


def _batch_of(sample: dict[str, Any], device) -> dict[str, Any]:
    out = {"input_ids": sample["input_ids"].unsqueeze(0).to(device)}
    for k in VISUAL_KEYS:
        if k in sample:
            out[k] = sample[k].to(device)
    return out


@torch.no_grad()
def score_sample(model, sample: dict[str, Any], device) -> tuple[float, int, bool]:
    """``(sum of token losses, label tokens, exact match)`` of one encoded sample."""
    batch = _batch_of(sample, device)
    hidden = model.model(**forward_kwargs(batch), use_cache=False).last_hidden_state[0]  # (L, d)
    labels = sample["labels"].to(device)
    targets = labels[1:]
    pos = torch.nonzero(targets != -100).flatten()
    if pos.numel() == 0:
        return 0.0, 0, False
    logits = model.lm_head(hidden[pos]).float()  # (n, V): label positions only
    loss = torch.nn.functional.cross_entropy(logits, targets[pos], reduction="sum")
    exact = bool((logits.argmax(-1) == targets[pos]).all())
    return float(loss), int(pos.numel()), exact


@torch.no_grad()
def generate_answer(model, sample: dict[str, Any], tokenizer, device, max_new_tokens: int = 8) -> str | None:
    """Greedy answer to the prompt that precedes the sample's first labelled token (None if media follow it)."""
    labels = sample["labels"]
    first = torch.nonzero(labels != -100).flatten()
    if first.numel() == 0:
        return None
    cut = int(first[0])
    ids = sample["input_ids"][:cut]
    media = (model.config.image_token_id, model.config.video_token_id)
    total_media = int(sum((sample["input_ids"] == m).sum() for m in media))
    if int(sum((ids == m).sum() for m in media)) != total_media:
        return None  # media after the first answer: the prompt alone cannot carry them
    batch = _batch_of({**sample, "input_ids": ids}, device)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, cut:], skip_special_tokens=True)


def evaluate_heldout(
    model,
    samples: list[tuple[dict[str, Any], dict[str, Any]]],
    *,
    tokenizer,
    device=None,
    num_generations: int = 4,
    max_new_tokens: int = 8,
) -> dict[str, Any]:
    """``samples``: ``(encoded sample, raw record)`` pairs. Returns loss, accuracy (overall and per modality),
    the chance level when records list their ``choices``, and a few generations."""
    if hasattr(model, "get_base_model"):  # PEFT: adapters live inside the base model
        model = model.get_base_model()
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, n_tok, hits, chance = 0.0, 0, 0, []
    per_mod: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    generations = []
    try:
        for i, (sample, raw) in enumerate(samples):
            loss, n, exact = score_sample(model, sample, device)
            loss_sum, n_tok, hits = loss_sum + loss, n_tok + n, hits + int(exact)
            mod = sample["meta"]["modality"]
            per_mod[mod][0] += int(exact)
            per_mod[mod][1] += 1
            if isinstance(raw, dict) and raw.get("choices"):
                chance.append(1.0 / len(raw["choices"]))
            if i < num_generations:
                text = generate_answer(model, sample, tokenizer, device, max_new_tokens)
                generations.append({"modality": mod, "generated": text, "reference": raw.get("answer")})
    finally:
        model.train(was_training)
    n = len(samples)
    return {
        "n": n,
        "loss": loss_sum / max(n_tok, 1),
        "accuracy": hits / max(n, 1),
        "accuracy_per_modality": {m: h / t for m, (h, t) in per_mod.items()},
        "chance": sum(chance) / len(chance) if chance else None,
        "generations": generations,
    }
