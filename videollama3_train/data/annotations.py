"""Annotation files -> Arrow datasets, and both annotation schemas -> one internal record form.

Two schemas are read (docs/data_format.md):

* official VideoLLaMA3: ``{"image": str|[str], "video": str|[str], "conversations": [{"from", "value"}]}`` with
  ``<image>`` / ``<video>`` placeholders inside ``value``;
* chat messages (transformers' processor form): ``{"messages": [{"role", "content": str | [items]}]}``.

Both become ``{"messages": [{"role": "system"|"user"|"assistant", "content": [item, ...]}]}`` where an item is
``{"type": "text", "text"}``, ``{"type": "image", "path"}`` or ``{"type": "video", "path", "start", "end"}``
(``path`` of a video is a string, or a list of frame image paths for a video given frame by frame).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DataError

__all__ = ["load_annotations", "normalize_record", "record_at", "RECORD_COLUMN", "IMAGE_EXTENSIONS"]

RECORD_COLUMN = "record"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_PLACEHOLDER = re.compile(r"<image>|<video>")
# Tokens that would corrupt the placeholder accounting or the chat structure if they appeared in raw text.
_RESERVED = ("<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------


def _iter_json_records(path: str, mtime_ns: int, size: int) -> Iterator[dict[str, str]]:
    """Yield each record of a JSON list or a JSONL file, re-serialised as one JSON string.

    ``mtime_ns`` / ``size`` are unused here: they enter ``datasets``' cache fingerprint so an edited file is
    re-read instead of served stale from the cache.
    """
    del mtime_ns, size
    # bytes, decoded line by line: invalid UTF-8 is then reported with its line instead of failing the whole load
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith(b"["):
            try:
                records = json.loads(f.read().decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(
                    "bad_text", f"not valid UTF-8 at byte {e.start} ({e.reason})", path=path
                ) from None
            except json.JSONDecodeError as e:
                raise DataError("bad_schema", f"not valid JSON: {e}", path=path) from e
            for i, rec in enumerate(records):
                if not isinstance(rec, dict):
                    raise DataError(
                        "bad_schema", f"record is a {type(rec).__name__}, not an object", index=i, path=path
                    )
                yield {RECORD_COLUMN: json.dumps(rec, ensure_ascii=False)}
            return
        index = 0
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    "bad_text",
                    f"line {lineno} is not valid UTF-8 (byte {e.start}: {e.reason})",
                    index=index,
                    path=path,
                ) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    "bad_schema", f"line {lineno} is not valid JSON: {e}", index=index, path=path
                ) from e
            if not isinstance(rec, dict):
                raise DataError("bad_schema", f"line {lineno} is not a JSON object", index=index, path=path)
            yield {RECORD_COLUMN: json.dumps(rec, ensure_ascii=False)}
            index += 1


def load_annotations(path: str | os.PathLike, *, cache_dir: str | None = None):
    """Read a JSON list or JSONL annotation file into a memory-mapped ``datasets.Dataset``.

    Each row holds one record as a JSON string in column ``record`` (read it back with :func:`record_at`).
    Why a string column and not Arrow columns: real annotation files mix types across rows (``image`` is a string
    in one record and a list in the next, ``value`` may be absent, extra keys come and go), which makes Arrow's
    schema inference fail or silently null fields; one string column accepts any record, keeps it byte-for-byte,
    and still gives memory-mapped random access. Schema checks happen in :func:`normalize_record`, per record,
    so one bad record is reported with its index instead of failing the whole load.
    """
    import datasets

    path = Path(path)
    if not path.is_file():
        raise DataError("missing_file", "annotation file not found", path=str(path))
    st = path.stat()
    if st.st_size == 0:
        raise DataError("empty_file", "annotation file is empty", path=str(path))
    features = datasets.Features({RECORD_COLUMN: datasets.Value("string")})
    return datasets.Dataset.from_generator(
        _iter_json_records,
        features=features,
        gen_kwargs={"path": str(path.resolve()), "mtime_ns": st.st_mtime_ns, "size": st.st_size},
        cache_dir=cache_dir,
    )


def record_at(dataset, index: int) -> dict[str, Any]:
    """The raw record dict stored at ``index`` of a dataset from :func:`load_annotations`."""
    return json.loads(dataset[index][RECORD_COLUMN])


# ---------------------------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------------------------


def _check_text(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise DataError("bad_text", f"{where}: text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from a mis-decoded file
        raise DataError("bad_text", f"{where}: text is not valid UTF-8 ({e.reason})") from e
    for tok in _RESERVED:
        if tok in text:
            raise DataError("bad_text", f"{where}: text contains the reserved token {tok!r}")
    return text


def _as_list(value: Any, key: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError("bad_schema", f"{key!r} must be a string or a list of strings, got {value!r:.80}")


def _is_frame_list(paths: list[str]) -> bool:
    return len(paths) >= 1 and all(p.lower().endswith(IMAGE_EXTENSIONS) for p in paths)


def _video_item(path: str | list[str], start: Any = None, end: Any = None) -> dict[str, Any]:
    for name, v in (("start", start), ("end", end)):
        if v is not None and not isinstance(v, (int, float)):
            raise DataError("bad_schema", f"video {name} must be a number of seconds, got {v!r}")
    return {
        "type": "video",
        "path": path,
        "start": None if start is None else float(start),
        "end": None if end is None else float(end),
    }


def _normalize_official(raw: dict[str, Any]) -> dict[str, Any]:
    images = _as_list(raw.get("image"), "image")
    videos_raw = _as_list(raw.get("video"), "video")
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError("bad_schema", "'conversations' must be a non-empty list")

    texts: list[tuple[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError("bad_schema", f"turn {i} is not an object")
        role = _ROLES.get(turn.get("from"))
        if role is None:
            raise DataError("unknown_role", f"turn {i} has unknown speaker {turn.get('from')!r}")
        texts.append((role, _check_text(turn.get("value"), f"turn {i}")))

    all_text = "".join(t for _, t in texts)
    n_image_tags = all_text.count("<image>")
    n_video_tags = all_text.count("<video>")

    # A `video` that is a list of frame images is ONE video given frame by frame (official convention).
    videos: list[str | list[str]] = [videos_raw] if _is_frame_list(videos_raw) else list(videos_raw)
    frames_as_image_tags = False
    if (
        videos
        and isinstance(videos[0], list)
        and not images
        and n_video_tags == 0
        and n_image_tags == len(videos[0])
    ):
        # ... and its frames may be marked by one <image> tag each: those tags together stand for the video.
        frames_as_image_tags = True
    start, end = raw.get("start"), raw.get("end")

    if not frames_as_image_tags:
        if n_image_tags not in (0, len(images)):
            raise DataError(
                "placeholder_mismatch", f"{n_image_tags} <image> placeholders for {len(images)} image(s)"
            )
        if n_video_tags not in (0, len(videos)):
            raise DataError(
                "placeholder_mismatch", f"{n_video_tags} <video> placeholders for {len(videos)} video(s)"
            )

    image_iter = iter(images)
    video_iter = iter(videos)
    first_frame_tag_seen = False
    messages: list[dict[str, Any]] = []
    for role, text in texts:
        content: list[dict[str, Any]] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(text):
            if m.start() > pos:
                content.append({"type": "text", "text": text[pos : m.start()]})
            pos = m.end()
            # the native template writes "<placeholder>\n" itself, so one newline after a tag belongs to the tag
            if text.startswith("\n", pos):
                pos += 1
            if frames_as_image_tags:
                if not first_frame_tag_seen:
                    content.append(_video_item(next(video_iter), start, end))
                    first_frame_tag_seen = True
            elif m.group() == "<image>":
                if n_image_tags:
                    content.append({"type": "image", "path": next(image_iter)})
            elif n_video_tags:
                content.append(_video_item(next(video_iter), start, end))
        if pos < len(text):
            content.append({"type": "text", "text": text[pos:]})
        messages.append({"role": role, "content": content})

    # Media without placeholders go to the start of the first user turn (official convention), images first.
    leading: list[dict[str, Any]] = []
    if not frames_as_image_tags:
        if n_image_tags == 0:
            leading += [{"type": "image", "path": p} for p in images]
        if n_video_tags == 0:
            leading += [_video_item(v, start, end) for v in videos]
    if leading:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise DataError("bad_schema", "record has media but no user turn to put them in")
        first_user["content"] = leading + first_user["content"]
    return {"messages": messages}


def _normalize_messages(raw: dict[str, Any]) -> dict[str, Any]:
    turns = raw["messages"]
    if not isinstance(turns, list) or not turns:
        raise DataError("bad_schema", "'messages' must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError("bad_schema", f"message {i} is not an object")
        role = turn.get("role")
        if role not in ("system", "user", "assistant"):
            raise DataError("unknown_role", f"message {i} has unknown role {role!r}")
        content = turn.get("content")
        items: list[dict[str, Any]] = []
        if isinstance(content, str):
            items.append({"type": "text", "text": _check_text(content, f"message {i}")})
        elif isinstance(content, list):
            for j, item in enumerate(content):
                where = f"message {i} item {j}"
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "text":
                    items.append({"type": "text", "text": _check_text(item.get("text"), where)})
                elif kind in ("image", "video"):
                    path = next((item[k] for k in (kind, "path", "url") if item.get(k) is not None), None)
                    if (
                        isinstance(path, list)
                        and kind == "video"
                        and path
                        and all(isinstance(p, str) for p in path)
                    ):
                        pass  # a video given as its frames
                    elif not isinstance(path, str) or not path:
                        raise DataError(
                            "bad_schema", f"{where}: {kind} needs a path in '{kind}', 'path' or 'url'"
                        )
                    if kind == "image":
                        items.append({"type": "image", "path": path})
                    else:
                        items.append(_video_item(path, item.get("start"), item.get("end")))
                else:
                    raise DataError("bad_schema", f"{where}: unknown content item {item!r:.80}")
        else:
            raise DataError(
                "bad_text", f"message {i}: content must be a string or a list, got {type(content).__name__}"
            )
        messages.append({"role": role, "content": items})
    return {"messages": messages}


def normalize_record(raw: dict[str, Any]) -> dict[str, Any]:
    """Map an official or messages-schema record to the internal form (see module docstring).

    Raises ``DataError`` with reason ``bad_schema``, ``unknown_role``, ``placeholder_mismatch``,
    ``empty_assistant`` or ``bad_text``; dataset and record index are filled in by the caller.
    """
    if not isinstance(raw, dict):
        raise DataError("bad_schema", f"record must be an object, got {type(raw).__name__}")
    if "messages" in raw:
        rec = _normalize_messages(raw)
    elif "conversations" in raw:
        rec = _normalize_official(raw)
    else:
        raise DataError(
            "bad_schema", f"record has neither 'conversations' nor 'messages' (keys: {sorted(raw)})"
        )

    roles = [m["role"] for m in rec["messages"]]
    for i, m in enumerate(rec["messages"]):
        if m["role"] == "assistant":
            has_text = any(it["type"] == "text" and it["text"].strip() for it in m["content"])
            if not has_text:
                raise DataError("empty_assistant", f"assistant turn {i} is empty")
        if m["role"] == "system" and i != 0:
            raise DataError(
                "bad_schema", f"system turn at position {i}; only the first turn may be a system turn"
            )
    if "assistant" not in roles:
        raise DataError("empty_assistant", "record has no assistant turn, so nothing to learn from")
    return rec
