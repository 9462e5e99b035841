"""Train one stage.

    python -m videollama3_train.train stage=multitask_sft model=tiny data=sample output_dir=outputs/sft
    python -m videollama3_train.train stage=video_finetune model=videollama3_2b data=file \
        data.path=ANNOTATIONS data.root=MEDIA init_from=outputs/sft/export output_dir=outputs/ft

A thin Hydra entry point: builds the tokenizer, processor, model and loader from the config and hands them to
:func:`videollama3_train.trainer.fit.fit`; at the end exports a transformers-native directory to
``<output_dir>/export``. Runs the same under ``torchrun`` / ``deepspeed`` / ``accelerate launch``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

from .config import RunConfig

log = logging.getLogger("videollama3_train")
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


# ----------------------------------------------------------------------------------------------------------------
# build_* factories: config -> objects
# ----------------------------------------------------------------------------------------------------------------


def build_tokenizer_for(cfg: RunConfig):
    """The checkpoint's own tokenizer when starting from a directory that has one, else ``model.tokenizer``."""
    from .model.tokenizer import build_tokenizer

    init = cfg.model.init_from
    if init and (Path(init) / "tokenizer_config.json").is_file():
        return build_tokenizer(init)
    return build_tokenizer(cfg.model.tokenizer)


def build_stage_processor(tokenizer, enc):
    """transformers' processor with this stage's merge sizes and budgets (it is saved with every export, so
    inference on the export sees images the way this stage trained on them)."""
    from .model.tokenizer import build_processor

    img_factor = (enc.patch_size * enc.image_merge_size) ** 2
    vid_factor = (enc.patch_size * enc.video_merge_size) ** 2
    return build_processor(
        tokenizer,
        image_merge_size=enc.image_merge_size,
        video_merge_size=enc.video_merge_size,
        image_min_pixels=enc.min_tokens_per_item * img_factor,
        image_max_pixels=min(enc.max_visual_tokens, enc.max_tokens_per_item) * img_factor,
        video_min_pixels=enc.min_tokens_per_item * vid_factor,
        video_max_pixels=enc.max_visual_tokens * vid_factor,
        use_token_compression=enc.use_token_compression,
        fps=enc.fps,
        max_frames=enc.max_frames,
        min_frames=enc.min_frames,
    )


def _cost_of(row, *, root, processor, config, dataset):
    from .data.encode import estimate_cost

    return estimate_cost(row, data_root=root, processor=processor, config=config, dataset=dataset)


def dataset_spec(name: str, d, root: str):
    """The packer's view (``DatasetSpec``) of one configured dataset (``DatasetConfig``) with its resolved root."""
    from .data.packing import DatasetSpec

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


def build_train_data(cfg: RunConfig, processor, *, rank: int, world_size: int, is_main: bool) -> DataBundle:
    """Annotations -> cost pre-pass (cached) -> mixture + packing plan per epoch -> this rank's loader."""
    from .data.annotations import load_annotations
    from .data.encode import encode_record
    from .data.loader import DatasetEncoder, PackedLoader
    from .data.packing import build_epoch_plan, compute_costs, config_hash, file_fingerprint

    enc, dcfg = cfg.encode, cfg.data
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
        grad_accum=cfg.trainer.grad_accum,
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
            f"x trainer.grad_accum={cfg.trainer.grad_accum}; use more data or a smaller grad_accum"
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


