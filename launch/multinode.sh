#!/usr/bin/env bash
# Multi-node: run this once on every node (launch/slurm.sbatch does it through srun).
#   NNODES=4 NGPU=8 RDZV_HOST=node0 RECIPE=recipes/1m.toml launch/multinode.sh [--set k=v ...]
# Nodes meet through torchrun's c10d rendezvous at RDZV_HOST:RDZV_PORT (the first node to
# arrive hosts it); RDZV_ID names the job so that two jobs on the same host do not mix.
# PROGRAM=path/to/script.py runs that script instead of `lh-cp train`, e.g.
# PROGRAM=launch/cp_check.py checks context parallelism across the nodes before a run.
# Each node checks the recipe with `lh-cp plan --world-size NNODES * NGPU` before torchrun.
# PYTHON: see launch/env.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
: "${NNODES:?set NNODES, the number of nodes}"
: "${RDZV_HOST:?set RDZV_HOST, the host name or address of the first node}"
NGPU="${NGPU:-8}"
RDZV_PORT="${RDZV_PORT:-29400}"
RDZV_ID="${RDZV_ID:-lh-cp}"
torchrun_args=(
  --nnodes "$NNODES" --nproc-per-node "$NGPU"
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$RDZV_ID"
)
if [[ -n "${PROGRAM:-}" ]]; then
  exec "$PYTHON" -m torch.distributed.run "${torchrun_args[@]}" "$PROGRAM" "$@"
fi
: "${RECIPE:?set RECIPE to a recipe TOML (or PROGRAM to a script)}"
check_recipe "$(( NNODES * NGPU ))" "$@"
exec "$PYTHON" -m torch.distributed.run "${torchrun_args[@]}" -m lh_cp.cli train "$RECIPE" "$@"
