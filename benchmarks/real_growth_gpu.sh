#!/usr/bin/env bash
# The real-growth study on a GPU machine without network (device tool), in two carried halves:
#   call 1, carrying .carry1 (the first half of the xz'd GGUF):        bash benchmarks/real_growth_gpu.sh stash
#   call 2, carrying .carry2 (second half, wheels, corpus.tar.xz):     bash benchmarks/real_growth_gpu.sh start ARGS
#   later calls while the machine is warm:                               bash benchmarks/real_growth_gpu.sh wait SECONDS
#   more runs on the same warm machine, once the last batch is done:     bash benchmarks/real_growth_gpu.sh more ARGS
# The study runs detached (setsid), so it continues between calls; each call copies its state to $OUT.
# Made here with: xz -6 GGUF | split -b 50M; real_corpus.py --pack; pip download (see docs/real_growth.md).
set -u
ST=/tmp/st
phase=$1; shift
export PYTHONPATH=/tmp/shim:/tmp/site DUS="python3 -m dus_plugin.cli" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
launch() {  # detached, resuming from every run recorded so far; `wait` follows its pid, not a name
  cd /tmp  # not the repo root: `python3 -m dus_plugin.cli` must find the shim, which holds train/ and eval/
  setsid nohup python3 $ST/real_growth.py --base $ST/smollm2-135m --corpus $ST/corpus --out /tmp/rg_out "$@" \
    > /tmp/rg.log 2>&1 < /dev/null &
  echo $! > /tmp/rg.pid
}
running() { kill -0 "$(cat /tmp/rg.pid 2>/dev/null)" 2>/dev/null; }
follow() {
  end=$((SECONDS + $1)); sleep 5
  while [ $SECONDS -lt $end ] && running; do sleep 10; done
  collect
}
collect() {
  cd /tmp; cp /tmp/rg_out/real_growth.json "$OUT/" 2>/dev/null
  tail -c 20000 /tmp/rg.log > "$OUT/rg.log" 2>/dev/null
  for f in /tmp/dus-real-growth/*.log; do tail -c 1500 "$f"; done > "$OUT/arms.log" 2>/dev/null
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv > "$OUT/gpu.txt" 2>/dev/null
}
case $phase in
  stash)
    mkdir -p $ST && cp .carry1/* $ST/ && ls -la $ST && nvidia-smi --query-gpu=name,memory.total --format=csv ;;
  start)
    mkdir -p $ST/gguf /tmp/shim
    cat $ST/gguf.xz.part* .carry2/gguf.xz.part* | xz -d > $ST/gguf/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .carry2/*.whl || exit 1
    rm -rf /tmp/shim/dus_plugin; cp -r dus_plugin /tmp/shim/ && cp -r train /tmp/shim/dus_plugin/train && cp -r eval /tmp/shim/dus_plugin/eval
    mkdir -p $ST/corpus && tar -xJf .carry2/corpus.tar.xz -C $ST/corpus || exit 1
    python3 -c "from pathlib import Path; from dus_plugin.pretrained import convert; \
convert(Path('$ST/gguf/SmolLM2-135M-Instruct.Q4_1.gguf'), Path('$ST/smollm2-135m'))" || exit 1
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
