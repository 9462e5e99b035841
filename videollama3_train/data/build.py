"""Data configs -> this rank's packed loader and the encoded held-out set.

Annotations are read, every record's cost is estimated once (cached beside the annotations), the epoch's mixture is
packed into micro-batches, and :class:`~videollama3_train.data.loader.PackedLoader` encodes this rank's share.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from pathlib import Path
from typing import Any

from .config import DataConfig, EncodeConfig

log = logging.getLogger("videollama3_train")


def _cost_of(row, *, root, processor, config, dataset):
    from .encode import estimate_cost

    return estimate_cost(row, data_root=root, processor=processor, config=config, dataset=dataset)


def dataset_spec(name: str, d, root: str):
    """The packer's view (``DatasetSpec``) of one configured dataset (``DatasetConfig``) with its resolved root."""
    from .packing import DatasetSpec

    return DatasetSpec(
        name=name, path=str(d.path), root=root, weight=d.weight, repeat=d.repeat, max_samples=d.max_samples
    )


@dataclasses.dataclass
class DataBundle:
    loader: Any
    names: list[str]
    records: list[Any]
    roots: list[str]
    failures: dict[str, dict[str, int]]
    plan_stats: dict[str, float]


def build_train_data(
    dcfg: DataConfig,
    enc: EncodeConfig,
    processor,
    *,
    grad_accum: int,
    rank: int,
    world_size: int,
    is_main: bool,
) -> DataBundle:
    """Annotations -> cost pre-pass (cached) -> mixture + packing plan per epoch -> this rank's loader."""
    from .annotations import load_annotations
    from .encode import encode_record
    from .loader import DatasetEncoder, PackedLoader
    from .packing import build_epoch_plan, compute_costs, config_hash, file_fingerprint

    specs, records, roots, names, costs = [], [], [], [], []
    failures: dict[str, dict[str, int]] = {}
    for name, d in dcfg.dataset_dict().items():
        path = Path(d.path)
        if not path.is_file():
            raise FileNotFoundError(f"data: annotation file of dataset {name!r} not found: {path}")
        root = str(d.root if d.root is not None else path.parent)
        if not Path(root).is_dir():
            raise FileNotFoundError(f"data: media root of dataset {name!r} is not a directory: {root}")
        ds = load_annotations(path)
        key = f"{file_fingerprint(path)}-{config_hash(enc)}-{len(processor.tokenizer)}"
        cache = path.with_name(f".{path.name}.costs.{config_hash(enc)[:12]}.npy") if dcfg.cost_cache else None
        table = compute_costs(
            ds,
            partial(_cost_of, root=root, processor=processor, config=enc, dataset=name),
            num_workers=dcfg.cost_workers,
            cache_path=cache,
            cache_key=key,
            progress=is_main,
        )
        if table.failures:
            reasons = dict(table.reason_counts())
            failures[name] = reasons
            first = next(iter(table.failures.items()))
            if is_main:
                log.warning(
                    "dataset %s: %d of %d records cannot be used %s; first: record %d: %s",
                    name,
                    len(table.failures),
                    len(ds),
                    reasons,
                    first[0],
                    first[1][1],
                )
            frac = len(table.failures) / max(len(ds), 1)
            if frac > dcfg.max_bad_fraction:
                raise RuntimeError(
                    f"dataset {name!r}: {frac:.1%} of records are unusable ({reasons}), above "
                    f"data.max_bad_fraction={dcfg.max_bad_fraction}; run `python -m videollama3_train.doctor` for a "
                    f"full report, or raise data.max_bad_fraction"
                )
        specs.append(dataset_spec(name, d, root))
        records.append(ds)
        roots.append(root)
        names.append(name)
        costs.append(table.costs)

    plan_fn = partial(
        build_epoch_plan,
        specs,
        costs,
        seed=dcfg.seed,
        max_tokens=dcfg.max_tokens,
        max_patches=dcfg.max_patches,
        buffer_size=dcfg.buffer_size,
        num_ranks=world_size,
        grad_accum=grad_accum,
    )

    def plan_for(epoch: int):
        return plan_fn(epoch=epoch)

    plan0 = plan_for(0)
    if plan0.oversized and is_main:
        log.warning(
            "%d samples exceed the packing budget (data.max_tokens=%d, data.max_patches=%d) and are left out; "
            "lower encode.max_visual_tokens / encode.max_length or raise the budget",
            len(plan0.oversized),
            dcfg.max_tokens,
            dcfg.max_patches,
        )
    if plan0.steps == 0:
        raise RuntimeError(
            f"the packing plan has no optimizer step: {sum(len(c) for c in costs)} records over {world_size} ranks "
            f"x trainer.grad_accum={grad_accum}; use more data or a smaller grad_accum"
        )
    encoder = DatasetEncoder(records, roots, names, encode_record, processor=processor, config=enc)
    loader = PackedLoader(
        plan_for,
        rank,
        encoder,
        num_workers=dcfg.num_workers,
        prefetch_factor=dcfg.prefetch_factor,
        pin_memory=True,
        seed=dcfg.seed,
        max_bad_fraction=dcfg.max_bad_fraction,
    )
    return DataBundle(loader, names, records, roots, failures, plan0.stats())


def load_heldout(dcfg: DataConfig, enc: EncodeConfig, processor) -> list[tuple[dict, dict]]:
    """Encoded held-out samples with their raw records (bad ones skipped and counted in the log)."""
    from .annotations import load_annotations, record_at
    from .encode import encode_record
    from .errors import DataError

    if not dcfg.heldout_path:
        return []
    path = Path(dcfg.heldout_path)
    if not path.is_file():
        raise FileNotFoundError(f"data.heldout_path not found: {path}")
    root = dcfg.heldout_root or str(path.parent)
    ds = load_annotations(path)
    out, bad = [], 0
    for i in range(min(len(ds), dcfg.heldout_max_samples)):
        raw = record_at(ds, i)
        try:
            out.append(
                (
                    encode_record(
                        raw,
                        data_root=root,
                        processor=processor,
                        config=enc,
                        dataset="heldout",
                        index=i,
                    ),
                    raw,
                )
            )
        except DataError as e:
            bad += 1
            log.warning("held-out record skipped: %s", e)
    return out
