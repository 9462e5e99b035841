#!/usr/bin/env bash
# Several nodes with the DeepSpeed launcher (passwordless ssh from this node to every host of the hostfile).
#   HOSTFILE=launch/hostfile launch/deepspeed_hostfile.sh stage=... output_dir=... trainer.backend=zero1
# Env: HOSTFILE (default launch/hostfile; see hostfile.example), MASTER_ADDR (default: first host of the
# hostfile), MASTER_PORT (29500), DRY_RUN=1 (print the command only). The ZeRO stage is our config's
# trainer.backend (the trainer builds the DeepSpeed config itself); this script only starts the processes.
# Runs from the repository root: relative paths resolve there; every host needs the repository and the data at
# the same paths, and output_dir on a filesystem they all share.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_DIR"

HOSTFILE="${HOSTFILE:-$LAUNCH_DIR/hostfile}"
[[ -f "$HOSTFILE" ]] || die "hostfile $HOSTFILE not found (copy launch/hostfile.example and edit it)"
first_host="$(awk '!/^[[:space:]]*(#|$)/ { print $1; exit }' "$HOSTFILE")"
MASTER_ADDR="${MASTER_ADDR:-$first_host}"
MASTER_PORT="${MASTER_PORT:-29500}"

# --no_local_rank: DeepSpeed would otherwise append --local_rank=N to the overrides (the commands would skip it);
# the rank arrives through the LOCAL_RANK environment variable.
run_cmd "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" --no_local_rank --module "$ENTRY" "$@"
