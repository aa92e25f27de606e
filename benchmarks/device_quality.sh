#!/usr/bin/env bash
# benchmarks/quality.py on the lent GPU machine, across several device calls (one call lasts
# at most 10 minutes; a process started with setsid outlives it while the machine is held).
#   benchmarks/device_quality.sh start [quality.py args...]   install lh-cp, try CUDA MPS, start in the background
#   benchmarks/device_quality.sh poll SECONDS                 wait until done or SECONDS pass; print progress
#   benchmarks/device_quality.sh collect DEST [args...]       summarise the finished runs into DEST/quality.json
# QUALITY_OUT (default /tmp/quality) holds the runs, the log bench.log and quality.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${QUALITY_OUT:-/tmp/quality}
command=${1:?start, poll or collect}
shift
case "$command" in
start)
  python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/lh_cp_pip.log 2>&1 || { cat /tmp/lh_cp_pip.log; exit 1; }
  # MPS lets the concurrent small runs' kernels share the GPU instead of taking turns.
  if command -v nvidia-cuda-mps-control > /dev/null && nvidia-cuda-mps-control -d; then
    if python3 -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
      echo "CUDA MPS daemon running"
    else
      echo quit | nvidia-cuda-mps-control; echo "CUDA MPS failed a test; stopped, the runs take turns on the GPU"
    fi
  fi
  mkdir -p "$OUTDIR"
  PYTHONUNBUFFERED=1 setsid nohup python3 benchmarks/quality.py --out "$OUTDIR" "$@" > "$OUTDIR/bench.log" 2>&1 < /dev/null &
  echo "started quality.py (pid $!), log $OUTDIR/bench.log"
  ;;
poll)
  deadline=$((SECONDS + ${1:?seconds}))
  while [ $SECONDS -lt $deadline ] && ! grep -q "wrote .*quality.json" "$OUTDIR/bench.log" 2> /dev/null; do sleep 10; done
  tail -n 30 "$OUTDIR/bench.log"
  for log in "$OUTDIR"/runs/*/console.log; do [ -f "$log" ] && echo "$(basename "$(dirname "$log")"): $(tail -n 1 "$log" | cut -c1-160)"; done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  ;;
collect)
  dest=${1:?destination folder}
  shift
  python3 benchmarks/quality.py --out "$OUTDIR" --collect "$@" > /dev/null && cp "$OUTDIR/quality.json" "$dest/"
  ;;
*)
  echo "unknown command $command (start, poll, collect)" >&2; exit 2
  ;;
esac
