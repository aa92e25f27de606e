#!/usr/bin/env bash
# Single node: NGPU processes (one per GPU) run `lh-cp train $RECIPE`.
#   NGPU=8 RECIPE=recipes/128k.toml launch/run.sh [--set section.key=value ...]
# NGPU defaults to the number of visible GPUs (1 on a CPU-only machine). The recipe's
# [parallel] degrees must multiply to NGPU. torchrun --standalone picks a free local port.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/cuda_alloc.sh"
: "${RECIPE:?set RECIPE to a recipe TOML, e.g. RECIPE=recipes/quickstart.toml}"
if [[ -z "${NGPU:-}" ]]; then
  NGPU=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "$NGPU" -ge 1 ]] || NGPU=1
fi
exec torchrun --standalone --nnodes 1 --nproc-per-node "$NGPU" --no-python lh-cp train "$RECIPE" "$@"
