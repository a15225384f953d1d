# Shared by the *_gpu.sh scripts: a GPU machine without network (device tool) gets the base and wheels in two
# carried halves, because one call carries at most 64 MiB.
#   .carry1: the first half of the xz'd GGUF and the wheels;  .carry2: the second half and corpus.tar.xz.
# Made here with (see docs/real_growth.md):
#   xz -6 -c GGUF | split -b 50000000 -d - /tmp/gguf.xz.part; mv part00 to .carry1/, part01 to .carry2/
#   python benchmarks/real_corpus.py --out /tmp/real_corpus --tokenizer BASE --pack; cp corpus.tar.xz .carry2/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .carry1 (the wheels WHEELS names)
# Everything runs detached (setsid) so that it goes on between calls; each call copies its state to $OUT.
WHEELS="pydantic==2.13.4 pydantic_core==2.46.4 annotated-types typing-inspection mergekit==0.1.5 gguf==0.19.0
immutables==0.21 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"
ST=/tmp/st
export PYTHONPATH=/tmp/shim:/tmp/site DUS="python3 -m dus_plugin.cli" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4

stash_first_half() {  # call 1: keep .carry1, install the wheels and dus, and check that they import
  mkdir -p $ST /tmp/shim && cp .carry1/gguf.xz.part* $ST/ || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .carry1/*.whl || return 1
  build_shim
  (cd /tmp && python3 -c "import trl, datasets, mergekit, transformers, torch, dus_plugin.train.instruct_data
print('trl', trl.__version__, 'datasets', datasets.__version__, 'transformers', transformers.__version__,
      'torch', torch.__version__, torch.cuda.get_device_name())")
}

unpack_second_half() {  # [FOLDER] call 2: the GGUF whole, converted to a transformers folder; the corpus unpacked
  local half=${1:-.carry2}  # or where an earlier call kept .carry2
  mkdir -p $ST/gguf $ST/corpus
  cat $ST/gguf.xz.part* $half/gguf.xz.part* | xz -d > $ST/gguf/SmolLM2-135M-Instruct.Q4_1.gguf || return 1
  tar -xJf $half/corpus.tar.xz -C $ST/corpus || return 1
  (cd /tmp && python3 -c "from pathlib import Path; from dus_plugin.pretrained import convert; \
convert(Path('$ST/gguf/SmolLM2-135M-Instruct.Q4_1.gguf'), Path('$ST/smollm2-135m'))")
}

build_shim() {  # dus_plugin as it installs (train/ and eval/ inside it), from this tree, on PYTHONPATH
  rm -rf /tmp/shim/dus_plugin && mkdir -p /tmp/shim && cp -r dus_plugin /tmp/shim/ \
    && cp -r train /tmp/shim/dus_plugin/train && cp -r eval /tmp/shim/dus_plugin/eval
}

detach() {  # LOG CMD...: run detached from /tmp (not the repo root: `python3 -m` must find the shim)
  local log=$1; shift
  # the job writes its own pid: setsid forks when it leads a process group, so $! can name a process already gone
  (cd /tmp && setsid nohup bash -c 'echo $$ > /tmp/job.pid; exec "$@"' _ "$@" > "$log" 2>&1 < /dev/null &)
  sleep 1
}
running() { kill -0 "$(cat /tmp/job.pid 2>/dev/null)" 2>/dev/null; }
follow() {  # SECONDS: wait for the detached job at most this long, then collect (the caller defines collect)
  local end=$((SECONDS + $1)); sleep 5
  while [ $SECONDS -lt $end ] && running; do sleep 10; done
  collect
}
