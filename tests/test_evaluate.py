"""Held-out evaluation (videollama3_train/evaluate.py) on tiny random and tiny trained models.

Accuracy is greedy generation's exact match; these tests check that it is measured from the prompt the processor
would build, that it agrees record by record with teacher-forced exact match on a trained model (and where and
why it may not), and that the baseline uses the same metric.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from videollama3_train.data.collate import VISUAL_KEYS
from videollama3_train.data.config import EncodeConfig
from videollama3_train.data.encode import encode_record
from videollama3_train.evaluate import (
    _prompt_visuals,
    evaluate_heldout,
    first_answer,
    first_answer_span,
    greedy_answer,
    majority_answers,
    majority_baseline,
    record_task,
    score_sample,
    stop_ids,
)

SCRIPT = Path(__file__).resolve().parents[1] / "data" / "generate_sample.py"


def _load_generator():
    spec = importlib.util.spec_from_file_location("generate_sample", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _official(prompt: str, answer: str, **extra) -> dict:
    return {**extra, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, list[dict], list[dict]]:
    out = tmp_path_factory.mktemp("evaldata")
    gen.generate(out, seed=5, n_train=40, n_heldout=16)
    return out, _read(out / "train.jsonl"), _read(out / "heldout.jsonl")


@pytest.fixture(scope="module")
def encoded(data, tiny_processor) -> list[tuple[dict, dict]]:
    out, _, heldout = data
    return [
        (encode_record(r, data_root=out, processor=tiny_processor, config=EncodeConfig()), r) for r in heldout
    ]


# ----------------------------------------------------------------------------------------------------------------
# Baseline
# ----------------------------------------------------------------------------------------------------------------


def test_majority_answers_ties_schemas_and_fallbacks() -> None:
    train = [
        _official("What is one plus one?", "two", task="sum"),
        _official("What is two plus zero?", "two", task="sum"),
        _official("What is zero plus one?", "one", task="sum"),
        _official("Hot?", " cold ", task="opposite"),  # whitespace is not part of the answer
        _official("Wet?", "dry", task="opposite"),  # tie with "cold": alphabetically first wins
        {
            "messages": [
                {"role": "user", "content": "Say hi."},
                {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
            ]
        },  # no task: its modality
        _official("<image>\nColour?", "red", image="a.png"),
        {"conversations": "not a list", "task": "sum"},  # unreadable: skipped
    ]
    assert majority_answers(train) == {"sum": "two", "opposite": "cold", "text": "hi", "image": "red"}
    assert record_task(train[5]) == "text" and record_task(train[6]) == "image"
    assert first_answer(train[3]) == "cold" and first_answer(train[-1]) is None

    heldout = [
        _official("What is three plus zero?", "three", task="sum"),
        _official("What is zero plus two?", "two", task="sum"),
        _official("Big?", "small", task="opposite"),
        _official("Name a shape.", "circle", task="unseen"),  # no training answer: the baseline misses it
    ]
    res = majority_baseline(train, heldout)
    assert res["baseline"] == pytest.approx(1 / 4)
    assert res["baseline_per_task"] == {"opposite": 0.0, "sum": 0.5, "unseen": 0.0}
    assert res["n_per_task"] == {"opposite": 1, "sum": 2, "unseen": 1}


def test_majority_rule_matches_the_generator(data) -> None:
    _, train, heldout = data
    assert majority_answers(train) == gen.majority_answers(train)
    assert majority_baseline(train, heldout)["baseline"] == pytest.approx(
        gen.majority_baseline(train, heldout)
    )


# ----------------------------------------------------------------------------------------------------------------
# Report on an untrained model
# ----------------------------------------------------------------------------------------------------------------


def test_report_fields_on_an_untrained_model(tiny_model, tiny_tokenizer, data, encoded) -> None:
    _, train, heldout = data
    answers = majority_answers(train)
    res = evaluate_heldout(
        tiny_model,
        encoded,
        tokenizer=tiny_tokenizer,
        baseline_answers=answers,
        bad_records=3,
        num_generations=2,
    )
    assert "chance" not in res
    assert res["n"] == len(encoded) and res["bad_records"] == 3
    assert 0.0 <= res["accuracy"] <= 1.0 and res["loss"] > 0
    # The baseline is the same exact match as accuracy, scored on the encoded references.
    expected = majority_baseline(train, heldout)
    assert res["baseline"] == pytest.approx(expected["baseline"])
    assert res["baseline_per_task"] == pytest.approx(expected["baseline_per_task"])
    assert res["n_per_task"] == expected["n_per_task"]
    assert set(res["accuracy_per_task"]) == {r["task"] for r in heldout}
    assert set(res["accuracy_per_modality"]) == {"image", "video", "text"}
    assert len(res["generations"]) == 2
    assert {"task", "modality", "generated", "reference", "correct"} <= set(res["generations"][0])
    assert res["generations"][0]["reference"] == heldout[0]["answer"]
    assert tiny_model.training  # the mode is restored

    no_base = evaluate_heldout(tiny_model, encoded[:2], tokenizer=tiny_tokenizer, num_generations=0)
    assert (
        no_base["baseline"] is None and no_base["baseline_per_task"] is None and no_base["bad_records"] == 0
    )


def test_prompt_is_the_processors_generation_prompt(data, encoded, tiny_processor) -> None:
    """Generation starts from exactly what ``apply_chat_template(..., add_generation_prompt=True)`` builds."""
    out, _, _ = data
    checked = set()
    for sample, raw in encoded:
        modality = sample["meta"]["modality"]
        if modality not in ("text", "image") or modality in checked or isinstance(raw.get("image"), list):
            continue
        text = raw["conversations"][0]["value"].replace("<image>\n", "")
        content = [{"type": "image", "image": str(out / raw["image"])}] if "image" in raw else []
        content.append({"type": "text", "text": text})
        inputs = tiny_processor.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        cut = first_answer_span(sample["labels"])[0]
        assert torch.equal(sample["input_ids"][:cut], inputs["input_ids"][0]), modality
        if modality == "image":
            assert torch.equal(sample["image_grid_thw"], inputs["image_grid_thw"])
            assert torch.allclose(sample["pixel_values"], inputs["pixel_values"].float())
        checked.add(modality)
    assert checked == {"text", "image"}


# ----------------------------------------------------------------------------------------------------------------
# A trained model: generation vs teacher forcing
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(encoded, tiny_tokenizer):
    """The tiny model trained to memorise 4 of the held-out records (text, image, multi-image, video)."""
    from videollama3_train.model.core import ModelConfig, build_model

    model = build_model(ModelConfig(preset="tiny", attn_implementation="sdpa", seed=1), tiny_tokenizer)
    picks, seen = [], set()
    for i, (sample, raw) in enumerate(encoded):
        kind = "multi" if isinstance(raw.get("image"), list) else sample["meta"]["modality"]
        if kind not in seen:
            seen.add(kind)
            picks.append(i)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        for i in picks:
            sample = encoded[i][0]
            batch = {k: v for k, v in sample.items() if k in VISUAL_KEYS}
            logits = model(input_ids=sample["input_ids"][None], **batch, use_cache=False).logits[0, :-1]
            loss = F.cross_entropy(logits.float(), sample["labels"][1:], ignore_index=-100)
            (loss / len(picks)).backward()
        opt.step()
    return model, picks


def test_generation_accuracy_equals_teacher_forced_on_a_trained_model(
    trained, encoded, tiny_tokenizer
) -> None:
    model, picks = trained
    stops = stop_ids(tiny_tokenizer, model)
    model.eval()
    unfinished = 0
    for i, (sample, raw) in enumerate(encoded):
        _, _, tf_exact = score_sample(model, sample, "cpu")
        out = greedy_answer(model, sample, tiny_tokenizer, "cpu", max_new_tokens=8, stops=stops)
        gen_exact = out["finished"] and out["text"] == raw["answer"]
        assert gen_exact == tf_exact, (raw, out)
        # A record it did not memorise may ramble past 8 tokens: wrong by both measures, and counted.
        unfinished += not out["finished"]
        if i in picks:
            assert gen_exact and out["finished"], (raw, out)  # memorised
    res = evaluate_heldout(model, encoded, tokenizer=tiny_tokenizer, max_new_tokens=8)
    assert res["accuracy"] == res["teacher_forced_accuracy"] >= len(picks) / len(encoded)
    assert res["unfinished"] == unfinished


def test_unfinished_generations_are_wrong_and_counted(trained, encoded, tiny_tokenizer) -> None:
    """With no room for the closing ``<|im_end|>`` nothing is correct, while teacher forcing still is."""
    model, picks = trained
    memorised = [encoded[i] for i in picks]
    res = evaluate_heldout(model, memorised, tokenizer=tiny_tokenizer, max_new_tokens=1)
    assert res["accuracy"] == 0.0 and res["unfinished"] == len(memorised)
    assert res["teacher_forced_accuracy"] == 1.0


# ----------------------------------------------------------------------------------------------------------------
# Multi-turn records: media after the first answer
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["image_then_video", "video_then_image"])
def test_media_after_the_first_answer_are_left_out(
    order, data, tiny_model, tiny_tokenizer, tiny_processor
) -> None:
    out, train, _ = data
    image = next(r["image"] for r in train if isinstance(r.get("image"), str))
    video = next(r["video"] for r in train if "video" in r)
    first, second = ("<image>", "<video>") if order == "image_then_video" else ("<video>", "<image>")
    raw = {
        "image": image,
        "video": video,
        "task": "multi_turn",
        "conversations": [
            {"from": "human", "value": f"{first}\nWhat colour is it?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": f"{second}\nAnd this one?"},
            {"from": "gpt", "value": "blue"},
        ],
    }
    sample = encode_record(raw, data_root=out, processor=tiny_processor, config=EncodeConfig())
    cut = first_answer_span(sample["labels"])[0]
    cfg = tiny_model.config
    visuals = _prompt_visuals(sample, sample["input_ids"][:cut], cfg.image_token_id, cfg.video_token_id)
    kept, dropped = ("image", "video") if order == "image_then_video" else ("video", "image")
    grid_key = f"{kept}_grid_thw"
    assert torch.equal(visuals[grid_key], sample[grid_key])
    assert f"{dropped}_grid_thw" not in visuals
    out_ = greedy_answer(tiny_model, sample, tiny_tokenizer, "cpu", max_new_tokens=3)
    assert out_ is not None and out_["new_tokens"] <= 3
    res = evaluate_heldout(
        tiny_model, [(sample, raw)], tokenizer=tiny_tokenizer, baseline_answers={"multi_turn": "red"}
    )
    assert res["baseline"] == 1.0  # the reference is the first answer
    assert res["generations"][0]["reference"] == "red"


def test_prompt_visuals_slice_several_images(data, tiny_processor, tiny_model) -> None:
    out, train, _ = data
    images = [r["image"] for r in train if isinstance(r.get("image"), str)][:3]
    raw = {
        "image": images,
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nSame colour?"},
            {"from": "gpt", "value": "no"},
            {"from": "human", "value": "<image>\nAnd now?"},
            {"from": "gpt", "value": "yes"},
        ],
    }
    sample = encode_record(raw, data_root=out, processor=tiny_processor, config=EncodeConfig())
    cut = first_answer_span(sample["labels"])[0]
    cfg = tiny_model.config
    visuals = _prompt_visuals(sample, sample["input_ids"][:cut], cfg.image_token_id, cfg.video_token_id)
    grid = sample["image_grid_thw"]
    assert torch.equal(visuals["image_grid_thw"], grid[:2])
    assert visuals["pixel_values"].shape[0] == int(grid[:2].prod(dim=1).sum())
    assert torch.equal(visuals["pixel_values"], sample["pixel_values"][: visuals["pixel_values"].shape[0]])
