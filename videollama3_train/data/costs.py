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
# columns the packer's FLOPs estimate reads (data.cost_model), in tables costed with columns=COST_COLUMNS: the
# visual tokens reaching the LLM and the tower's sum P_f^2 over images / frames; -1 where a record's is not known
VISUAL_TOKENS, PATCHES_SQ = 2, 3
COST_COLUMNS = 4

# ============================================================================================================
# Cost pre-pass
# ============================================================================================================


@dataclass
class CostTable:
    """``costs``: int64 ``(N, 2)`` = (LLM tokens, vision patches) per record, ``-1`` for a record that failed
    (``(N, COST_COLUMNS)`` with the visual tokens and ``sum P_f^2`` after them when costed with them).
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


def cost_cache(
    annotation_path: str | os.PathLike,
    encode: EncodeConfig,
    tokenizer: Any,
    *,
    cache_dir: str | os.PathLike | None = None,
    fallback_dir: str | os.PathLike | None = None,
) -> tuple[Path, str]:
    """``(cache file, cache key)`` of the cost table of one annotation file: THE cost-cache scheme, for training
    and the doctor alike (pass both to :func:`compute_costs`).

    The file is ``.<annotations>.<hash>.costs.npy``, one per cost-relevant encode config, in ``cache_dir``
    (``data.cost_cache_dir``) when given, else beside the annotations, or in ``fallback_dir`` (the run
    directory) when the annotations' folder is read-only and holds no table yet (a dataset on a read-only mount
    would otherwise be costed again on every run). The key adds what invalidates it without changing the name:
    the annotation file's size and mtime (:func:`file_fingerprint`), the tokenizer (its class, name and
    vocabulary size: token counts depend on it) and the planning rules' version (``encode.PLAN_VERSION``: a
    table costed under older rules is not reused).
    """
    from .encode import PLAN_VERSION

    p = Path(annotation_path)
    h = cost_config_hash(encode)
    tok = f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"
    name = f".{p.name}.{h[:12]}.costs.npy"
    if cache_dir is not None:
        where = Path(cache_dir)
    else:
        where = p.parent
        if fallback_dir is not None and not (where / name).exists() and not os.access(where, os.W_OK):
            where = Path(fallback_dir)
    return where / name, f"{file_fingerprint(p)}-{h}-{tok}-plan{PLAN_VERSION}"


# Worker-side state: the records and the cost function are sent once per worker (initializer), then each task
# is a range of indices, so a large Dataset is not pickled per chunk.
_WORKER: dict[str, Any] = {}


def _init_worker(records: Any, cost_fn: Callable, columns: int = 2) -> None:
    _WORKER["records"] = records
    _WORKER["cost_fn"] = cost_fn
    _WORKER["columns"] = columns


def _cost_range(span: tuple[int, int]) -> tuple[int, np.ndarray, dict[int, tuple[str, str]]]:
    """``(start, costs (stop - start, columns), failures)`` of the records ``start:stop`` (compact: 8 bytes a
    column). A cost shorter than ``columns`` leaves the rest -1 (not known), a longer one is cut."""
    (start, stop), records, cost_fn = span, _WORKER["records"], _WORKER["cost_fn"]
    columns = _WORKER.get("columns", 2)
    costs = np.full((stop - start, columns), -1, dtype=np.int64)
    failures = {}
    rows = _rows(records, start, stop)
    for i in range(start, stop):
        try:
            cost = cost_fn(i if rows is None else rows[i - start])
            costs[i - start, : min(len(cost), columns)] = cost[:columns]
        except DataError as e:
            failures[i] = (e.reason, str(e))
    return start, costs, failures


def _rows(records: Any, start: int, stop: int) -> Sequence[Any] | None:
    """Records ``start:stop``; a ``datasets.Dataset`` is read as one slice (one Arrow read for the range:
    9 against 28 us a record, 256 at a time) and handed out as the rows ``records[i]`` would give."""
    if records is None:
        return None
    columns = getattr(records, "column_names", None)
    if columns is None:
        return [records[i] for i in range(start, stop)]
    batch = records[start:stop]
    return [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]


def compute_costs(
    records: Sequence[Any] | int,
    cost_fn: Callable[[Any], tuple[int, int]],
    *,
    num_workers: int = 0,
    cache_path: str | os.PathLike | None = None,
    cache_key: str | None = None,
    chunk_size: int = 256,
    progress: bool = True,
    distributed: bool = True,
    columns: int = 2,
) -> CostTable:
    """(tokens, patches) of every record, in parallel, cached; ``columns=COST_COLUMNS`` keeps the visual-token and
    ``sum P_f^2`` columns too (``cost_fn`` returning ``encode.Plan.cost_row``).

    ``records``: an indexable sequence (``cost_fn(records[i])``) or a count ``N`` (``cost_fn(i)``).
    ``cost_fn`` must be picklable when ``num_workers > 1`` and raise ``DataError`` for a bad record (recorded,
    not fatal; any other exception is a bug and propagates). ``num_workers <= 1`` runs in this process.
    ``cache_path`` + ``cache_key``: reuse a table computed under the same key (:func:`cost_cache` gives both); a
    stale or unreadable cache is recomputed. Returns a :class:`CostTable` with ``costs`` int64 ``(N, columns)``
    (a cached table with fewer columns is used, its missing columns -1: estimated by the packer).

    Under a process group (``distributed``, the default, and ``torch.distributed`` initialised) the pass runs once
    per job, not once per rank: every rank costs every world-th chunk of records with its ``num_workers``
    processes, then the table and the failures are combined on all ranks (:func:`_gather_table`), equal to a
    one-process pass (``tests/test_costing.py``, 2 processes); only ``LOCAL_RANK`` 0 writes the cache, and the
    cache is used only when every rank can read it. All ranks must call it with the same records.
    """
    n = records if isinstance(records, int) else len(records)
    seq = None if isinstance(records, int) else records
    rank, world = _process_group() if distributed else (0, 1)
    cached = _load_cache(Path(cache_path), cache_key, n, columns) if cache_path is not None else None
    if world > 1:  # every rank must take the same branch: the cache is used only when all of them read it
        cached = cached if _all_ranks(cached is not None) else None
    if cached is not None:
        return cached

    costs = np.full((n, columns), -1, dtype=np.int64)
    failures: dict[int, tuple[str, str]] = {}
    # Ranks take every world-th chunk (interleaved, so the video-heavy parts of a file are shared too).
    spans = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)][rank::world]
    try:
        chunks = parallel_map(
            _cost_range,
            spans,
            workers=num_workers,
            desc="cost pre-pass" if world == 1 else f"cost pre-pass (rank 0's 1/{world} share)",
            unit="rec",
            progress=progress,
            weight=lambda span: span[1] - span[0],
            initializer=_init_worker,
            initargs=(seq, cost_fn, columns),
        )
    finally:
        _WORKER.clear()  # the inline run filled it in this process
    for start, part, failed in chunks:
        costs[start : start + len(part)] = part
        failures.update(failed)
    if world > 1:
        costs, failures = _gather_table(costs, failures)

    table = CostTable(costs, failures)
    if failures and rank == 0:
        logger.warning(
            "cost pre-pass: %d of %d records failed: %s", len(failures), n, dict(table.reason_counts())
        )
    # one writer per node (the cache may be node-local); the write is atomic, so writers never tear a file
    if cache_path is not None and int(os.environ.get("LOCAL_RANK", rank)) == 0:
        _save_cache(Path(cache_path), cache_key, table)
    if world > 1 and cache_path is not None:
        import torch.distributed as dist

        dist.barrier()  # the table is on disk when any rank returns: a later pass of this job reads it everywhere
    return table


def _process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device():
    """Where the default group's tensors must live: the current GPU under NCCL alone (it refuses CPU tensors),
    else the CPU (gloo, or a group with a CPU backend beside NCCL)."""
    import torch
    import torch.distributed as dist

    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_ranks(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (one all-reduce)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _gather_table(
    costs: np.ndarray, failures: dict[int, tuple[str, str]]
) -> tuple[np.ndarray, dict[int, tuple[str, str]]]:
    """Every rank's rows into one table on every rank: rows a rank did not cost hold -1, so an element-wise max
    over ranks is the table (16 bytes a record); the failures (few, small) are gathered as objects."""
    import torch
    import torch.distributed as dist

    t = torch.from_numpy(costs).to(_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    parts: list[dict[int, tuple[str, str]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, failures)
    merged = {i: tuple(v) for part in parts for i, v in (part or {}).items()}
    return t.cpu().numpy(), dict(sorted(merged.items()))


def load_cost_table(
    cache_path: str | os.PathLike, key: str | None, n: int, columns: int = 2
) -> CostTable | None:
    """The cached table of :func:`cost_cache`'s ``(cache_path, key)`` for ``n`` records, or None (absent, stale or
    unreadable): how a command other than training (the doctor) reads the table training shares."""
    return _load_cache(Path(cache_path), key, n, columns)


def save_cost_table(cache_path: str | os.PathLike, key: str | None, table: CostTable) -> None:
    """Write ``table`` where :func:`compute_costs` would (atomically; a read-only folder is logged, not fatal), so
    that a later training run with the same key reads it instead of costing again."""
    _save_cache(Path(cache_path), key, table)


def _sidecar(cache_path: Path) -> Path:
    return cache_path.with_name(cache_path.name + ".json")


def _load_cache(cache_path: Path, key: str | None, n: int, columns: int = 2) -> CostTable | None:
    meta_path = _sidecar(cache_path)
    if not cache_path.exists() or not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        costs = np.load(cache_path)
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable cost cache %s: %s", cache_path, e)
        return None
    if meta.get("key") != key or costs.ndim != 2 or len(costs) != n or costs.shape[1] < 2:
        return None
    if costs.shape[1] < columns:
        # a table costed before the FLOPs columns existed: still used (a video set's cost pass is long), its
        # missing columns -1, which the packer's cost model estimates per sample (data.cost_model)
        logger.warning(
            "cost cache %s has %d columns, not %d: the packer estimates the visual tokens and tower sum P_f^2 of "
            "its records (delete the file to cost them exactly)",
            cache_path,
            costs.shape[1],
            columns,
        )
        costs = np.concatenate([costs, np.full((n, columns - costs.shape[1]), -1, dtype=costs.dtype)], axis=1)
    costs = costs[:, :columns]
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
