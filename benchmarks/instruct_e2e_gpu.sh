#!/usr/bin/env bash
# The instruct chain's GPU size (benchmarks/instruct_e2e.py --corpus) on a GPU machine without network (device
# tool), back to back on one warm machine:
#   call 1, carrying .carry1:   bash benchmarks/instruct_e2e_gpu.sh stash
#   call 2, carrying .carry2:   WAIT=540 bash benchmarks/instruct_e2e_gpu.sh start
#   later calls:                bash benchmarks/instruct_e2e_gpu.sh wait SECONDS
# What the carried folders hold and how they are made: benchmarks/gpu_carry.sh.
set -u
source "$(dirname "$0")/gpu_carry.sh"
collect() {
  cp /tmp/ie_results.json "$OUT/instruct_e2e.json" 2>/dev/null
  tail -c 30000 /tmp/ie.log > "$OUT/ie.log" 2>/dev/null
  for stage in train sft dpo; do
    cp /tmp/ie_out/run/$stage/metrics.jsonl "$OUT/metrics_$stage.jsonl" 2>/dev/null
    cp /tmp/ie_out/run/$stage/loss_curve.png "$OUT/loss_$stage.png" 2>/dev/null
  done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv > "$OUT/gpu.txt" 2>/dev/null
}
case $1 in
  stash) stash_first_half ;;
  start)
    unpack_second_half || exit 1
    detach /tmp/ie.log python3 "$PWD/benchmarks/instruct_e2e.py" --out /tmp/ie_out --base $ST/smollm2-135m \
      --corpus $ST/corpus --results /tmp/ie_results.json
    follow "${WAIT:-60}" ;;
  wait) follow "$2" ;;
esac
