#!/usr/bin/env bash
# Several nodes with torchrun: run this same command on every node (or let slurm.sbatch do it).
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 launch/torchrun_multinode.sh stage=... output_dir=... # on node0
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=1 launch/torchrun_multinode.sh stage=... output_dir=... # on node1
# Env: MASTER_ADDR (required outside Slurm), MASTER_PORT (29500), NNODES, NODE_RANK, NPROC_PER_NODE,
# DRY_RUN=1 (print the command only).
# Under Slurm (srun, one task per node) NNODES / NODE_RANK / MASTER_ADDR default to the allocation's values.
# Runs from the repository root: relative paths resolve there. output_dir and the data must be on a filesystem
# shared by every node, at the same path (rank 0 writes run.json, checkpoints and the export; every rank reads them).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_DIR"

if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
fi
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
MASTER_PORT="${MASTER_PORT:-29500}"
NNODES="${NNODES:-${SLURM_NNODES:-}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-}}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to this node index (0 .. NNODES-1)}"
(( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be < NNODES=$NNODES"

nproc="$(gpus_per_node)"
echo "node $NODE_RANK/$NNODES: $nproc processes, master $MASTER_ADDR:$MASTER_PORT" >&2
run_cmd "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$nproc" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" -m "$ENTRY" "$@"
