#!/usr/bin/env bash
# The quickstart main job: recipes/quickstart.toml with 2 processes under torchrun, then the
# loss plot. Installs nothing; run it from anywhere after `pip install -e .`:
#   launch/quickstart.sh [--set section.key=value ...]
# Two CPU processes talk over gloo (CP=2) when the machine has fewer than 2 GPUs; with 2 or
# more GPUs the same recipe runs on 2 of them over NCCL. Output: runs/quickstart/ (TensorBoard
# logs in tensorboard/, checkpoints/, metrics.jsonl, passkey.json, loss.png). Running it again
# resumes from the newest checkpoint (delete runs/quickstart to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
RECIPE=recipes/quickstart.toml
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
device_args=()
if [[ "$gpus" -ge 2 ]]; then
  device_args=(--set run.device=cuda)
else
  # One intra-op thread per process: two processes already use both cores of a small machine.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
check_recipe 2 "${device_args[@]}" "$@"
"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 \
  -m lh_cp.cli train "$RECIPE" "${device_args[@]}" "$@"
"$PYTHON" -m lh_cp.cli plot runs/quickstart/tensorboard --output runs/quickstart/loss.png
