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


# ---------------------------------------------------------------------------------------------------------------
# counting tokens (the cost pass)
# ---------------------------------------------------------------------------------------------------------------
# GPT-2's pre-tokenizer pattern: what `ByteLevel(use_regex=True)` splits words with.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Text the fast counter takes: printable ASCII, tab, newline, carriage return. On it every Unicode class the
# pre-tokenizer patterns use (\p{L}, \p{N}, \s) means the same in Oniguruma (the Rust tokenizer's regex engine)
# and in the `regex` module, and the NFC/NFKC normalizers are the identity; anything else is counted by the
# tokenizer itself.
_COUNTABLE = r"[\t\n\r\x20-\x7e]*"
_NORMALIZERS_IDENTITY_ON_ASCII = ("NFC", "NFD", "NFKC", "NFKD")
_MEMO_LIMIT = 200_000  # distinct words remembered per counter (~18 MB of 8-letter words), then forgotten


class TokenCounter:
    """``len(tokenizer(text, add_special_tokens=False)["input_ids"])``, several times faster: the cost pass needs
    the count only, never the ids or the offsets.

    How: the tokenizer's own pipeline, replayed where it is cheap to replay exactly. Added tokens (all special,
    neither stripping nor normalised) are split out first and count one each, as the tokenizer splits them before
    anything else; the text between them is cut into words by the pre-tokenizer's regular expression (GPT-2's for
    ``ByteLevel(use_regex=True)``, the pattern of a ``Split`` followed by ``ByteLevel(use_regex=False)``: Qwen2's);
    each distinct word is byte-level mapped and run through the tokenizer's BPE model once, its count remembered.
    Why: the tokenizer's Rust regex pass is most of its time (0.5 ms for a 600-token record on the 2-core machine,
    against ~0.17 ms here; ``benchmarks/bench_startup.py``).

    Exactness: applied only to text of printable ASCII (+ tab, newlines), where both regex engines read every class
    the same, and only to the tokenizer shapes above (:meth:`build` returns None otherwise); every other text is
    counted by the tokenizer itself. ``tests/test_costing.py`` compares the two on the tiny and Qwen2 vocabularies.
    """

    def __init__(self, tokenizer, words, specials: list[str]):
        import regex

        self._tok = tokenizer._tokenizer
        self._model = self._tok.model
        self._words = regex.compile(words)
        # longest first: at one position the longest added token wins, as in the tokenizer's matcher
        alternatives = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
        self._specials = regex.compile(f"({alternatives})") if specials else None
        self._special_set = set(specials)
        self._countable = regex.compile(_COUNTABLE)
        self._memo: dict[str, int] = {}

    @classmethod
    def build(cls, tokenizer) -> TokenCounter | None:
        """The counter of a fast tokenizer whose pipeline it replays exactly, else None."""
        import json

        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is None:
            return None
        spec = json.loads(backend.to_str())
        norm = spec.get("normalizer")
        norms = (
            [] if norm is None else norm.get("normalizers", [norm]) if norm["type"] == "Sequence" else [norm]
        )
        if any(n["type"] not in _NORMALIZERS_IDENTITY_ON_ASCII for n in norms):
            return None
        if spec["model"]["type"] != "BPE" or spec["model"].get(
            "dropout"
        ):  # (a post-processor acts only when special tokens are added)
            return None
        pre = spec.get("pre_tokenizer") or {}
        parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        if len(parts) == 1 and _is_byte_level(parts[0], use_regex=True):
            words = _GPT2_PATTERN
        elif (
            len(parts) == 2
            and parts[0].get("type") == "Split"
            and "Regex" in parts[0].get("pattern", {})
            and parts[0].get("behavior") == "Isolated"
            and not parts[0].get("invert")
            and _is_byte_level(parts[1], use_regex=False)
        ):
            words = parts[0]["pattern"]["Regex"]
        else:
            return None
        added = spec.get("added_tokens", [])
        if any(a["lstrip"] or a["rstrip"] or a["single_word"] or a["normalized"] for a in added):
            return None
        return cls(tokenizer, words, [a["content"] for a in added])

    def __call__(self, text: str) -> int:
        if not self._countable.fullmatch(text):
            return len(self._tok.encode(text, add_special_tokens=False).ids)
        pieces = self._specials.split(text) if self._specials is not None else [text]
        memo, words, model = self._memo, self._words, self._model
        count = 0
        for k, piece in enumerate(pieces):
            if k % 2:  # an added token (the split keeps them at odd positions)
                count += 1
                continue
            for word in words.findall(piece):
                n = memo.get(word)
                if n is None:
                    # printable ASCII maps to itself under the byte-level alphabet, except the space (-> "Ġ")
                    # and tab / newline / carriage return (-> "ĉ", "Ċ", "č")
                    n = len(model.tokenize(word.translate(_BYTE_LEVEL_ASCII)))
                    if len(memo) >= _MEMO_LIMIT:
                        memo.clear()
                    memo[word] = n
                count += n
        return count


def _is_byte_level(part: dict, *, use_regex: bool) -> bool:
    return (
        part.get("type") == "ByteLevel"
        and not part.get("add_prefix_space")
        and bool(part.get("use_regex", True)) == use_regex
    )


def _byte_level_ascii() -> dict[int, str]:
    """GPT-2's byte -> printable character table (``bytes_to_unicode``), restricted to the bytes ASCII text has."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return {b: table[b] for b in range(128)}


_BYTE_LEVEL_ASCII = _byte_level_ascii()
_COUNTERS: dict[int, tuple[Any, TokenCounter | None]] = {}


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` (no special tokens added): :class:`TokenCounter` where it applies, else the tokenizer."""
    entry = _COUNTERS.get(id(tokenizer))
    if entry is None or entry[0] is not tokenizer:
        entry = (tokenizer, TokenCounter.build(tokenizer))
        _COUNTERS[id(tokenizer)] = entry
    counter = entry[1]
    if counter is not None:
        return counter(text)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
