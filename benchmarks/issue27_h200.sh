#!/usr/bin/env bash
# Issue 27's H200 rows, one detached job over back-to-back calls on one warm machine (device tool, .carry3 carried):
#   in order of need: the 10.7B recipe at micro-batch 2 beside micro-batch 1 (BF16), the 2.25B benchmark shape at
#   micro-batch 8 (more than 80 GB) beside mb5 (54.3% on 2026-12-03), then FP8 at micro-batch 2 and 1, FP8 with
#   fp8_weight_cast: per_step (each weight cast once a step) at micro-batch 1 and 2, and mb10.
#   bash benchmarks/issue27_h200.sh start SECONDS     # first call: install, start the job, wait
#   bash benchmarks/issue27_h200.sh wait SECONDS      # later calls
# Each call copies the state so far to $OUT (solar_throughput_h200.json, train_throughput_h200.json, job.log).
# On a card under 100 GB (an H100) it times fp8_mb2, fp8_once_mb2 and fp8_once instead (the file is still named
# solar_throughput_h200.json; its `device` says which card ran it).
set -u
source "$(dirname "$0")/gpu_carry.sh"
export OMP_NUM_THREADS=8 TRANSFORMERS_VERBOSITY=error
collect() {
  cp /tmp/sthr/state.json "$OUT/solar_throughput_h200.json" 2>/dev/null
  cp /tmp/tt/r.json "$OUT/train_throughput_h200.json" 2>/dev/null
  grep -v -e "^W12" -e "Failed to load" /tmp/job.log | tail -c 20000 > "$OUT/job.log" 2>/dev/null
  tail -c 2500 "$OUT/job.log"
}
case $1 in
  start)
    mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
    echo "GPU memory: $mem MiB"
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry3/*.whl || exit 1
    build_shim
    if [ "$mem" -lt 100000 ]; then  # an 80 GB card: time what it can, fp8_weight_cast per_step beside per_matmul
      echo "not an H200: the 80 GB rows (fp8 per_step against per_matmul) instead"
      echo "python3 $PWD/benchmarks/solar_throughput.py --work /tmp/sthr --rows fp8_mb2,fp8_once_mb2,fp8_once" \
        > /tmp/job.sh
      detach /tmp/job.log bash /tmp/job.sh
      follow "$2"; exit 0
    fi
    cat > /tmp/job.sh <<JOB
python3 $PWD/benchmarks/solar_throughput.py --work /tmp/sthr --rows shipped_mb2,shipped
python3 $PWD/benchmarks/train_throughput.py --work /tmp/tt --out /tmp/tt/r.json \
  --variants compile+fused+mb8+ga2,compile+fused+mb5+ga4
python3 $PWD/benchmarks/solar_throughput.py --work /tmp/sthr --rows fp8_mb2,fp8,fp8_once,fp8_once_mb2
python3 $PWD/benchmarks/train_throughput.py --work /tmp/tt --out /tmp/tt/r.json --variants compile+fused+mb10+ga2
JOB
    detach /tmp/job.log bash /tmp/job.sh
    follow "$2" ;;
  wait) follow "$2" ;;
esac
