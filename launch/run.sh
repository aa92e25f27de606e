#!/usr/bin/env bash
# Single node: NGPU processes (one per GPU) run `lh-cp train $RECIPE`.
#   NGPU=8 RECIPE=recipes/128k.toml launch/run.sh [--set section.key=value ...]
# NGPU defaults to the number of visible GPUs (1 on a CPU-only machine). The recipe's
# [parallel] degrees must multiply to NGPU (checked by `lh-cp plan` before torchrun starts).
# torchrun --standalone picks a free local port. PYTHON: see launch/env.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
: "${RECIPE:?set RECIPE to a recipe TOML, e.g. RECIPE=recipes/quickstart.toml}"
if [[ -z "${NGPU:-}" ]]; then
  NGPU=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "$NGPU" -ge 1 ]] || NGPU=1
fi
check_recipe "$NGPU" "$@"
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NGPU" -m lh_cp.cli train "$RECIPE" "$@"
