"""Internal messages -> ChatML text -> token ids with exact labels.

The rendering is exactly the native chat template (``model/tokenizer.py: CHAT_TEMPLATE``)::

    <|im_start|>{role}\\n{content}<|im_end|>\\n

where an image item renders as ``<|image_pad|>\\n`` and a video item as ``<|video_pad|>\\n``. transformers'
processor then expands an image placeholder to ``t*h*w/m^2`` pads and a video placeholder to
``Time 0.0s:<pads>,Time 1.0s:<pads>,...`` (the kept pads of each frame).

Tokenisation works on a *skeleton*: the rendered text with the video timestamps written out but each image and
each video frame holding ONE pad. The skeleton is tokenised once as a whole (so ids equal tokenising the full
string: no segment boundary can change a BPE merge), labels come from the character offsets of each token, and
pads are then repeated in id space. Repeating a pad cannot change the neighbouring tokens because pads are
added special tokens, which the tokenizer splits out before BPE. ``tests/test_labels.py`` checks both claims
against tokenising the fully expanded string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..contract import IGNORE_INDEX

__all__ = [
    "IMAGE_TOKEN",
    "VIDEO_TOKEN",
    "IGNORE_INDEX",
    "Skeleton",
    "render_chat",
    "video_text",
    "build_skeleton",
    "tokenize_skeleton",
    "expand_pads",
]

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"


def video_text(timestamps: list[float], counts: list[int] | None = None) -> str:
    """The expansion of one video placeholder: ``Time {t:.1f}s:`` + that frame's pads, frames joined by ``,``.

    ``counts`` gives the pads of each frame (one each when None, as in the skeleton).
    """
    counts = counts if counts is not None else [1] * len(timestamps)
    return ",".join(f"Time {t:.1f}s:" + VIDEO_TOKEN * n for t, n in zip(timestamps, counts))


def render_chat(messages: list[dict[str, Any]]) -> str:
    """The chat exactly as ``CHAT_TEMPLATE`` renders it, one placeholder per media item (not expanded)."""
    out = []
    for m in messages:
        out.append(f"<|im_start|>{m['role']}\n")
        for it in m["content"]:
            if it["type"] == "text":
                out.append(it["text"])
            elif it["type"] == "image":
                out.append(IMAGE_TOKEN + "\n")
            else:
                out.append(VIDEO_TOKEN + "\n")
        out.append("<|im_end|>\n")
    return "".join(out)


@dataclass
class Skeleton:
    """Rendered chat with one pad per image / video frame.

    ``label_spans``: ``[start, end)`` character ranges that carry loss (assistant text and its ``<|im_end|>``).
    ``media``: ``"image"`` / ``"video"`` per media item, in text order.
    """

    text: str
    label_spans: list[tuple[int, int]] = field(default_factory=list)
    media: list[str] = field(default_factory=list)


def build_skeleton(messages: list[dict[str, Any]], video_timestamps: list[list[float]]) -> Skeleton:
    """Render ``messages`` (internal form) with video timestamps written out and one pad per image / frame.

    ``video_timestamps[k]``: seconds of the sampled frames of the k-th video, relative to the clip start.
    """
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    media: list[str] = []
    pos = 0
    vid = 0

    def put(s: str, labelled: bool = False) -> None:
        nonlocal pos
        if labelled and s:
            if spans and spans[-1][1] == pos:  # merge adjacent labelled pieces
                spans[-1] = (spans[-1][0], pos + len(s))
            else:
                spans.append((pos, pos + len(s)))
        parts.append(s)
        pos += len(s)

    for m in messages:
        learn = m["role"] == "assistant"
        put(f"<|im_start|>{m['role']}\n")
        for it in m["content"]:
            if it["type"] == "text":
                put(it["text"], learn)
            elif it["type"] == "image":
                put(IMAGE_TOKEN + "\n")  # media (and the newline the template adds after it) carries no loss
                media.append("image")
            else:
                if vid >= len(video_timestamps):
                    raise ValueError("more video items in the messages than timestamp lists")
                put(video_text(video_timestamps[vid]) + "\n")
                media.append("video")
                vid += 1
        put("<|im_end|>", learn)
        put("\n")
    if vid != len(video_timestamps):
        raise ValueError(f"{len(video_timestamps)} timestamp lists for {vid} video item(s)")
    return Skeleton("".join(parts), spans, media)


def tokenize_skeleton(tokenizer, skeleton: Skeleton) -> tuple[list[int], list[bool]]:
    """Token ids of the skeleton and, per token, whether it carries loss.

    A token carries loss when the character it starts at lies in a label span (a token with an empty offset span
    inherits its predecessor's flag). Needs a fast tokenizer (offset mapping).
    """
    enc = tokenizer(skeleton.text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    char_label = bytearray(len(skeleton.text) + 1)
    for a, b in skeleton.label_spans:
        char_label[a:b] = b"\x01" * (b - a)
    flags: list[bool] = []
    prev = False
    for a, b in enc["offset_mapping"]:
        flag = bool(char_label[a]) if b > a else prev
        flags.append(flag)
        prev = flag
    return ids, flags


def expand_pads(
    ids: list[int],
    flags: list[bool],
    pad_counts: list[int],
    pad_ids: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat the k-th pad of the skeleton ``pad_counts[k]`` times.

    Args:
        ids, flags: skeleton tokens and their loss flags (:func:`tokenize_skeleton`).
        pad_counts: one entry per pad in text order: an image's ``t*h*w/m^2`` tokens, a frame's kept tokens.
        pad_ids: ``(image_pad_id, video_pad_id)``.
    Returns:
        ``input_ids`` long ``(L,)`` and ``labels`` long ``(L,)`` (``-100`` where no loss). Pads never carry loss.
    """
    ids_t = torch.tensor(ids, dtype=torch.long)
    is_pad = (ids_t == pad_ids[0]) | (ids_t == pad_ids[1])
    n_pads = int(is_pad.sum())
    if n_pads != len(pad_counts):
        raise ValueError(f"skeleton holds {n_pads} media pads but {len(pad_counts)} counts were given")
    repeats = torch.ones(len(ids), dtype=torch.long)
    repeats[is_pad] = torch.tensor(pad_counts, dtype=torch.long)
    labels_t = torch.where(torch.tensor(flags, dtype=torch.bool) & ~is_pad, ids_t, IGNORE_INDEX)
    return ids_t.repeat_interleave(repeats), labels_t.repeat_interleave(repeats)
