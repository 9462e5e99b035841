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


def global_rows_per_step(
    global_batch_samples: int | None, grad_accum: int, world_size: int, samples_per_row: float
) -> int:
    """``G``, the packed rows of one optimizer step over all ranks.

    With ``global_batch_samples`` (the recipe's batch in samples) it is ``round(global_batch_samples /
    samples_per_row)`` (at least 1), ``samples_per_row`` being epoch 0's mean: the same on every world size, so a
    recipe trains on the same steps on 1, 8 or 64 GPUs and a run can resume at another world size. Without it,
    ``grad_accum x world_size`` (``trainer.grad_accum`` rows per rank, as before: the global batch then scales
    with the world size)."""
    if global_batch_samples is None:
        return grad_accum * world_size
    if global_batch_samples < 1:
        raise ValueError(f"trainer.global_batch_samples must be >= 1 or None, got {global_batch_samples}")
    if not samples_per_row > 0:
        raise ValueError("no packed row in epoch 0: cannot turn trainer.global_batch_samples into rows")
    return max(1, round(global_batch_samples / samples_per_row))


def _cost_tables(dcfg: DataConfig, datasets, configs, processor, *, is_main: bool, run_dir: str | None):
    """``(records, cost tables, failures)`` per dataset: annotations read, every record costed once per job
    (cached), bad records counted and logged; raises RuntimeError above ``data.max_bad_fraction``."""
    from .annotations import load_annotations
    from .costs import compute_costs, cost_cache

    records, costs = [], []
    failures: dict[str, dict[str, int]] = {}
    for name, d in datasets.items():
        ds = load_annotations(d.path)
        cache, key = cost_cache(
            d.path, configs[name], processor.tokenizer, cache_dir=dcfg.cost_cache_dir, fallback_dir=run_dir
        )
        table = compute_costs(
            ds,
            partial(_cost_of, root=d.root, processor=processor, config=configs[name], dataset=name),
            num_workers=dcfg.cost_workers,
            cache_path=cache if dcfg.cost_cache else None,
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
        records.append(ds)
        costs.append(table.costs)
    return records, costs, failures


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
) -> DataBundle:
    """Annotations -> cost pre-pass (cached) -> mixture + global packing plan per epoch -> this rank's loader.

    The plan of each epoch is global (``G`` rows per optimizer step, :func:`global_rows_per_step`), independent
    of the world size; the loader deals each step's rows to the ranks (``grad_accum = ceil(G / world_size)``
    each; the trainer takes it from the loader). The cost pass runs once per job, its records split over the
    ranks (:func:`~.costs.compute_costs`); ``run_dir`` keeps its table when the annotations' folder is
    read-only (``data.cost_cache_dir`` unset)."""
    from .loader import DatasetEncoder, PackedLoader
    from .packing import build_epoch_plan

    dcfg.check_paths()
    datasets = dcfg.resolved_datasets()
    configs = {name: d.encode_config(enc) for name, d in datasets.items()}  # per-dataset media clocks
    records, costs, failures = _cost_tables(
        dcfg, datasets, configs, processor, is_main=is_main, run_dir=run_dir
    )

    names = list(datasets)
    roots = [d.root for d in datasets.values()]
    specs = list(datasets.values())

    def plan_for(epoch: int, rows: int):
        return build_epoch_plan(
            specs,
            costs,
            seed=dcfg.seed,
            epoch=epoch,
            max_tokens=dcfg.max_tokens,
            max_patches=dcfg.max_patches,
            buffer_size=dcfg.buffer_size,
            num_ranks=rows,  # the global plan: G rows per step, dealt to the ranks by the loader
            grad_accum=1,
            drop_last=False,  # the rows short of a whole step make a last, smaller step: no sample left out
        )

    samples_per_row = 0.0
    if global_batch_samples is not None:
        # the rows of a pack do not depend on how they are grouped into steps: one probe gives their mean fill
        probe = plan_for(0, 1).stats()
        samples_per_row = probe["samples_packed"] / max(probe["micro_batches_per_rank"], 1)
    rows = global_rows_per_step(global_batch_samples, grad_accum, world_size, samples_per_row)

    encoder = DatasetEncoder(
        records, roots, names, partial(_encode_per_dataset, configs=configs), processor=processor
    )
    # the loader builds (and keeps) epoch 0's plan; it is read back here, not packed a second time
    loader = PackedLoader(
        partial(plan_for, rows=rows),
        rank,
        encoder,
        world_size=world_size,
        num_workers=dcfg.num_workers,
        prefetch_factor=dcfg.prefetch_factor,
        pin_memory=True,
        seed=dcfg.seed,
        max_bad_fraction=dcfg.max_bad_fraction,
    )
    plan0 = loader.plan(0)
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
            f"the packing plan has no optimizer step: {sum(len(c) for c in costs)} records, {rows} packed rows "
            "per step; use more data"
        )
    stats = plan0.stats()
    packed_rows = sum(1 for slot in plan0.micro_batches for mb in slot if mb)
    stats.update(
        micro_batches_per_rank=plan0.steps * loader.grad_accum,  # this rank's, padding rows included
        optimizer_steps=plan0.steps,
        rows_per_step=rows,
        grad_accum=loader.grad_accum,
        padding_rows_per_step=loader.padding_per_step,
        samples_per_row=stats["samples_packed"] / max(packed_rows, 1),
    )
    # the global batch itself is printed by the train command (run.py); the idle share is this module's to say
    if is_main and loader.padding_per_step:
        log.warning(
            "%d ranks do not divide the %d rows of a step: %d of the %d micro-batches of each step are empty "
            "(%.0f%% of the ranks' time idle); a world size dividing %d, or another "
            "trainer.global_batch_samples, avoids it",
            world_size,
            rows,
            loader.padding_per_step,
            world_size * loader.grad_accum,
            100 * loader.padding_per_step / (world_size * loader.grad_accum),
            rows,
        )
    return DataBundle(loader, names, records, roots, failures, stats, rows, loader.grad_accum)


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
