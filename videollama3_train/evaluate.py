"""Held-out evaluation: loss, exact-match accuracy by greedy generation, and a same-metric baseline, per task.

What is measured, per encoded held-out sample:

* ``loss``: teacher-forced cross-entropy over every labelled token (all assistant turns), averaged over tokens.
* ``accuracy``: greedy ``generate`` (``do_sample=False``, at most ``max_new_tokens`` new tokens) from the prompt
  that precedes the sample's first assistant turn -- the encoded prompt, i.e. exactly the ChatML text the model was
  trained on up to ``<|im_start|>assistant\\n``, which is what ``processor.apply_chat_template(...,
  add_generation_prompt=True)`` produces (tests/test_evaluate.py checks both agree) -- with only the media whose
  placeholders lie in that prompt. A sample is correct when the model ends its turn (``<|im_end|>`` or another
  stop id) within ``max_new_tokens`` and the decoded text equals the reference answer after stripping whitespace.
  The reference is the first assistant turn as encoded in the labels. This is open-vocabulary exact match:
  nothing restricts the model to a closed answer set. Generations that hit ``max_new_tokens`` before ending the
  turn are wrong and counted in ``unfinished``.
* ``teacher_forced_accuracy`` (diagnostic): the argmax at every labelled position equals the label. It agrees
  with ``accuracy`` unless a generation is cut by ``max_new_tokens``, the model ends its turn with a different
  stop id, or it spells the answer with other tokens than the reference's.
* ``baseline``: the same exact match for a model that always gives the task's most frequent training answer
  (:func:`majority_answers`); the level accuracy must beat to show learning (``chance = 1 / len(choices)`` is no
  reference for an open-vocabulary metric). A record's task is its ``"task"`` field, else its modality
  (``text`` / ``image`` / ``video`` / ``mixed``).

Held-out records that could not be encoded are not scored; pass their count as ``bad_records`` and it is reported.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import torch

from .data.collate import IGNORE_INDEX, VISUAL_KEYS, forward_kwargs

log = logging.getLogger(__name__)

_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


# ----------------------------------------------------------------------------------------------------------------
# Records: task label and reference answer
# ----------------------------------------------------------------------------------------------------------------


def _normalized(raw: dict[str, Any]) -> dict[str, Any] | None:
    from .data.annotations import normalize_record
    from .data.errors import DataError

    try:
        return normalize_record(raw)
    except DataError:
        return None


def _modality(rec: dict[str, Any]) -> str:
    kinds = {it["type"] for m in rec["messages"] for it in m["content"] if it["type"] in ("image", "video")}
    return kinds.pop() if len(kinds) == 1 else ("text" if not kinds else "mixed")


def record_task(raw: dict[str, Any], default: str | None = None) -> str:
    """A raw record's task: its ``"task"`` field, else ``default``, else its modality (``"unknown"`` if the record
    cannot be read)."""
    task = raw.get("task") if isinstance(raw, dict) else None
    if isinstance(task, str) and task:
        return task
    if default is not None:
        return default
    rec = _normalized(raw)
    return _modality(rec) if rec is not None else "unknown"


def first_answer(raw: dict[str, Any]) -> str | None:
    """The text of a raw record's first assistant turn (either schema), stripped; None if unreadable."""
    rec = _normalized(raw)
    if rec is None:
        return None
    for m in rec["messages"]:
        if m["role"] == "assistant":
            return "".join(it["text"] for it in m["content"] if it["type"] == "text").strip()
    return None


