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

    from .data.build import build_train_data, load_heldout
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
        cfg.data,
        cfg.encode,
        processor,
        grad_accum=cfg.trainer.grad_accum,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        is_main=is_main,
    )
    heldout = load_heldout(cfg.data, cfg.encode, processor) if is_main else []
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
