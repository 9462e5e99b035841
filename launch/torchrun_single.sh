#!/usr/bin/env bash
# One node, all its GPUs: torchrun --standalone starting one process per GPU.
#   launch/torchrun_single.sh stage=alignment model=videollama3_2b data=sample output_dir=outputs/s2 \
#       init_from=outputs/s1/export trainer.grad_accum=4
# Env: NPROC_PER_NODE (default: GPUs that nvidia-smi lists), PYTHON, ENTRY (default videollama3_train.train),
# DRY_RUN=1 (print the command only). Runs from the repository root: relative paths resolve there (common.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_DIR"

nproc="$(gpus_per_node)"
run_cmd "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$nproc" -m "$ENTRY" "$@"
