#!/usr/bin/env bash
# A chain of GPU measurements in the background on the lent GPU machine, across device calls
# (one call lasts at most 10 minutes; a process started with setsid outlives it while the
# machine is held): first the timings, each alone on the GPU, then the quality runs, which
# share it (benchmarks/device_quality.sh).
#   benchmarks/device_chain.sh start      install lh-cp (and fla-core from .whl/ if there), start;
#                                         QUALITY_ARMS (comma-separated, or empty: none) picks the arms
#   benchmarks/device_chain.sh poll S     wait until the chain ends or S seconds pass; copy the
#                                         results so far to $OUT
# Timings: /tmp/chain/*.json and chain.log; quality runs: /tmp/quality (quality.json at the end).
# fla-core (the "gla" scorer on CUDA) comes from wheels in .whl/ (gitignored; fetched with
# `pip download fla-core einops --no-deps -d .whl` on a machine with internet), carried along.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p /tmp/chain
case "${1:?start or poll}" in
start)
  python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/lh_cp_pip.log 2>&1 || { cat /tmp/lh_cp_pip.log; exit 1; }
  if ls .whl/*.whl > /dev/null 2>&1; then python3 -m pip install -q --no-deps .whl/*.whl; fi
  export QUALITY_ARMS=${QUALITY_ARMS-paper_split,paper_split_dilated,paper_split_gla,paper_split_rope_entries}
  PYTHONUNBUFFERED=1 setsid nohup bash -c '
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | head -2
    python3 -m pytest -q -p no:cacheprovider tests/test_offload_gpu.py tests/test_scorers_gpu.py 2>&1 | tail -n 15
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py -k rope 2>&1 | tail -n 5
    python3 benchmarks/scorers.py --out /tmp/chain/scorers.json
    python3 benchmarks/offload.py --attention lighthouse --offload on --contexts 1048576 --results /tmp/chain/offload.json --out /tmp/chain/offload_runs
    python3 benchmarks/document_lighthouse.py --lengths 131072 --out /tmp/chain/document_lighthouse_cp.json
    python3 benchmarks/document_lighthouse.py --lengths 131072 --means 16384 --tile-budget 64 --cp-lengths --out /tmp/chain/document_lighthouse_b64.json
    echo timings-finished
    if [ -n "$QUALITY_ARMS" ]; then
      QUALITY_OUT=/tmp/quality benchmarks/device_quality.sh start --arms "$QUALITY_ARMS" --seeds 0,1,2 --parallel 12 --timing-steps 0
    fi
    echo chain-started-all
  ' > /tmp/chain/chain.log 2>&1 < /dev/null &
  echo "started (pid $!)"
  ;;
poll)
  deadline=$((SECONDS + ${2:?seconds}))
  while [ $SECONDS -lt $deadline ] && ! grep -q "wrote .*quality.json" /tmp/quality/bench.log 2> /dev/null; do
    # without quality runs the chain is done once it has started everything
    if grep -q chain-started-all /tmp/chain/chain.log 2> /dev/null && [ ! -f /tmp/quality/bench.log ]; then break; fi
    sleep 10
    # what is done so far, in case the call is cut short
    cp /tmp/chain/*.json /tmp/chain/chain.log "${OUT:-/tmp}/" 2> /dev/null
  done
  grep -v "Warning\|warn(" /tmp/chain/chain.log | tail -n 60
  [ -f /tmp/quality/bench.log ] && QUALITY_OUT=/tmp/quality benchmarks/device_quality.sh poll 1 2> /dev/null | tail -n 16
  cp /tmp/chain/*.json /tmp/chain/chain.log "${OUT:-/tmp}/" 2> /dev/null
  [ -f /tmp/quality/quality.json ] && cp /tmp/quality/quality.json "${OUT:-/tmp}/"
  ;;
*)
  echo "unknown command: start or poll" >&2; exit 2
  ;;
esac
