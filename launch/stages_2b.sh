#!/usr/bin/env bash
# VideoLLaMA3-2B (SigLIP-so400m tower + Qwen2.5-1.5B): the four stages at global batch 128 on any GPU count.
#   SIGLIP_DIR=/ckpt/siglip-so400m-patch14-384 QWEN_DIR=/ckpt/Qwen2.5-1.5B-Instruct \
#   DATA_ENCODER_ADAPTATION=stage1_mix DATA_ALIGNMENT=stage2_mix DATA_MULTITASK_SFT=stage3_mix \
#   DATA_VIDEO_FINETUNE=stage4_mix launch/stages_2b.sh logger=online
# All knobs: launch/run_stages.sh and docs/launch.md.
set -euo pipefail
MODEL=videollama3_2b exec bash "$(dirname "${BASH_SOURCE[0]}")/run_stages.sh" "$@"
