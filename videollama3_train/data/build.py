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
from .cost_model import SampleCostModel
from .errors import UnusableDataError
from .packing import EpochPlanner, global_rows_per_step

log = logging.getLogger("videollama3_train")


def _cost_of(row, *, root, processor, config, dataset):
    """The record's cost-table row: tokens, patches, and the visual tokens and tower ``sum P_f^2`` the packer's
    FLOPs estimate reads (``encode.Plan.cost_row``)."""
    from .encode import estimate_cost_row

    return estimate_cost_row(row, data_root=root, processor=processor, config=config, dataset=dataset)


def _encode_per_dataset(record, *, dataset: str, configs: dict[str, EncodeConfig], **kwargs):
    """``encode_record`` under the encode config of ``dataset`` (``DatasetConfig.encode_config``: the stage's
    config with the dataset's media clocks), for ``DatasetEncoder``."""
    from .encode import encode_record

    return encode_record(record, dataset=dataset, config=configs[dataset], **kwargs)


@dataclasses.dataclass
class DataBundle:
    loader: Any  # PackedLoader of this rank
    names: list[str]  # dataset names, in the order of the loader's dataset indices
    records: list[Any]  # per dataset: the annotations (memory-mapped datasets.Dataset)
    roots: list[str]  # per dataset: its resolved media root
    failures: dict[str, dict[str, int]]  # dataset -> DataError reason -> records that failed the cost pass
    # epoch 0's plan as this world runs it: PackPlan.stats() with micro_batches_per_rank (incl. padding rows),
    # optimizer_steps, rows_per_step (G), grad_accum, padding_rows_per_step, samples_per_row
    plan_stats: dict[str, float]
    rows_per_step: int = 1  # G: packed rows of one optimizer step, over all ranks (the global batch)
    grad_accum: int = 1  # micro-batches per rank per optimizer step: ceil(G / world size)


def load_costed(dcfg: DataConfig, enc: EncodeConfig, processor, *, is_main: bool, run_dir: str | None = None):
    """``(datasets, records, costs, failures)``: every dataset's annotations and cost table (cached), and the
    failures of the cost pass by reason; a dataset with more than ``data.max_bad_fraction`` unusable records
    stops the run here. The cost pass runs once per job, its records split over the ranks
    (:func:`~.costs.compute_costs`); ``run_dir`` keeps its table when the annotations' folder is read-only
    (``data.cost_cache_dir`` unset)."""
    from .annotations import load_annotations
    from .costs import COST_COLUMNS, compute_costs, cost_cache

    dcfg.check_paths()
    datasets = dcfg.resolved_datasets()
    records, costs = [], []
    failures: dict[str, dict[str, int]] = {}
    for name, d in datasets.items():
        config = d.encode_config(enc)  # the dataset's media clocks
        ds = load_annotations(d.path)
        cache, key = cost_cache(
            d.path, config, processor.tokenizer, cache_dir=dcfg.cost_cache_dir, fallback_dir=run_dir
        )
        table = compute_costs(
            ds,
            partial(_cost_of, root=d.root, processor=processor, config=config, dataset=name),
            num_workers=dcfg.cost_workers,
            cache_path=cache if dcfg.cost_cache else None,
            cache_key=key,
            progress=is_main,
            columns=COST_COLUMNS,
        )
        if table.failures:
            failures[name] = _check_failures(dcfg, name, table, len(ds), is_main=is_main)
        records.append(ds)
        costs.append(table.costs)
    return datasets, records, costs, failures


def _check_failures(dcfg: DataConfig, name: str, table, n: int, *, is_main: bool) -> dict[str, int]:
    reasons = dict(table.reason_counts())
    first = next(iter(table.failures.items()))
    if is_main:
        log.warning(
            "dataset %s: %d of %d records cannot be used %s; first: record %d: %s",
            name,
            len(table.failures),
            n,
            reasons,
            first[0],
            first[1][1],
        )
    frac = len(table.failures) / max(n, 1)
    if frac > dcfg.max_bad_fraction:
        raise UnusableDataError(
            f"dataset {name!r}: {frac:.1%} of records are unusable ({reasons}), above "
            f"data.max_bad_fraction={dcfg.max_bad_fraction}; run `python -m videollama3_train.doctor` for a "
            f"full report, or raise data.max_bad_fraction"
        )
    return reasons


def plan_training(
    dcfg: DataConfig,
    specs,
    costs,
    *,
    global_batch_samples: int | None,
    grad_accum: int,
    world_size: int,
    activation=None,
    cost_model: SampleCostModel | None = None,
) -> EpochPlanner:
    """The packing rule training runs (:class:`~.packing.EpochPlanner`) from the data config: the doctor calls
    this too, so it reports the steps training will run. ``activation``: the model's
    :class:`~.cost_model.ActivationModel`, which with ``data.max_activation_gb`` (resolved by the caller: None or
    0 here = no bound) bounds each row's predicted activation peak. ``cost_model`` (the stage's model dimensions):
    the rows of a step are dealt level on predicted compute as well as tokens and patches."""
    limit = int((dcfg.max_activation_gb or 0) * 1e9) if activation is not None else 0
    return EpochPlanner(
        specs,
        costs,
        seed=dcfg.seed,
        max_tokens=dcfg.max_tokens,
        max_patches=dcfg.max_patches,
        buffer_size=dcfg.buffer_size,
        global_batch_samples=global_batch_samples,
        grad_accum=grad_accum,
        world_size=world_size,
        activation=activation,
        max_activation_bytes=limit,
        cost_model=cost_model,
    )


