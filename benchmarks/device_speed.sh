#!/usr/bin/env bash
# benchmarks/speed.py on the lent GPU machine across device calls (one call lasts at most 10
# minutes; a process started with setsid outlives it while the machine is held).
#   benchmarks/device_speed.sh start 'COMMANDS'   install lh-cp, run COMMANDS (speed.py calls) in the background
#   benchmarks/device_speed.sh poll SECONDS       wait until they finish or SECONDS pass; print the log's tail
# SPEED_OUT (default /tmp/speed) holds the log bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${SPEED_OUT:-/tmp/speed}
command=${1:?start or poll}
case "$command" in
start)
  python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/lh_cp_pip.log 2>&1 || { cat /tmp/lh_cp_pip.log; exit 1; }
  mkdir -p "$OUTDIR"
  PYTHONUNBUFFERED=1 setsid nohup bash -c "${2:?commands}; echo speed-benchmark-finished" > "$OUTDIR/bench.log" 2>&1 < /dev/null &
  echo "started (pid $!), log $OUTDIR/bench.log"
  ;;
poll)
  deadline=$((SECONDS + ${2:?seconds}))
  while [ $SECONDS -lt $deadline ] && ! grep -q "^speed-benchmark-finished" "$OUTDIR/bench.log" 2> /dev/null; do sleep 5; done
  grep -v "Warning\|warn(" "$OUTDIR/bench.log" | tail -n 40
  ;;
*)
  echo "unknown command $command: start or poll" >&2; exit 2
  ;;
esac
