#!/usr/bin/env bash
# VideoLLaMA3-7B (SigLIP-so400m tower + Qwen2.5-7B): the four stages at global batch 128 on any GPU count.
# The 7B LLM with ZeRO-1 needs 80 GB GPUs; BACKEND=zero2 (or zero3) shards more of the optimizer state.
#   SIGLIP_DIR=/ckpt/siglip-so400m-patch14-384 QWEN_DIR=/ckpt/Qwen2.5-7B-Instruct \
#   LAUNCHER=slurm DATA=my_mix launch/stages_7b.sh
# All knobs: launch/run_stages.sh and docs/launch.md.
set -euo pipefail
MODEL=videollama3_7b exec bash "$(dirname "${BASH_SOURCE[0]}")/run_stages.sh" "$@"
