"""Training renders prompts itself (``data/text.py``: the ChatML skeleton); inference renders them with the chat
template the tokenizer carries (``tokenizer.apply_chat_template``, saved with every export). A released checkpoint
whose template differs (a default system prompt, other media markers, another turn separator) would train on one
prompt format and serve another, with every token-level test green.

:func:`template_mismatch` renders probe conversations both ways (a system prompt, several turns, an image, a video,
a text-only chat) and compares the token ids, and the ids of the inference prompt (``add_generation_prompt``) with
the start of the training ids. The run stops on a difference, naming both renderings: training does not follow
another template, because the labels (assistant text and its ``<|im_end|>``) are located in the skeleton the
project renders; a foreign template carries no such spans.
"""

from __future__ import annotations

from typing import Any

from .text import VIDEO_TOKEN, build_skeleton, tokenize_skeleton, video_text

__all__ = ["PROBES", "template_mismatch"]

_TIMESTAMPS = [0.0, 1.0, 2.0]  # the probe video's sampled frames (seconds)


def _turn(role: str, *items: dict[str, Any]) -> dict[str, Any]:
    return {"role": role, "content": list(items)}


def _text(s: str) -> dict[str, str]:
    return {"type": "text", "text": s}


# One conversation per shape the data holds: media and system turns in one multi-turn chat, and a text-only chat
# without a system turn (where a template's default system prompt would show).
PROBES: dict[str, list[dict[str, Any]]] = {
    "system, image, video, two turns": [
        _turn("system", _text("You are a helpful assistant.")),
        _turn("user", {"type": "image"}, _text("What is shown in the image?")),
        _turn("assistant", _text("A red circle.")),
        _turn("user", {"type": "video"}, _text("Which direction does the object move?")),
        _turn("assistant", _text("Left.")),
    ],
    "text only": [
        _turn("user", _text("What color is a banana?")),
        _turn("assistant", _text("Bananas are yellow.")),
    ],
}


def _expand_videos(text: str, n_videos: int) -> str:
    """The processor's expansion of each video placeholder with one pad per frame (what the skeleton holds)."""
    parts = text.split(VIDEO_TOKEN)
    if len(parts) - 1 != n_videos:
        return text  # the template renders videos otherwise: the ids differ, reported below
    return "".join(p + (video_text(_TIMESTAMPS) if i < n_videos else "") for i, p in enumerate(parts))


def _render(tokenizer, messages, n_videos: int, *, generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return _expand_videos(text, n_videos)


def _last_answer_start(labelled: list[bool]) -> int:
    """Index of the first token of the last run of labelled tokens (the last assistant answer)."""
    k = len(labelled)
    while k > 0 and not labelled[k - 1]:
        k -= 1
    while k > 0 and labelled[k - 1]:
        k -= 1
    return k


def template_mismatch(tokenizer) -> str | None:
    """None when ``tokenizer``'s chat template gives the ids training uses for every probe conversation (and the
    inference prompt is their prefix), else a message naming the probe and both renderings."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None  # nothing to skew with: inference gets the project's template (build_tokenizer)
    for name, messages in PROBES.items():
        n_videos = sum(it["type"] == "video" for m in messages for it in m["content"])
        skeleton = build_skeleton(messages, [_TIMESTAMPS] * n_videos)
        train_ids, labelled = tokenize_skeleton(tokenizer, skeleton)
        rendered = _render(tokenizer, messages, n_videos, generation_prompt=False)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        what = "the conversation"
        if ids == train_ids:
            # the inference prompt (every turn but the last answer, then the assistant header): exactly the
            # training ids before the last answer's first label
            rendered = _render(tokenizer, messages[:-1], n_videos, generation_prompt=True)
            ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            what = "the inference prompt (add_generation_prompt=True)"
            if ids == train_ids[: _last_answer_start(labelled)]:
                continue
        return (
            f"the tokenizer's chat template renders {what} of the probe '{name}' unlike training, so a model trained "
            "here would be prompted differently at inference; set the tokenizer's chat template (its "
            "tokenizer_config.json or chat_template.jinja) to ChatML without a default system prompt, as "
            "model/tokenizer.py: CHAT_TEMPLATE renders\n"
            f"training: {skeleton.text!r}\n"
            f"template: {rendered!r}"
        )
    return None
