#!/usr/bin/env bash
# Install, generate the bundled sample data and run the four stages with the tiny preset on CPU.
# Prints held-out accuracy before and after; writes outputs/quickstart/{summary.md,loss.png}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
.venv/bin/python data/generate_sample.py --out data/sample
.venv/bin/python -m videollama3_train.pipeline model=tiny data=sample output_dir="${OUTPUT_DIR:-outputs/quickstart}" "$@"
