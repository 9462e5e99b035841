"""Annotation files -> Arrow datasets, and both annotation schemas -> one internal record form.

Two schemas are read (docs/data_format.md):

* official VideoLLaMA3: ``{"image": str|[str], "video": str|[str], "conversations": [{"from", "value"}]}`` with
  ``<image>`` / ``<video>`` placeholders inside ``value``;
* chat messages (transformers' processor form): ``{"messages": [{"role", "content": str | [items]}]}``.

Both become ``{"messages": [{"role": "system"|"user"|"assistant", "content": [item, ...]}]}`` where an item is
``{"type": "text", "text"}``, ``{"type": "image", "path"}`` or ``{"type": "video", "path", "start", "end"}``
(``path`` of a video is a string, or a list of frame image paths for a video given frame by frame).

Official records are read as the official training code (``videollama3/train.py``, ``_convert_normal``) reads
them where that is sane: leading assistant turns are dropped (counted and logged, :func:`leading_turns_dropped`);
streaming records (``_convert_stream``) are rejected as ``unsupported_streaming``. Where this reader differs on
purpose (system turns not trained, ``user`` read as a user, ...): the table in docs/data_format.md.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, overload

from .errors import DataError

__all__ = [
    "iter_records",
    "leading_turns_dropped",
    "load_annotations",
    "normalize_record",
    "record_at",
    "RECORD_COLUMN",
    "IMAGE_EXTENSIONS",
]

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
# Keys of the official code's streaming records (``"stream": true``, ``conversation`` with timed turns, a clip given
# by ``start_time`` / ``end_time``), which this reader does not support.
_STREAMING_KEYS = ("stream", "conversation", "start_time", "end_time")

log = logging.getLogger(__name__)
# Leading assistant turns dropped by normalize_record in this process: records (normalisations) and turns.
_DROPPED = {"records": 0, "turns": 0}


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------


def _check_file(path: str | os.PathLike) -> str:
    """``path`` as a string, after the checks that fail a whole file: missing (``missing_file``), 0 bytes
    (``empty_file``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError("missing_file", "annotation file not found", path=path)
    if os.path.getsize(path) == 0:
        raise DataError("empty_file", "annotation file is empty", path=path)
    return path


def _parse(path: str) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    """``(index, record or the DataError of a bad record)`` of every record of ``path``."""
    # bytes, decoded line by line: invalid UTF-8 is then reported with its line instead of failing the whole read
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith(b"["):
            # A JSON list cannot be streamed without a streaming parser; it is parsed whole (JSONL never is).
            try:
                records = json.loads(f.read().decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(
                    "bad_text", f"not valid UTF-8 at byte {e.start} ({e.reason})", path=path
                ) from None
            except json.JSONDecodeError as e:
                raise DataError("bad_schema", f"not valid JSON: {e}", path=path) from None
            for i, rec in enumerate(records):
                if not isinstance(rec, dict):
                    msg = f"record is a {type(rec).__name__}, not an object"
                    rec = DataError("bad_schema", msg, index=i, path=path)
                yield i, rec
            return
        index = 0
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
                if not isinstance(rec, dict):
                    rec = DataError(
                        "bad_schema", f"line {lineno} is not a JSON object", index=index, path=path
                    )
            except UnicodeDecodeError as e:
                msg = f"line {lineno} is not valid UTF-8 (byte {e.start}: {e.reason})"
                rec = DataError("bad_text", msg, index=index, path=path)
            except json.JSONDecodeError as e:
                rec = DataError("bad_schema", f"line {lineno} is not valid JSON: {e}", index=index, path=path)
            yield index, rec
            index += 1


@overload
def iter_records(path: str | os.PathLike, *, strict: Literal[True] = ...) -> Iterator[dict[str, Any]]: ...


@overload
def iter_records(
    path: str | os.PathLike, *, strict: Literal[False]
) -> Iterator[tuple[int, dict[str, Any] | DataError]]: ...


def iter_records(path, *, strict=True):
    """Stream the records of a JSON-list or JSONL annotation file: THE annotation reader (training's
    :func:`load_annotations`, the doctor and ``prepare`` all read through it).

    A record is one element of the list, or one non-blank line of a JSONL file (blank lines are skipped and not
    counted); its *index* is its position among records, the number training reports as ``record N``. JSONL is
    streamed line by line and never held whole; a JSON list is parsed whole.

    ``strict=True`` (training, ``prepare``): yields each record dict; the first bad record raises ``DataError``
    with its index and line -- ``bad_text`` (``"line N is not valid UTF-8 ..."``) or ``bad_schema``
    (``"line N is not valid JSON: ..."``, ``"line N is not a JSON object"``, ``"record is a list, not an
    object"`` in a JSON list).

    ``strict=False`` (the doctor's scan): yields ``(index, record)`` for every record, where ``record`` is the
    dict, or the ``DataError`` the strict mode would have raised for it (not raised), so a scan counts every bad
    line and goes on.

    In both modes a file that cannot be read at all raises ``DataError`` when ``iter_records`` is called (before
    the first record): ``missing_file``, ``empty_file``; and, on the first ``next()``, a JSON list that is not
    valid UTF-8 (``bad_text``) or not valid JSON (``bad_schema``). A record's *schema* (``conversations`` /
    ``messages``) is not checked here: that is :func:`normalize_record`'s job, per record.
    """
    records = _parse(_check_file(path))
    return _raise_first_bad(records) if strict else records


def _raise_first_bad(records: Iterator[tuple[int, dict[str, Any] | DataError]]) -> Iterator[dict[str, Any]]:
    for _, rec in records:
        if isinstance(rec, DataError):
            raise rec
        yield rec


def _iter_json_records(path: str, mtime_ns: int, size: int) -> Iterator[dict[str, str]]:
    """Rows of :func:`load_annotations`' dataset: each record re-serialised as one JSON string.

    ``mtime_ns`` / ``size`` are unused here: they enter ``datasets``' cache fingerprint so an edited file is
    re-read instead of served stale from the cache.
    """
    del mtime_ns, size
    for rec in iter_records(path):
        yield {RECORD_COLUMN: json.dumps(rec, ensure_ascii=False)}


def load_annotations(path: str | os.PathLike, *, cache_dir: str | None = None):
    """Read a JSON list or JSONL annotation file (through :func:`iter_records`, strict) into a memory-mapped
    ``datasets.Dataset``.

    Each row holds one record as a JSON string in column ``record`` (read it back with :func:`record_at`).
    Why a string column and not Arrow columns: real annotation files mix types across rows (``image`` is a string
    in one record and a list in the next, ``value`` may be absent, extra keys come and go), which makes Arrow's
    schema inference fail or silently null fields; one string column accepts any record, keeps it byte-for-byte,
    and still gives memory-mapped random access. Schema checks happen in :func:`normalize_record`, per record,
    so one bad record is reported with its index instead of failing the whole load.
    """
    import datasets

    # checked here, not only in the generator: datasets would wrap the DataError of a missing / empty file
    path = Path(_check_file(path))
    st = path.stat()
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


def leading_turns_dropped() -> dict[str, int]:
    """``{"records": r, "turns": t}``: how often :func:`normalize_record` dropped leading assistant turns in this
    process (a record is counted each time it is normalised: by the cost pass, then at every encode)."""
    return dict(_DROPPED)


def _note_dropped(turns: int, text: str) -> None:
    _DROPPED["records"] += 1
    _DROPPED["turns"] += turns
    n = _DROPPED["records"]
    if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th, ... time: a running count, not a line per record
        log.warning(
            "dropped %d leading assistant turn(s) of a record, before its first human/user or system turn, as the "
            "official code does (first dropped text: %r); %d record(s), %d turn(s) dropped so far in this process",
            turns,
            text[:80],
            n,
            _DROPPED["turns"],
        )


def _folder_hint(images: list[str]) -> str:
    """The placeholder_mismatch hint for an ``image`` path that may be a folder (no image file extension)."""
    odd = next((p for p in images if not p.lower().endswith((*IMAGE_EXTENSIONS, ".gif"))), None)
    if odd is None:
        return ""
    return (
        f"; {odd!r} has no image file extension: if it is a folder, a folder under 'image' (one image per file "
        "in the official code) is not supported: list its files under 'image', or give it under 'video' to read "
        "it as one video"
    )


def _normalize_official(raw: dict[str, Any]) -> dict[str, Any]:
    images = _as_list(raw.get("image"), "image")
    folder = next((p for p in images if p.endswith(("/", "\\"))), None)
    if folder is not None:
        raise DataError(
            "unsupported_image_folder",
            f"'image' names a folder ({folder!r}). The official code reads a folder under 'image' as one image "
            "per file (one <image> tag each); not supported here: list its files under 'image', or give the "
            "folder under 'video' to read it as one video (frame folder)",
        )
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
    # As the official code: turns before the first human/user or system turn are dropped (with a counted warning).
    first = next((i for i, (role, _) in enumerate(texts) if role != "assistant"), None)
    if first is None:
        raise DataError("bad_schema", "'conversations' holds only assistant turns (no human/user/system)")
    if first:
        _note_dropped(first, texts[0][1])
        texts = texts[first:]

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
                "placeholder_mismatch",
                f"{n_image_tags} <image> placeholders for {len(images)} image(s){_folder_hint(images)}",
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
    ``empty_assistant``, ``bad_text``, ``unsupported_streaming`` (a streaming record: ``"stream": true``, or a
    ``conversation``, ``start_time`` or ``end_time`` key) or ``unsupported_image_folder`` (an official ``image``
    path ending in ``/``; one without is found when it is opened); dataset and record index are filled in by the
    caller. Leading assistant turns of an official record are dropped, as the official code drops them.
    """
    if not isinstance(raw, dict):
        raise DataError("bad_schema", f"record must be an object, got {type(raw).__name__}")
    streaming = [k for k in _STREAMING_KEYS if k in raw and (k != "stream" or raw[k])]
    if streaming:
        raise DataError(
            "unsupported_streaming",
            f"streaming record (keys {streaming}): the official code's streaming format ('stream': true, timed "
            "turns under 'conversation', a clip from 'start_time' to 'end_time') is not supported; records need "
            "'conversations' or 'messages' (a clip: 'start' / 'end')",
        )
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