def build_train_data(
    dcfg: DataConfig,
    enc: EncodeConfig,
    processor,
    *,
    grad_accum: int,
    rank: int,
    world_size: int,
    is_main: bool,
    global_batch_samples: int | None = None,
    run_dir: str | None = None,
    activation=None,
    cost_model: SampleCostModel | None = None,
) -> DataBundle:
    """Annotations -> cost pre-pass (cached) -> mixture + global packing plan per epoch -> this rank's loader.

    The plan of each epoch is global (``G`` rows per optimizer step, :func:`plan_training`), independent of the
    world size; the loader deals each step's rows to the ranks (``grad_accum = ceil(G / world_size)`` each; the
    trainer takes it from the loader). ``activation``: see :func:`plan_training`."""
    from .loader import DatasetEncoder, PackedLoader

    datasets, records, costs, failures = load_costed(dcfg, enc, processor, is_main=is_main, run_dir=run_dir)
    names, roots = list(datasets), [d.root for d in datasets.values()]
    configs = {name: d.encode_config(enc) for name, d in datasets.items()}  # per-dataset media clocks
    planner = plan_training(
        dcfg,
        list(datasets.values()),
        costs,
        global_batch_samples=global_batch_samples,
        grad_accum=grad_accum,
        world_size=world_size,
        activation=activation,
        cost_model=cost_model,
    )
    encoder = DatasetEncoder(
        records, roots, names, partial(_encode_per_dataset, configs=configs), processor=processor
    )
    loader = PackedLoader(
        planner,
        rank,
        encoder,
        world_size=world_size,
        num_workers=dcfg.num_workers,
        prefetch_factor=dcfg.prefetch_factor,
        pin_memory=True,
        seed=dcfg.seed,
        max_bad_fraction=dcfg.max_bad_fraction,
    )
    stats = _epoch0_stats(dcfg, loader, sum(len(c) for c in costs), is_main=is_main)
    return DataBundle(loader, names, records, roots, failures, stats, loader.rows_per_step, loader.grad_accum)


def _epoch0_stats(dcfg: DataConfig, loader, records: int, *, is_main: bool) -> dict[str, float]:
    """Epoch 0's plan as this world runs it (``DataBundle.plan_stats``), with its warnings."""
    plan0, rows, world = loader.plan(0), loader.rows_per_step, loader.world_size
    if len(plan0.oversized) and is_main:
        log.warning(
            "%d samples exceed the packing budget (data.max_tokens=%d, data.max_patches=%d, "
            "data.max_activation_gb=%s: %d of them by their predicted activation memory) and are left out; "
            "lower encode.max_visual_tokens / encode.max_length or raise the budget",
            len(plan0.oversized),
            dcfg.max_tokens,
            dcfg.max_patches,
            dcfg.max_activation_gb,
            len(plan0.rows.over_memory),
        )
    if plan0.steps == 0:
        raise UnusableDataError(
            f"the packing plan has no optimizer step: {records} records, {rows} packed rows per step; use more data"
        )
    stats = plan0.stats()
    stats.update(
        micro_batches_per_rank=plan0.steps * loader.grad_accum,  # this rank's, padding rows included
        optimizer_steps=plan0.steps,
        rows_per_step=rows,
        grad_accum=loader.grad_accum,
        padding_rows_per_step=loader.padding_per_step,
        samples_per_row=stats["samples_packed"] / max(len(plan0.rows), 1),
    )
    # the global batch itself is printed by the train command; the idle share is this module's to say
    if is_main and loader.padding_per_step:
        log.warning(
            "%d ranks do not divide the %d rows of a step: %d of the %d micro-batches of each step are empty "
            "(%.0f%% of the ranks' time idle); a world size dividing %d, or another "
            "trainer.global_batch_samples, avoids it",
            world,
            rows,
            loader.padding_per_step,
            world * loader.grad_accum,
            100 * loader.padding_per_step / (world * loader.grad_accum),
            rows,
        )
    return stats


def load_heldout(dcfg: DataConfig, enc: EncodeConfig, processor) -> tuple[list[tuple[dict, dict]], int]:
    """``(samples, bad)``: encoded held-out samples with their raw records, and the number of held-out records that
    failed to encode (skipped, each logged; the evaluation reports the count beside its accuracy)."""
    from .annotations import load_annotations, record_at
    from .encode import encode_record
    from .errors import DataError

    if not dcfg.heldout_path:
        return [], 0
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
    return out, bad


__all__ = [
    "DataBundle",
    "build_train_data",
    "global_rows_per_step",
    "load_costed",
    "load_heldout",
    "plan_training",
]
