#!/usr/bin/env bash
# benchmarks/solar_throughput.py on a GPU machine without network (device tool), carrying .carry3 (pydantic's four
# wheels and torchao 0.18.0 for Python 3.12, see BENCHMARKS.md). The run is detached, so it goes on between calls
# made back to back on one warm machine; each call copies the state so far to $OUT/solar_throughput.json:
#   WAIT=480 bash benchmarks/solar_throughput.sh start [--rows shipped,limit80] [--redo]
#   bash benchmarks/solar_throughput.sh wait SECONDS
# FRESH=1 starts a run of its own instead of continuing the recorded one (the rows it names, on this machine alone).
set -u
source "$(dirname "$0")/gpu_carry.sh"
export OMP_NUM_THREADS=8 TRANSFORMERS_VERBOSITY=error
collect() {
  cp /tmp/sthr/state.json "$OUT/solar_throughput.json" 2>/dev/null
  grep -v -e "^W12" -e "Failed to load" /tmp/sthr.log | tail -c 20000 > "$OUT/sthr.log" 2>/dev/null
  tail -c 3000 "$OUT/sthr.log"
}
case $1 in
  start)
    shift
    [ -d /tmp/site/pydantic ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry3/*.whl
    build_shim
    # a run continues from the rows recorded so far (they travel with the tree)
    mkdir -p /tmp/sthr && [ -z "${FRESH:-}" ] && [ -f benchmarks/results/solar_throughput.json ] && [ ! -f /tmp/sthr/state.json ] \
      && cp benchmarks/results/solar_throughput.json /tmp/sthr/state.json
    detach /tmp/sthr.log python3 "$PWD/benchmarks/solar_throughput.py" --work /tmp/sthr "$@"
    follow "${WAIT:-60}" ;;
  wait) follow "$2" ;;
esac
