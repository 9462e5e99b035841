#!/usr/bin/env bash
# The four VideoLLaMA3 stages in order (docs/reference.md §2), each initialised from the previous stage's export/,
# at a global batch of about GLOBAL_BATCH samples whatever the GPU count. Called by stages_2b.sh / stages_7b.sh;
# extra arguments are Hydra overrides added to every stage (e.g. logger=online trainer.save_every=200).
#
# Env (defaults in brackets):
#   MODEL                      videollama3_2b | videollama3_7b (set by the wrappers)
#   LAUNCHER [torchrun]        torchrun | torchrun_multinode | slurm | deepspeed | accelerate (see docs/launch.md)
#   OUTPUT_ROOT [outputs/$MODEL]   one run directory per stage: $OUTPUT_ROOT/<stage>
#   DATA [sample]              data config (configs/data/<name>.yaml) of every stage; DATA_<STAGE> overrides one,
#                              e.g. DATA_VIDEO_FINETUNE=video_mix
#   SIGLIP_DIR, QWEN_DIR       stage-1 assembly from local SigLIP + Qwen2.5-Instruct checkpoints; or INIT_FROM=a
#                              native / official checkpoint; with neither, stage 1 starts from random weights
#   GLOBAL_BATCH [128]         samples per optimizer step (trainer.global_batch_samples; the trainer derives the
#                              packed rows per step and grad_accum for the world size)
#   GRAD_ACCUM                 fix trainer.grad_accum packed rows per rank instead (global batch then grows with GPUs)
#   BACKEND [zero1]            trainer.backend
#   FIRST_STAGE [encoder_adaptation]  start here (earlier stages must have their export/)
#   FORCE [0]                  1 = hand stages whose export/ exists to the train command anyway (skipped otherwise);
#                              it says the run is complete and changes nothing unless the run's settings changed
#                              (e.g. a raised trainer.max_steps with reschedule=true)
#   DRY_RUN [0]                1 = print the commands only
# Relative paths (OUTPUT_ROOT, data paths in overrides) resolve against the repository root (see common.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_DIR"

MODEL="${MODEL:?set MODEL=videollama3_2b or videollama3_7b (or run stages_2b.sh / stages_7b.sh)}"
OUTPUT_ROOT="${OUTPUT_ROOT:-outputs/$MODEL}"
GLOBAL_BATCH="${GLOBAL_BATCH:-128}"
BACKEND="${BACKEND:-zero1}"
FIRST_STAGE="${FIRST_STAGE:-encoder_adaptation}"
STAGES=(encoder_adaptation alignment multitask_sft video_finetune)

[[ " ${STAGES[*]} " == *" $FIRST_STAGE "* ]] || die "FIRST_STAGE=$FIRST_STAGE is not one of: ${STAGES[*]}"

# The trainer turns the global batch (samples) into packed rows per step from the data's own packing and derives
# grad_accum for the world size; GRAD_ACCUM=<n> fixes n packed rows per rank per step instead.
if [[ -n "${GRAD_ACCUM:-}" ]]; then batch=("trainer.grad_accum=$GRAD_ACCUM" "trainer.global_batch_samples=null")
else batch=("trainer.global_batch_samples=$GLOBAL_BATCH"); fi

# Data config of a stage: DATA_<STAGE in capitals>, else DATA, else the bundled sample.
data_for() {
  local var="DATA_${1^^}"
  echo "${!var:-${DATA:-sample}}"
}

# How stage 1 starts: assembled from SigLIP + Qwen2.5, a given checkpoint, or random weights (smoke runs only).
if [[ -n "${SIGLIP_DIR:-}" && -n "${QWEN_DIR:-}" ]]; then
  init=(model.init_kind=assemble "model.vision_from=$SIGLIP_DIR" "model.llm_from=$QWEN_DIR")
elif [[ -n "${INIT_FROM:-}" ]]; then
  init=("init_from=$INIT_FROM")
else
  if [[ "$FIRST_STAGE" == encoder_adaptation ]]; then
    echo "warning: neither SIGLIP_DIR+QWEN_DIR nor INIT_FROM set: stage 1 starts from random weights" >&2
  fi
  init=()
fi

prev=""
started=0
for stage in "${STAGES[@]}"; do
  [[ "$stage" == "$FIRST_STAGE" ]] && started=1
  out="$OUTPUT_ROOT/$stage"
  if (( started )); then
    if [[ -n "$prev" ]]; then
      if [[ ! -f "$OUTPUT_ROOT/$prev/export/config.json" && "${DRY_RUN:-0}" != 1 ]]; then
        die "stage $stage starts from $OUTPUT_ROOT/$prev/export, which holds no exported model"
      fi
      init=("init_from=$OUTPUT_ROOT/$prev/export")
    fi
    if [[ -f "$out/export/config.json" && "${FORCE:-0}" != 1 ]]; then
      echo "stage $stage: $out/export exists, skipping (FORCE=1 reruns it)" >&2
    else
      # An interrupted stage resumes from its newest checkpoint in $out (trainer.resume defaults to true).
      launch_train "stage=$stage" "model=$MODEL" "data=$(data_for "$stage")" "output_dir=$out" \
        ${init[@]+"${init[@]}"} "${batch[@]}" "trainer.backend=$BACKEND" "$@"
    fi
  fi
  prev="$stage"
done

# With LAUNCHER=torchrun_multinode this script runs on every node: one report (node 0) is enough.
if [[ "${NODE_RANK:-0}" == 0 ]]; then
  run_cmd "$PYTHON" -m videollama3_train.report "root=$OUTPUT_ROOT"
fi