def majority_answers(train_records: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Per task (:func:`record_task`), the most frequent first answer in the training records (ties: the
    alphabetically first). Unreadable records are skipped. The ``baseline_answers`` of :func:`evaluate_heldout`."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for raw in train_records:
        answer = first_answer(raw)
        if answer is not None:
            counts[record_task(raw)][answer] += 1
    return {task: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for task, c in counts.items()}


def majority_baseline(
    train_records: Iterable[dict[str, Any]], heldout_records: Iterable[dict[str, Any]]
) -> dict[str, Any]:
    """The baseline without a model: exact match of always answering each task's majority training answer,
    on the raw held-out records. ``{"baseline", "baseline_per_task", "n_per_task", "baseline_answers"}``."""
    answers = majority_answers(train_records)
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for raw in heldout_records:
        task = record_task(raw)
        hits[task][0] += int(answers.get(task) is not None and answers.get(task) == first_answer(raw))
        hits[task][1] += 1
    n = sum(t for _, t in hits.values())
    return {
        "baseline": sum(h for h, _ in hits.values()) / n if n else None,
        "baseline_per_task": {task: h / t for task, (h, t) in sorted(hits.items())},
        "n_per_task": {task: t for task, (_, t) in sorted(hits.items())},
        "baseline_answers": answers,
    }


def prompt_and_media(raw: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The text of a raw record's first user turn and the media items before its first answer (``{"type", "path",
    "start", "end"}``): what a predictions table shows beside the answer."""
    rec = _normalized(raw)
    if rec is None:
        return "", []
    text, media = [], []
    for m in rec["messages"]:
        if m["role"] == "assistant":
            break
        if m["role"] != "user":
            continue
        for it in m["content"]:
            if it["type"] == "text":
                text.append(it["text"])
            else:
                media.append(it)
    return "".join(text).strip(), media


# ----------------------------------------------------------------------------------------------------------------
# One sample
# ----------------------------------------------------------------------------------------------------------------


def _batch_of(sample: dict[str, Any], device) -> dict[str, Any]:
    out = {"input_ids": sample["input_ids"].unsqueeze(0).to(device)}
    for k in VISUAL_KEYS:
        if k in sample:
            out[k] = sample[k].to(device)
    return out


@torch.no_grad()
def score_sample(model, sample: dict[str, Any], device) -> tuple[float, int, bool]:
    """``(sum of token losses, label tokens, teacher-forced exact match)`` of one encoded sample."""
    batch = _batch_of(sample, device)
    hidden = model.model(**forward_kwargs(batch), use_cache=False).last_hidden_state[0]  # (L, d)
    labels = sample["labels"].to(device)
    targets = labels[1:]
    pos = torch.nonzero(targets != IGNORE_INDEX).flatten()
    if pos.numel() == 0:
        return 0.0, 0, False
    logits = model.lm_head(hidden[pos]).float()  # (n, V): label positions only
    loss = torch.nn.functional.cross_entropy(logits, targets[pos], reduction="sum")
    exact = bool((logits.argmax(-1) == targets[pos]).all())
    return float(loss), int(pos.numel()), exact


def stop_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an assistant turn: ``<|im_end|>``, ``<|endoftext|>`` and the model's eos ids."""
    ids: set[int] = set()
    unk = getattr(tokenizer, "unk_token_id", None)
    for tok in _STOP_TOKENS:
        i = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(i, int) and i >= 0 and i != unk:
            ids.add(i)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return sorted(ids)


def first_answer_span(labels: torch.Tensor) -> tuple[int, int] | None:
    """``[start, end)`` of the first run of labelled positions (the first assistant turn with its stop token)."""
    pos = torch.nonzero(labels != IGNORE_INDEX).flatten()
    if pos.numel() == 0:
        return None
    start = int(pos[0])
    gaps = torch.nonzero(pos[1:] - pos[:-1] != 1).flatten()
    end = int(pos[int(gaps[0])]) + 1 if gaps.numel() else int(pos[-1]) + 1
    return start, end