def load_heldout(cfg: RunConfig, processor) -> list[tuple[dict, dict]]:
    """Encoded held-out samples with their raw records (bad ones skipped and counted in the log)."""
    from .data.annotations import load_annotations, record_at
    from .data.encode import encode_record
    from .data.errors import DataError

    if not cfg.data.heldout_path:
        return []
    path = Path(cfg.data.heldout_path)
    if not path.is_file():
        raise FileNotFoundError(f"data.heldout_path not found: {path}")
    root = cfg.data.heldout_root or str(path.parent)
    ds = load_annotations(path)
    out, bad = [], 0
    for i in range(min(len(ds), cfg.data.heldout_max_samples)):
        raw = record_at(ds, i)
        try:
            out.append(
                (
                    encode_record(
                        raw,
                        data_root=root,
                        processor=processor,
                        config=cfg.encode,
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


def scaled_trainer_config(cfg: RunConfig):
    """The loop's config with ``lr_scale`` / ``lr_max`` applied and the run directory filled in."""
    lrs = cfg.lrs
    return dataclasses.replace(
        cfg.trainer,
        lr_vision=lrs["vision"],
        lr_projector=lrs["projector"],
        lr_llm=lrs["llm"],
        output_dir=cfg.output_dir,
    )


def gathered_parameters(model, *, enabled: bool):
    """Context in which every parameter of a ZeRO-3-partitioned model is whole (a no-op otherwise)."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def set_cpu_threads(world_size: int, num_workers: int, *, on_cpu: bool) -> None:
    """On CPU, give each rank its share of the cores, minus its decoding workers.

    OpenMP threads that outnumber the free cores spin against each other: a small matmul measured 15x slower
    with 2 threads than with 1 when the other core was busy. An explicit ``OMP_NUM_THREADS`` wins.
    """
    import torch

    if not on_cpu or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(world_size, 1) - num_workers))


def apply_lora(model, lcfg):
    """Wrap the model with peft LoRA adapters on the LLM's (and optionally the tower's) linear layers."""
    try:
        from peft import LoraConfig as PeftLora
        from peft import get_peft_model
    except ImportError as e:
        raise ImportError(
            "lora.enabled=true needs the peft package: pip install 'videollama3-train[lora]'"
        ) from e
    llm = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    vis = r"model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))"
    target = f"({llm}|{vis})" if lcfg.vision else llm
    pcfg = PeftLora(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, target_modules=target)
    return get_peft_model(model, pcfg)


# ----------------------------------------------------------------------------------------------------------------
# One stage
# ----------------------------------------------------------------------------------------------------------------


def run_stage(cfg: RunConfig) -> dict[str, Any]:
    """Train one stage as ``cfg`` says; returns the final metrics plus held-out results."""
    import torch

    from .evaluate import evaluate_heldout
    from .model.core import build_model
    from .model.export import export_hf
    from .trainer.fit import build_accelerator, fit
    from .trainer.metrics import RunLogger

    if cfg.init_from is not None:
        cfg.model.init_from = cfg.init_from
    out_dir = Path(cfg.output_dir)
    tcfg = scaled_trainer_config(cfg)
    accelerator = build_accelerator(tcfg)
    is_main = accelerator.is_main_process
    set_cpu_threads(accelerator.num_processes, cfg.data.num_workers, on_cpu=accelerator.device.type == "cpu")
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "resolved_config.json").write_text(
            json.dumps(dataclasses.asdict(cfg), indent=2, default=str)
        )

    tokenizer = build_tokenizer_for(cfg)
    processor = build_stage_processor(tokenizer, cfg.encode)
    model = build_model(cfg.model, tokenizer)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    data = build_train_data(
        cfg, processor, rank=accelerator.process_index, world_size=accelerator.num_processes, is_main=is_main
    )
    heldout = load_heldout(cfg, processor) if is_main else []
    results: dict[str, Any] = {"stage": cfg.stage, "plan": data.plan_stats, "bad_records": data.failures}

    logger = None
    if is_main:
        logger = RunLogger(
            out_dir,
            project=cfg.logger.project,
            name=cfg.logger.run_name or f"{cfg.stage}-{out_dir.name}",
            wandb_mode=cfg.logger.wandb,
            config=dataclasses.asdict(cfg),
            console_every=10**9,  # the progress bar already shows the step
            jsonl=False,  # fit() writes metrics.jsonl itself
        )

    def evaluate(tag: str) -> dict[str, Any] | None:
        if not heldout:
            return None
        device = accelerator.device
        model.to(device)
        res = evaluate_heldout(
            model,
            heldout,
            tokenizer=tokenizer,
            device=device,
            max_new_tokens=cfg.eval.max_new_tokens,
            num_generations=cfg.eval.log_generations,
        )
        print(
            f"[{cfg.stage}] held-out {tag}: accuracy {res['accuracy']:.3f} (chance {res['chance'] or 0:.3f}), "
            f"loss {res['loss']:.3f}, per modality {json.dumps({k: round(v, 3) for k, v in res['accuracy_per_modality'].items()})}",
            flush=True,
        )
        for g in res["generations"]:
            print(
                f"    [{g['modality']}] generated {g['generated']!r}  reference {g['reference']!r}",
                flush=True,
            )
        return res

    resuming = any((out_dir / "checkpoints").glob("step-*")) if out_dir.exists() else False
    if is_main and cfg.eval.before and heldout and not resuming:
        res = evaluate("before")
        results["heldout_before"] = res
        logger.summary({"accuracy_before": res["accuracy"], "chance_accuracy": res["chance"]})

    def on_step(metrics: dict[str, Any]) -> None:
        logger.log(int(metrics["step"]), metrics)

    zero3 = tcfg.backend == "zero3" and accelerator.num_processes > 1
    eval_fn = None
    if cfg.eval.every > 0 and zero3 and is_main:
        log.warning(
            "eval.every is ignored under ZeRO-3 (parameters are partitioned); held-out runs at the end"
        )
    elif cfg.eval.every > 0:
        tcfg = dataclasses.replace(tcfg, eval_every=cfg.eval.every)

        def eval_fn(m, step):  # noqa: ARG001 - fit passes the (possibly wrapped) model
            if not is_main or not heldout:
                return {}
            r = evaluate(f"step {step}")
            return {"heldout/loss": r["loss"], "heldout/accuracy": r["accuracy"]}

    try:
        final = fit(
            model,
            data.loader,
            tcfg,
            accelerator=accelerator,
            processor=processor,
            eval_fn=eval_fn,
            on_step=on_step if is_main else None,
        )
        results["final"] = final
        if final.get("interrupted"):
            return results
        accelerator.wait_for_everyone()
        # ZeRO-3 keeps each parameter partitioned over the ranks: gather them (every rank enters) for the export
        with gathered_parameters(model, enabled=zero3):
            if is_main:
                export_dir = export_hf(model, processor, out_dir / "export")
                results["export"] = str(export_dir)
                res = evaluate("after")
                if res is not None:
                    results["heldout_after"] = res
                    logger.summary({"accuracy_after": res["accuracy"]})
                (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
            accelerator.wait_for_everyone()
    finally:
        if logger is not None:
            logger.finish()
        if torch.distributed.is_initialized():
            pass  # the process group is reused by the next stage of a pipeline
    return results


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    from .config import register_configs

    register_configs()

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
    def _main(dcfg) -> None:
        cfg: RunConfig = OmegaConf.to_object(dcfg)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run_stage(cfg)

    _main()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
