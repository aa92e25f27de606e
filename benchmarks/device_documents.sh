#!/usr/bin/env bash
# The GPU measurements of document masking in one background chain on the lent GPU machine
# (one device call lasts at most 10 minutes; a process started with setsid outlives it while
# the machine is held): the layer benchmarks alone on the GPU first, then the quality arms.
#   benchmarks/device_documents.sh start     install lh-cp, start the chain
#   benchmarks/device_documents.sh poll S    wait until it ends or S seconds pass; copy results to $OUT
# Results: /tmp/docs/*.json, the quality runs in /tmp/quality (benchmarks/device_quality.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p /tmp/docs
case "${1:?start or poll}" in
start)
  python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/lh_cp_pip.log 2>&1 || { cat /tmp/lh_cp_pip.log; exit 1; }
  PYTHONUNBUFFERED=1 setsid nohup bash -c '
    nvidia-smi --query-gpu=name --format=csv,noheader
    python3 benchmarks/document_lighthouse.py --out /tmp/docs/document_lighthouse.json
    python3 benchmarks/document_masking.py --out /tmp/docs/document_masking.json
    python3 benchmarks/agreement_overhead.py --out /tmp/docs/agreement_1gpu.json
    echo layer-benchmarks-finished
    QUALITY_OUT=/tmp/quality benchmarks/device_quality.sh start --arms dense_docs,paper_split_docs --seeds 0,1,2 --parallel 6 --timing-steps 0
  ' > /tmp/docs/chain.log 2>&1 < /dev/null &
  echo "started (pid $!)"
  ;;
poll)
  deadline=$((SECONDS + ${2:?seconds}))
  while [ $SECONDS -lt $deadline ] && ! grep -q "wrote .*quality.json" /tmp/quality/bench.log 2> /dev/null; do sleep 10; done
  grep -v "Warning\|warn(" /tmp/docs/chain.log | tail -n 30
  QUALITY_OUT=/tmp/quality benchmarks/device_quality.sh poll 1 2> /dev/null | tail -n 12
  cp /tmp/docs/*.json /tmp/docs/chain.log "${OUT:-/tmp}/" 2> /dev/null
  [ -f /tmp/quality/quality.json ] && cp /tmp/quality/quality.json "${OUT:-/tmp}/"
  ;;
esac
