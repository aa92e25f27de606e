#!/usr/bin/env bash
# DeepSpeed engine (ZeRO) through the `deepspeed` launcher, on one node or on the nodes of a hostfile.
#   One node:   NGPU=8 RECIPE=recipes/128k.toml launch/deepspeed.sh [--set section.key=value ...]
#   CPU:        NGPU=2 RECIPE=recipes/quickstart.toml launch/deepspeed.sh   (2 processes over gloo)
#   Multi-node: HOSTFILE=launch/hostfile.example RECIPE=recipes/1m.toml launch/deepspeed.sh [--set ...]
# The recipe runs with parallel.engine = "deepspeed" (set here) and its parallel.zero_stage.
# A hostfile lists one node per line with its GPU count ("node0 slots=8"); the launcher starts
# the ranks of every node over passwordless ssh (pdsh) in this folder with this Python, so each
# node needs the same checkout and environment at the same path. MASTER_ADDR defaults to the
# first host of the hostfile; MASTER_PORT to a free local port on one node, else 29500.
# PROGRAM=path/to/script.py runs that script under the launcher instead of `lh-cp train`.
# PYTHON defaults to the checkout's .venv/bin/python when it exists, else python3.
# Without GPUs NGPU processes run on DeepSpeed's CPU accelerator over gloo, each with
# OMP_NUM_THREADS = cores / NGPU unless set (the first start compiles DeepSpeed's shared-memory
# comm op, 1-3 minutes, cached in ~/.cache/torch_extensions).
# Install DeepSpeed after torch: pip install --no-build-isolation 'deepspeed>=0.19.8'
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
launcher_args=(--no_local_rank)
if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || { echo "HOSTFILE=$HOSTFILE does not exist" >&2; exit 2; }
  launcher_args+=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
  if [[ -n "${MASTER_ADDR:-}" ]]; then launcher_args+=(--master_addr "$MASTER_ADDR"); fi
else
  gpus="$(nvidia-smi -L 2>/dev/null | wc -l || true)"
  NGPU="${NGPU:-$gpus}"
  [[ "${NGPU:-0}" -ge 1 ]] || NGPU=1
  if [[ "${gpus:-0}" -eq 0 ]]; then
    # CPU ranks share the cores instead of each starting one thread per core.
    cores="$(nproc)"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / NGPU > 0 ? cores / NGPU : 1 ))}"
  fi
  # Bind port 0 and read back the port the kernel chose: free a moment ago, never hard-coded.
  port="${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
  launcher_args+=(--num_gpus "$NGPU" --master_port "$port")
  [[ -n "${PROGRAM:-}" ]] || check_recipe "$NGPU" --set parallel.engine=deepspeed "$@"
fi
if [[ -n "${PROGRAM:-}" ]]; then
  exec "$PYTHON" -m deepspeed.launcher.runner "${launcher_args[@]}" "$PROGRAM" "$@"
fi
: "${RECIPE:?set RECIPE to a recipe TOML (or PROGRAM to a script)}"
exec "$PYTHON" -m deepspeed.launcher.runner "${launcher_args[@]}" --module lh_cp.cli train "$RECIPE" \
  --set parallel.engine=deepspeed "$@"
