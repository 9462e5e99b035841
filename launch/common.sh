# shellcheck shell=bash
# Helpers sourced by the launch scripts: world size, and one function that starts
# one training run with the launcher chosen by $LAUNCHER. Not meant to be run directly.
#
# Every launch script cd's into the repository root first: relative paths in overrides (output_dir=outputs/x,
# data.path=..., init_from=...) and in DATA / OUTPUT_ROOT resolve against the repository root, not the directory
# the script was started from. Give absolute paths for data and checkpoints that live elsewhere. With several nodes,
# output_dir (checkpoints, run.json, the export) and the data must be on a filesystem every node sees at the same
# path (docs/launch.md, "Several nodes").

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$LAUNCH_DIR/.." && pwd)"
PYTHON="${PYTHON:-python}"
ENTRY="${ENTRY:-videollama3_train.train}"  # the Hydra entry point every launcher runs as a module

die() {
  echo "error: $*" >&2
  exit 1
}

# GPUs on this node: $NPROC_PER_NODE, else what nvidia-smi lists, else 1 (CPU smoke runs).
gpus_per_node() {
  if [[ -n "${NPROC_PER_NODE:-}" ]]; then
    echo "$NPROC_PER_NODE"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 1
  fi
}

# Total "slots=N" of a DeepSpeed hostfile (comments and blank lines ignored).
hostfile_slots() {
  local hostfile="$1"
  [[ -f "$hostfile" ]] || die "hostfile $hostfile not found"
  awk '!/^[[:space:]]*(#|$)/ { for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { sub("slots=", "", $i); n += $i } }
       END { print n + 0 }' "$hostfile"
}

# Processes (GPUs) of the whole job for the current $LAUNCHER; $WORLD_SIZE wins when set.
world_size() {
  if [[ -n "${WORLD_SIZE:-}" ]]; then
    echo "$WORLD_SIZE"
    return
  fi
  case "${LAUNCHER:-torchrun}" in
    torchrun | accelerate) gpus_per_node ;;
    torchrun_multinode) echo $(( ${NNODES:-1} * $(gpus_per_node) )) ;;
    slurm) echo $(( ${SLURM_NNODES:-${NNODES:-1}} * $(gpus_per_node) )) ;;
    deepspeed) hostfile_slots "${HOSTFILE:-$LAUNCH_DIR/hostfile}" ;;
    *) die "unknown LAUNCHER=${LAUNCHER}; use torchrun | torchrun_multinode | slurm | deepspeed | accelerate" ;;
  esac
}

# Print a command, then run it unless DRY_RUN=1 (every launch script starts its processes through it).
run_cmd() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  [[ "${DRY_RUN:-0}" == 1 ]] || "$@"
}

# Start one training run (Hydra overrides as arguments) with the launcher named by $LAUNCHER.
launch_train() {
  case "${LAUNCHER:-torchrun}" in
    torchrun) run_cmd bash "$LAUNCH_DIR/torchrun_single.sh" "$@" ;;
    torchrun_multinode) run_cmd bash "$LAUNCH_DIR/torchrun_multinode.sh" "$@" ;;
    # Inside an sbatch allocation: one task per node, each starting torchrun for its node's GPUs. srun (Slurm >= 22.05)
    # does not inherit the allocation's --cpus-per-task: pass it on, or each task gets one CPU (the decoding workers
    # and every rank's threads would share it).
    slurm)
      run_cmd srun --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
        --kill-on-bad-exit=1 bash "$LAUNCH_DIR/torchrun_multinode.sh" "$@"
      ;;
    deepspeed) run_cmd bash "$LAUNCH_DIR/deepspeed_hostfile.sh" "$@" ;;
    accelerate)
      run_cmd "$PYTHON" -m accelerate.commands.launch --config_file "${ACCELERATE_CONFIG:-$LAUNCH_DIR/accelerate_config.yaml}" \
        --num_processes "$(world_size)" -m "$ENTRY" "$@"
      ;;
    *) die "unknown LAUNCHER=${LAUNCHER}; use torchrun | torchrun_multinode | slurm | deepspeed | accelerate" ;;
  esac
}
