#!/usr/bin/env bash
# DeepSpeed ZeRO-3 through `lh-cp train` on the lent GPU machine: the quickstart recipe on one
# GPU (CP=1), 6 Lighthouse steps then 4 dense recovery steps, through launch/deepspeed.sh; with
# two or more GPUs also compressed Ulysses at W=2 (parallel.exchange='ulysses_compressed').
# The machine has no network, so DeepSpeed and its pure-Python dependencies travel as wheels in
# .whl/ (ignored by git; pass carry=[".whl"]), made on the development machine with
#   pip wheel --no-deps deepspeed==0.19.8 -w .whl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl hjson pydantic \
#       pydantic-core annotated-types typing-inspection 'typing_extensions>=4.16'
# Writes $OUT/deepspeed_*.jsonl (each run's metrics.jsonl) and prints each run's console.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -d .whl ]] || { echo "no .whl/ folder: build the wheels (see the header) and carry it" >&2; exit 2; }
python3 -m pip install -q --no-index --find-links .whl deepspeed > /tmp/ds_pip.log 2>&1 || { cat /tmp/ds_pip.log; exit 1; }
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/lh_cp_pip.log 2>&1 || { cat /tmp/lh_cp_pip.log; exit 1; }
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())"
export PYTHON=python3
out=${OUT:-/tmp/deepspeed_out}
mkdir -p "$out"
common=(--set run.device=cuda --set stages.0.steps=6 --set stages.1.steps=4 --set eval.passkey.enabled=false --set schedule.warmup_steps=2)

run_one() {  # name ngpu overrides...
  local name=$1 ngpu=$2
  shift 2
  rm -rf "/tmp/$name"
  NGPU=$ngpu RECIPE=recipes/quickstart.toml launch/deepspeed.sh "${common[@]}" --set "run.out_dir=/tmp/$name" "$@" \
    2>&1 | grep -v Warning | tail -n 20
  cp "/tmp/$name/metrics.jsonl" "$out/$name.jsonl"
}

run_one deepspeed_zero3_quickstart 1 --set parallel.cp=1
gpus=$(nvidia-smi -L | wc -l)
if [[ $gpus -ge 2 ]]; then
  run_one deepspeed_zero3_ulysses_compressed_w2 2 --set parallel.cp=2 --set parallel.exchange=ulysses_compressed --set parallel.dense_exchange=ulysses
else
  echo "compressed Ulysses at W=2 not run: this machine has $gpus GPU"
fi
