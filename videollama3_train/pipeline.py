"""Chain the four stages, each stage's export initialising the next.

    python -m videollama3_train.pipeline model=tiny data=sample output_dir=outputs/pipeline
    python -m videollama3_train.pipeline model=videollama3_2b data=my_mix output_dir=O stages=[multitask_sft,video_finetune]

Every stage is exactly ``python -m videollama3_train.train stage=S <your overrides> output_dir=O/<n>_<S>
init_from=<previous export>``: the same config files and checks, composed with Hydra's compose API. A stage whose
export exists is skipped; an unfinished stage resumes from its newest checkpoint — so rerunning the same command
after a crash continues at the stage and step where it stopped. At the end ``summary.md`` and ``loss.png`` are
written to ``output_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .config import STAGES

log = logging.getLogger("videollama3_train")


def parse_args(argv: list[str]) -> tuple[list[str], list[str], str]:
    """Split ``argv`` into (stages, the other overrides, output_dir)."""
    stages, rest, out = list(STAGES), [], None
    for a in argv:
        if a.startswith("stages="):
            v = a.split("=", 1)[1].strip()
            stages = [s.strip() for s in v.strip("[]").split(",") if s.strip()]
        elif a.startswith("stage="):
            raise SystemExit(
                "pipeline: use stages=[...] to choose stages (stage= belongs to the train command)"
            )
        else:
            if a.startswith("output_dir="):
                out = a.split("=", 1)[1]
            rest.append(a)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"pipeline: unknown stages {unknown}; choose from {list(STAGES)}")
    if not stages:
        raise SystemExit("pipeline: stages=[] is empty")
    if out is None:
        raise SystemExit("pipeline: output_dir=... is required")
    return stages, rest, out


def stage_dir(root: str | Path, i: int, stage: str) -> Path:
    return Path(root) / f"{i + 1}_{stage}"


def compose_stage(stage: str, overrides: list[str], out: Path, init_from: str | None):
    """The RunConfig of one stage, composed exactly like the train command would."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from .config import register_configs
    from .train import CONFIG_DIR

    register_configs()
    ov = [o for o in overrides if not o.startswith("output_dir=")]
    ov += [f"stage={stage}", f"output_dir={out}"]
    if init_from is not None:
        ov = [o for o in ov if o.split("=", 1)[0].lstrip("+") not in ("init_from", "model.init_kind")]
        ov += [f"init_from={init_from}", "model.init_kind=auto"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        dcfg = compose(config_name="train", overrides=ov)
    return OmegaConf.to_object(dcfg), dcfg


def run_pipeline(argv: list[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from .report import write_summary
    from .train import run_stage

    stages, overrides, out = parse_args(argv)
    root = Path(out)
    # Compose every stage first: a misspelt key fails now, not hours later at stage 3.
    for i, s in enumerate(stages):
        compose_stage(s, overrides, stage_dir(root, i, s), None if i == 0 else "PLACEHOLDER")
    summary: list[dict[str, Any]] = []
    prev_export: str | None = None
    results: dict[str, Any] = {}
    for i, s in enumerate(stages):
        d = stage_dir(root, i, s)
        export = d / "export"
        cfg, dcfg = compose_stage(s, overrides, d, prev_export)
        if (export / "config.json").is_file() and (d / "results.json").is_file():
            print(f"[pipeline] {s}: export exists in {export}, skipping", flush=True)
            results[s] = json.loads((d / "results.json").read_text())
        else:
            print(f"[pipeline] stage {i + 1}/{len(stages)}: {s} -> {d}", flush=True)
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.yaml").write_text(OmegaConf.to_yaml(dcfg))
            results[s] = run_stage(cfg)
            _reset_accelerate()
            if results[s].get("final", {}).get("interrupted"):
                print("[pipeline] interrupted; rerun the same command to resume", flush=True)
                return results
        prev_export = str(export)
        entry = {"name": s, "output_dir": str(d)}
        for key, tag in (("heldout_before", "accuracy_before"), ("heldout_after", "accuracy_after")):
            r = results[s].get(key)
            if r:
                entry[tag] = r["accuracy"]
                entry["chance_accuracy"] = r.get("chance")
        summary.append(entry)
    if _is_main():
        md, png = write_summary(root, summary)
        first = results[stages[0]].get("heldout_before")
        last = results[stages[-1]].get("heldout_after")
        if first and last:
            print(
                f"[pipeline] held-out accuracy: before {first['accuracy']:.3f} -> after {last['accuracy']:.3f} "
                f"(chance {last.get('chance') or 0:.3f})",
                flush=True,
            )
        print(f"[pipeline] wrote {md} and {png}; final model: {prev_export}", flush=True)
    return results


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _reset_accelerate() -> None:
    """Let the next stage build its own Accelerator (another DeepSpeed config) in this process."""
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
    except Exception as e:  # noqa: BLE001 - a failed reset only matters if the next stage differs; say so
        log.warning("could not reset accelerate state between stages: %s", e)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_pipeline(list(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
