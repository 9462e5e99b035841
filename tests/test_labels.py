"""Labels are exactly assistant content + its <|im_end|>; segment-wise ids equal whole-string tokenisation."""

from __future__ import annotations

import pytest
import torch
from mediagen import make_image, make_video

from videollama3_train.data import EncodeConfig, encode_record
from videollama3_train.data.text import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    build_skeleton,
    expand_pads,
    tokenize_skeleton,
    video_text,
)
from videollama3_train.model.tokenizer import build_processor, build_tiny_tokenizer


@pytest.fixture(scope="module")
def proc():
    return build_processor(build_tiny_tokenizer())


def _labelled_runs(tok, labels: torch.Tensor) -> list[str]:
    """Decode each contiguous run of labelled tokens."""
    runs, cur = [], []
    for v in labels.tolist():
        if v == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(v)
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_multi_turn_system_multi_image_video(tmp_path, proc):
    make_image(tmp_path / "a.png", size=(40, 30), pattern="noise")
    make_image(tmp_path / "b.png", size=(30, 40), pattern="gradient")
    make_video(tmp_path / "v.mp4", 64, 48, seconds=4.0, fps=4.0)
    answers = [
        "Two pictures.",
        " Leading space and trailing space ",
        "\n\nStarts with newlines.",
        "Ünïcödé 猫 🐱!",
    ]
    rec = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "a.png"},
                    {"type": "image", "path": "b.png"},
                    {"type": "text", "text": "Compare."},
                ],
            },
            {"role": "assistant", "content": answers[0]},
            {
                "role": "user",
                "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "And?"}],
            },
            {"role": "assistant", "content": answers[1]},
            {"role": "user", "content": "More?"},
            {"role": "assistant", "content": [{"type": "text", "text": answers[2]}]},
            {"role": "user", "content": "Last."},
            {"role": "assistant", "content": answers[3]},
        ]
    }
    cfg = EncodeConfig(max_visual_tokens=200, use_token_compression=True)
    s = encode_record(rec, data_root=tmp_path, processor=proc, config=cfg)
    tok = proc.tokenizer
    assert _labelled_runs(tok, s["labels"]) == [a + "<|im_end|>" for a in answers]
    labelled = s["labels"] != IGNORE_INDEX
    # labelled positions carry their own token, and no media / header / system / user token is labelled
    assert torch.equal(s["labels"][labelled], s["input_ids"][labelled])
    for special in ("<|image_pad|>", "<|video_pad|>", "<|im_start|>"):
        assert not bool((s["labels"] == tok.convert_tokens_to_ids(special)).any())
    assert s["meta"]["num_label_tokens"] == int(labelled.sum())
    # the "\n" after each <|im_end|> is not labelled
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = (s["input_ids"] == im_end).nonzero().flatten()
    for e in ends.tolist():
        if e + 1 < len(s["labels"]):
            assert s["labels"][e + 1] == IGNORE_INDEX


def test_official_schema_labels(tmp_path, proc):
    make_image(tmp_path / "a.png", size=(28, 28))
    rec = {
        "image": "a.png",
        "conversations": [
            {"from": "system", "value": "Sys."},
            {"from": "human", "value": "<image>\nColour?"},
            {"from": "gpt", "value": "Grey."},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."},
        ],
    }
    s = encode_record(rec, data_root=tmp_path, processor=proc, config=EncodeConfig())
    assert _labelled_runs(proc.tokenizer, s["labels"]) == ["Grey.<|im_end|>", "Yes.<|im_end|>"]


TRICKY = [
    "plain answer",
    "\n\n\nnewlines first",
    "   spaces first",
    "ends with newline\n",
    "Time 0.0s: looks like a timestamp",
    "日本語のテキスト and emoji 🎉🎉",
    "a,b,c;1.0s:2.5s",
]


@pytest.mark.parametrize("answer", TRICKY)
def test_skeleton_ids_equal_full_string(proc, answer):
    """Tokenising the one-pad skeleton then repeating pads == tokenising the fully expanded string."""
    tok = proc.tokenizer
    messages = [
        {"role": "user", "content": [{"type": "image", "path": "x"}, {"type": "text", "text": answer}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        {
            "role": "user",
            "content": [{"type": "video", "path": "v"}, {"type": "text", "text": "\n" + answer}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": answer + " " + answer}]},
    ]
    stamps = [[0.0, 1.0, 2.5]]
    sk = build_skeleton(messages, stamps)
    ids, flags = tokenize_skeleton(tok, sk)
    counts = [7, 3, 1, 4]  # image, then the three frames
    input_ids, labels = expand_pads(ids, flags, counts, (proc.image_token_id, proc.video_token_id))
    full = (
        f"<|im_start|>user\n{IMAGE_TOKEN * 7}\n{answer}<|im_end|>\n"
        f"<|im_start|>assistant\n{answer}<|im_end|>\n"
        f"<|im_start|>user\n{video_text(stamps[0], [3, 1, 4])}\n\n{answer}<|im_end|>\n"
        f"<|im_start|>assistant\n{answer} {answer}<|im_end|>\n"
    )
    assert input_ids.tolist() == tok(full, add_special_tokens=False)["input_ids"]
    assert _labelled_runs(tok, labels) == [answer + "<|im_end|>", f"{answer} {answer}<|im_end|>"]
