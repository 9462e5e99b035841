"""The run-start check that the tokenizer's chat template renders prompts as training does (data/template_check.py).

Oracle: ``tokenizer.apply_chat_template`` itself (transformers' Jinja rendering of the template the tokenizer
carries, the one inference uses), against the ids the training skeleton gives the same probe conversations.
"""

from __future__ import annotations

import pytest

from videollama3_train.data.template_check import PROBES, template_mismatch
from videollama3_train.model.tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer, build_tokenizer


@pytest.fixture()
def tok():
    return build_tiny_tokenizer()


@pytest.mark.parametrize("kind", ["tiny", "qwen"])
def test_the_projects_tokenizers_pass(kind: str) -> None:
    assert template_mismatch(build_tokenizer(kind)) is None


def test_probes_cover_system_multi_turn_image_video_and_text_only() -> None:
    kinds = [
        {it["type"] for m in msgs for it in m["content"]} | {m["role"] for m in msgs}
        for msgs in PROBES.values()
    ]
    assert any({"system", "image", "video"} <= k for k in kinds)
    assert any(sum(m["role"] == "user" for m in msgs) >= 2 for msgs in PROBES.values())
    assert any(k == {"text", "user", "assistant"} for k in kinds)


# Templates a released checkpoint might carry, each differing from training in one way.
_DEFAULT_SYSTEM = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}{%- endif -%}"
) + CHAT_TEMPLATE
_VISION_MARKERS = CHAT_TEMPLATE.replace("'<|image_pad|>\\n'", "'<|vision_start|><|image_pad|><|vision_end|>'")
_VIDEO_NO_NEWLINE = CHAT_TEMPLATE.replace("'<|video_pad|>\\n'", "'<|video_pad|>'")
_NO_TURN_NEWLINE = CHAT_TEMPLATE.replace("{{- '\\n' -}}", "")
_NO_GENERATION_PROMPT = CHAT_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant'")
_SYSTEM_AS_USER = CHAT_TEMPLATE.replace(
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}",
    "{{- '<|im_start|>' + ('user' if message['role'] == 'system' else message['role']) + '\\n' -}}",
)


@pytest.mark.parametrize(
    ("template", "probe", "what"),
    [
        (_DEFAULT_SYSTEM, "text only", "the conversation"),
        (_VISION_MARKERS, "system, image, video, two turns", "the conversation"),
        (_VIDEO_NO_NEWLINE, "system, image, video, two turns", "the conversation"),
        (_NO_TURN_NEWLINE, "system, image, video, two turns", "the conversation"),
        (_SYSTEM_AS_USER, "system, image, video, two turns", "the conversation"),
        (_NO_GENERATION_PROMPT, "system, image, video, two turns", "the inference prompt"),
    ],
    ids=["default-system", "vision-markers", "video-newline", "turn-newline", "system-as-user", "gen-prompt"],
)
def test_a_template_that_renders_otherwise_is_named_with_both_renderings(tok, template, probe, what) -> None:
    assert template != CHAT_TEMPLATE
    tok.chat_template = template
    message = template_mismatch(tok)
    assert message is not None
    first, training, rendered = message.splitlines()
    assert f"renders {what}" in first and f"probe '{probe}'" in first
    messages = PROBES[probe]
    assert training.startswith("training: '<|im_start|>")
    assert rendered.startswith("template: ")
    # the template's rendering is the one transformers makes (videos shown with their expanded frames)
    shown = eval(rendered.removeprefix("template: "))  # noqa: S307 - the repr of a str we wrote
    expected = tok.apply_chat_template(
        messages if what == "the conversation" else messages[:-1],
        tokenize=False,
        add_generation_prompt=what != "the conversation",
    )
    assert shown.replace(_PROBE_VIDEO, "<|video_pad|>") == expected


_PROBE_VIDEO = "Time 0.0s:<|video_pad|>,Time 1.0s:<|video_pad|>,Time 2.0s:<|video_pad|>"


def test_no_template_is_no_skew(tok) -> None:
    tok.chat_template = None
    assert template_mismatch(tok) is None
