#!/usr/bin/env bash
# benchmarks/fp8_parity.py on a GPU machine without network (device tool), on the real SmolLM2-135M that .carry1 and
# .carry2 hold (benchmarks/gpu_carry.sh), while the machine may be busy with another benchmark:
#   call 1, carrying .carry1:   source benchmarks/gpu_carry.sh && stash_first_half
#   call 2, carrying .carry2:   bash benchmarks/fp8_parity_gpu.sh keep        (the second half, kept for later)
#   once the GPU is free:       WAIT=400 bash benchmarks/fp8_parity_gpu.sh start;  bash benchmarks/fp8_parity_gpu.sh wait S
set -u
source "$(dirname "$0")/gpu_carry.sh"
collect() {
  cp /tmp/fp8p/fp8_parity.json "$OUT/" 2>/dev/null
  for f in /tmp/dus-fp8-parity/*.log; do echo "== $f"; tail -c 600 "$f"; done > "$OUT/fp8p_runs.log" 2>/dev/null
  tail -c 3000 /tmp/fp8p.log
}
case $1 in
  keep) mkdir -p $ST/carry2 && cp .carry2/* $ST/carry2/ && ls -la $ST/carry2 ;;
  start)
    [ -d $ST/smollm2-135m ] || unpack_second_half $ST/carry2 || exit 1
    build_shim && mkdir -p /tmp/fp8p
    detach /tmp/fp8p.log python3 "$PWD/benchmarks/fp8_parity.py" --base $ST/smollm2-135m --corpus $ST/corpus \
      --out /tmp/fp8p/fp8_parity.json
    follow "${WAIT:-60}" ;;
  wait) follow "$2" ;;
esac
