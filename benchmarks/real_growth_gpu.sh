#!/usr/bin/env bash
# The real-growth study on a GPU machine without network (device tool), back to back on one warm machine:
#   call 1, carrying .carry1:                                            bash benchmarks/real_growth_gpu.sh stash
#   call 2, carrying .carry2:                                            bash benchmarks/real_growth_gpu.sh start ARGS
#   later calls while the machine is warm:                               bash benchmarks/real_growth_gpu.sh wait SECONDS
#   more runs on the same warm machine, once the last batch is done:     bash benchmarks/real_growth_gpu.sh more ARGS
# What the carried folders hold and how they are made: benchmarks/gpu_carry.sh.
set -u
source "$(dirname "$0")/gpu_carry.sh"
phase=$1; shift
launch() {  # resuming from every run recorded so far
  detach /tmp/rg.log python3 $ST/real_growth.py --base $ST/smollm2-135m --corpus $ST/corpus --out /tmp/rg_out "$@"
}
collect() {
  cd /tmp; cp /tmp/rg_out/real_growth.json "$OUT/" 2>/dev/null
  tail -c 20000 /tmp/rg.log > "$OUT/rg.log" 2>/dev/null
  for f in /tmp/dus-real-growth/*.log; do tail -c 1500 "$f"; done > "$OUT/arms.log" 2>/dev/null
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv > "$OUT/gpu.txt" 2>/dev/null
}
case $phase in
  stash) stash_first_half ;;
  start)
    unpack_second_half || exit 1
    cp benchmarks/real_growth.py $ST/
    resume=(); [ -f benchmarks/results/real_growth.json ] && cp benchmarks/results/real_growth.json $ST/resume.json \
      && resume=(--resume-from $ST/resume.json)  # the runs already recorded are not run again
    launch "${resume[@]}" "$@"
    follow "${WAIT:-60}" ;;
  more)
    running && { echo "the last batch is still running; call wait"; exit 1; }
    cp /tmp/dus-real-growth/real_growth.json $ST/resume.json && launch --resume-from $ST/resume.json "$@"
    follow "${WAIT:-60}" ;;
  wait)
    follow "$1" ;;
esac