def reference_text(sample: dict[str, Any], tokenizer, stops: Iterable[int]) -> str | None:
    """The first assistant turn of an encoded sample, decoded from its labels (stop tokens dropped), stripped."""
    span = first_answer_span(sample["labels"])
    if span is None:
        return None
    stops = set(stops)
    ids = [int(t) for t in sample["input_ids"][span[0] : span[1]] if int(t) not in stops]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _prompt_visuals(sample: dict[str, Any], prompt_ids: torch.Tensor, image_id: int, video_id: int) -> dict:
    """The visual tensors of the media whose placeholders lie in ``prompt_ids`` (media of later turns dropped)."""
    n_img = int((prompt_ids == image_id).sum())
    n_vid = int((prompt_ids == video_id).sum())
    all_img = int((sample["input_ids"] == image_id).sum())
    all_vid = int((sample["input_ids"] == video_id).sum())
    if (n_img, n_vid) == (all_img, all_vid):
        return {k: sample[k] for k in VISUAL_KEYS if k in sample}
    out: dict[str, torch.Tensor] = {}
    if n_img:
        grid, merge = sample["image_grid_thw"], sample["image_merge_sizes"]
        tokens = (grid.prod(dim=1) // merge**2).tolist()
        k = _items_for(tokens, n_img)
        patches = int(grid[:k].prod(dim=1).sum())
        out.update(
            pixel_values=sample["pixel_values"][:patches],
            image_grid_thw=grid[:k],
            image_merge_sizes=merge[:k],
        )
    if n_vid:
        grid, merge = sample["video_grid_thw"], sample["video_merge_sizes"]
        slots = (grid.prod(dim=1) // merge**2).tolist()  # merged tokens per video before pruning
        mask = sample.get("video_compression_mask")
        if mask is None:
            mask = torch.ones(sum(slots), dtype=torch.bool)
        kept, off = [], 0
        for s in slots:
            kept.append(int(mask[off : off + s].sum()))
            off += s
        k = _items_for(kept, n_vid)
        patches = int(grid[:k].prod(dim=1).sum())
        out.update(
            pixel_values_videos=sample["pixel_values_videos"][:patches],
            video_grid_thw=grid[:k],
            video_merge_sizes=merge[:k],
            video_compression_mask=mask[: sum(slots[:k])],
        )
    return out


def _items_for(tokens_per_item: list[int], n_tokens: int) -> int:
    """How many leading items hold exactly ``n_tokens`` placeholder tokens."""
    acc = 0
    for k, t in enumerate(tokens_per_item, start=1):
        acc += t
        if acc == n_tokens:
            return k
        if acc > n_tokens:
            break
    raise ValueError(f"{n_tokens} placeholder tokens in the prompt do not end at a media item boundary")


@torch.no_grad()
def greedy_answer(
    model,
    sample: dict[str, Any],
    tokenizer,
    device,
    max_new_tokens: int = 8,
    stops: Iterable[int] | None = None,
) -> dict[str, Any] | None:
    """Greedy generation from the prompt before the sample's first assistant turn.

    Returns ``{"text", "finished", "new_tokens"}`` (``text`` decoded up to the first stop id, stripped;
    ``finished``: a stop id came within ``max_new_tokens``), or None when the sample has no labelled answer.
    """
    span = first_answer_span(sample["labels"])
    if span is None:
        return None
    stops = list(stops) if stops is not None else stop_ids(tokenizer, model)
    cut = span[0]
    prompt = sample["input_ids"][:cut]
    visuals = _prompt_visuals(sample, prompt, model.config.image_token_id, model.config.video_token_id)
    batch = {"input_ids": prompt.unsqueeze(0).to(device), **{k: v.to(device) for k, v in visuals.items()}}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    pad = getattr(tokenizer, "pad_token_id", None)
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=stops,
        pad_token_id=pad if pad is not None else stops[0],
        # one process generates alone (the other ranks wait outside any collective): transformers' default under
        # ZeRO-3 or FSDP with several processes is an all-reduce per new token to keep ranks in step - a hang here
        synced_gpus=False,
    )
    new = [int(t) for t in out[0, cut:]]
    end = next((i for i, t in enumerate(new) if t in stops), None)
    kept = new if end is None else new[:end]
    return {
        "text": tokenizer.decode(kept, skip_special_tokens=True).strip(),
        "finished": end is not None,
        "new_tokens": len(new),
    }


# ----------------------------------------------------------------------------------------------------------------
# The held-out set
# ----------------------------------------------------------------------------------------------------------------


def evaluate_heldout(
    model,
    samples: list[tuple[dict[str, Any], dict[str, Any]]],
    *,
    tokenizer,
    device=None,
    num_generations: int = 4,
    max_new_tokens: int = 8,
    baseline_answers: dict[str, str] | None = None,
    bad_records: int = 0,
) -> dict[str, Any]:
    """Evaluate ``samples``, ``(encoded sample, raw record)`` pairs (module docstring for the metrics).

    baseline_answers: ``task -> answer`` from the training data (:func:`majority_answers`); without it the
        baseline is None. A held-out task missing from it scores 0 for the baseline.
    bad_records: held-out records that failed to encode (reported, not scored).

    Returns ``n`` (scored samples), ``bad_records``, ``loss``, ``accuracy``, ``baseline``,
    ``teacher_forced_accuracy``, ``unfinished``, ``accuracy_per_task`` / ``baseline_per_task`` / ``n_per_task``,
    ``accuracy_per_modality``, the first ``num_generations`` generations (task, modality, generated,
    reference, correct) and ``predictions`` (the same for every sample, with its prompt and media).
    """
    if hasattr(model, "get_base_model"):  # PEFT: adapters live inside the base model
        model = model.get_base_model()
    device = device or next(model.parameters()).device
    stops = stop_ids(tokenizer, model)
    was_training = model.training
    model.eval()
    loss_sum, n_tok, tf_hits, unfinished = 0.0, 0, 0, 0
    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # hits, baseline hits, count
    per_mod: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    generations, predictions = [], []
    try:
        for sample, raw in samples:
            loss, n, tf_exact = score_sample(model, sample, device)
            loss_sum, n_tok, tf_hits = loss_sum + loss, n_tok + n, tf_hits + int(tf_exact)
            mod = sample["meta"]["modality"]
            task = record_task(raw if isinstance(raw, dict) else {}, default=mod)
            reference = reference_text(sample, tokenizer, stops)
            gen = greedy_answer(model, sample, tokenizer, device, max_new_tokens, stops)
            correct = bool(gen and reference is not None and gen["finished"] and gen["text"] == reference)
            unfinished += int(gen is not None and not gen["finished"])
            base = baseline_answers.get(task) if baseline_answers else None
            per_task[task][0] += int(correct)
            per_task[task][1] += int(base is not None and reference is not None and base.strip() == reference)
            per_task[task][2] += 1
            per_mod[mod][0] += int(correct)
            per_mod[mod][1] += 1
            row = {
                "task": task,
                "modality": mod,
                "generated": gen["text"] if gen else None,
                "reference": reference,
                "correct": correct,
            }
            if len(generations) < num_generations:
                generations.append(row)
            prompt, media = prompt_and_media(raw if isinstance(raw, dict) else {})
            predictions.append({**row, "prompt": prompt, "media": media})
    finally:
        model.train(was_training)
    n = len(samples)
    if unfinished:
        log.warning(
            "%d of %d held-out generations did not end within eval.max_new_tokens=%d (counted wrong)",
            unfinished,
            n,
            max_new_tokens,
        )
    if bad_records:
        log.warning("%d held-out records could not be encoded and are not scored", bad_records)
    has_base = baseline_answers is not None
    return {
        "n": n,
        "bad_records": int(bad_records),
        "loss": loss_sum / max(n_tok, 1),
        "accuracy": sum(h for h, _, _ in per_task.values()) / max(n, 1),
        "baseline": sum(b for _, b, _ in per_task.values()) / max(n, 1) if has_base else None,
        "teacher_forced_accuracy": tf_hits / max(n, 1),
        "unfinished": unfinished,
        "accuracy_per_task": {t: h / c for t, (h, _, c) in sorted(per_task.items())},
        "baseline_per_task": {t: b / c for t, (_, b, c) in sorted(per_task.items())} if has_base else None,
        "n_per_task": {t: c for t, (_, _, c) in sorted(per_task.items())},
        "accuracy_per_modality": {m: h / t for m, (h, t) in sorted(per_mod.items())},
        "generations": generations,
        # every scored sample (the first user turn's text and media, reference, generation, correct): the W&B
        # predictions table
        "predictions": predictions,
    }
