"""The cost pre-pass: ``(LLM tokens, vision patches)`` of every record, measured once without decoding pixels,
in parallel, and cached (:func:`cost_cache` names the file and its key).

A record that raises ``DataError`` gets cost ``-1`` and its reason is kept: it is reported, never silently lost and
never decoded later. The packer (:mod:`.packing`) and the doctor (:mod:`.scan`) read the table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import EncodeConfig
from .errors import DataError
from .pool import parallel_map

logger = logging.getLogger(__name__)

TOKENS, PATCHES = 0, 1  # columns of a cost table

# ============================================================================================================
# Cost pre-pass
# ============================================================================================================


@dataclass
class CostTable:
    """``costs``: int64 ``(N, 2)`` = (LLM tokens, vision patches) per record, ``-1`` for a record that failed.
    ``failures``: record index -> (DataError reason, message)."""

    costs: np.ndarray
    failures: dict[int, tuple[str, str]] = field(default_factory=dict)

    def reason_counts(self) -> Counter:
        return Counter(reason for reason, _ in self.failures.values())


def file_fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of an annotation file: path, size and mtime (ns). Content hashing is left to callers."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def config_hash(config: Any) -> str:
    """Stable hash of a dataclass / mapping / anything with a stable ``repr`` (e.g. ``EncodeConfig``)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    text = json.dumps(config, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# EncodeConfig fields that never change a record's cost: compression only prunes tokens after the cost pass
# (costs are upper bounds then), and how frames are decoded does not change their target size.
COST_FREE_FIELDS = ("use_token_compression", "compression_threshold", "decode_scale", "frame_cache_dir")


def cost_config_hash(encode: EncodeConfig) -> str:
    """Hash of the encode fields a record's cost depends on: two configs with the same hash cost every record the
    same (stages 1-3 share one cost table; stage 4 merges images, so it needs its own)."""
    fields = dataclasses.asdict(encode)
    for k in COST_FREE_FIELDS:
        fields.pop(k, None)
    return config_hash(fields)


def cost_cache(annotation_path: str | os.PathLike, encode: EncodeConfig, tokenizer: Any) -> tuple[Path, str]:
    """``(cache file, cache key)`` of the cost table of one annotation file: THE cost-cache scheme, for training
    and the doctor alike (pass both to :func:`compute_costs`).

    The file is ``.<annotations>.<hash>.costs.npy`` beside the annotations, one per cost-relevant encode config;
    the key adds what invalidates it without changing the name: the annotation file's size and mtime
    (:func:`file_fingerprint`), the tokenizer (its class, name and vocabulary size: token counts depend on it) and
    the planning rules' version (``encode.PLAN_VERSION``: a table costed under older rules is not reused).
    """
    from .encode import PLAN_VERSION

    p = Path(annotation_path)
    h = cost_config_hash(encode)
    tok = f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"
    return p.with_name(f".{p.name}.{h[:12]}.costs.npy"), f"{file_fingerprint(p)}-{h}-{tok}-plan{PLAN_VERSION}"


# Worker-side state: the records and the cost function are sent once per worker (initializer), then each task
# is a range of indices, so a large Dataset is not pickled per chunk.
_WORKER: dict[str, Any] = {}


def _init_worker(records: Any, cost_fn: Callable) -> None:
    _WORKER["records"] = records
    _WORKER["cost_fn"] = cost_fn


def _cost_range(span: tuple[int, int]) -> tuple[int, np.ndarray, dict[int, tuple[str, str]]]:
    """``(start, costs (stop - start, 2), failures)`` of the records ``start:stop`` (compact: 16 bytes a record)."""
    (start, stop), records, cost_fn = span, _WORKER["records"], _WORKER["cost_fn"]
    costs = np.full((stop - start, 2), -1, dtype=np.int64)
    failures = {}
    for i in range(start, stop):
        try:
            costs[i - start] = cost_fn(i if records is None else records[i])
        except DataError as e:
            failures[i] = (e.reason, str(e))
    return start, costs, failures


def compute_costs(
    records: Sequence[Any] | int,
    cost_fn: Callable[[Any], tuple[int, int]],
    *,
    num_workers: int = 0,
    cache_path: str | os.PathLike | None = None,
    cache_key: str | None = None,
    chunk_size: int = 256,
    progress: bool = True,
) -> CostTable:
    """(tokens, patches) of every record, in parallel, cached.

    ``records``: an indexable sequence (``cost_fn(records[i])``) or a count ``N`` (``cost_fn(i)``).
    ``cost_fn`` must be picklable when ``num_workers > 1`` and raise ``DataError`` for a bad record (recorded,
    not fatal; any other exception is a bug and propagates). ``num_workers <= 1`` runs in this process.
    ``cache_path`` + ``cache_key``: reuse a table computed under the same key (:func:`cost_cache` gives both); a
    stale or unreadable cache is recomputed. Returns a :class:`CostTable` with ``costs`` int64 ``(N, 2)``.
    """
    n = records if isinstance(records, int) else len(records)
    seq = None if isinstance(records, int) else records
    if cache_path is not None:
        cached = _load_cache(Path(cache_path), cache_key, n)
        if cached is not None:
            return cached

    costs = np.full((n, 2), -1, dtype=np.int64)
    failures: dict[int, tuple[str, str]] = {}
    spans = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    try:
        chunks = parallel_map(
            _cost_range,
            spans,
            workers=num_workers,
            desc="cost pre-pass",
            unit="rec",
            progress=progress,
            weight=lambda span: span[1] - span[0],
            initializer=_init_worker,
            initargs=(seq, cost_fn),
        )
    finally:
        _WORKER.clear()  # the inline run filled it in this process
    for start, part, failed in chunks:
        costs[start : start + len(part)] = part
        failures.update(failed)

    table = CostTable(costs, failures)
    if failures:
        logger.warning(
            "cost pre-pass: %d of %d records failed: %s", len(failures), n, dict(table.reason_counts())
        )
    if cache_path is not None:
        _save_cache(Path(cache_path), cache_key, table)
    return table


def _sidecar(cache_path: Path) -> Path:
    return cache_path.with_name(cache_path.name + ".json")


def _load_cache(cache_path: Path, key: str | None, n: int) -> CostTable | None:
    meta_path = _sidecar(cache_path)
    if not cache_path.exists() or not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        costs = np.load(cache_path)
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable cost cache %s: %s", cache_path, e)
        return None
    if meta.get("key") != key or costs.shape != (n, 2):
        return None
    failures = {int(i): (r, m) for i, (r, m) in meta.get("failures", {}).items()}
    return CostTable(costs.astype(np.int64), failures)


def _save_cache(cache_path: Path, key: str | None, table: CostTable) -> None:
    # Write to temporary names then rename, so an interrupted run never leaves a half-written cache behind.
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(cache_path.name + f".tmp{os.getpid()}.npy")
        np.save(tmp, table.costs)
        meta = {"key": key, "failures": {str(i): list(v) for i, v in table.failures.items()}}
        tmp_meta = _sidecar(tmp)
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, _sidecar(cache_path))
        os.replace(tmp, cache_path)
    except OSError as e:  # e.g. a read-only annotation folder: the run goes on, only slower next time
        logger.warning("could not write cost cache %s: %s", cache_path, e)
