#!/usr/bin/env bash
# On the GPU machine (device tool, carrying .carry3: pydantic's four wheels and torchao 0.18.0 for Python 3.12, see
# BENCHMARKS.md): install the wheels once, put the package together as it installs, then run or resume.
#   bash benchmarks/solar_throughput.sh --work /tmp/sthr --out $OUT/solar_throughput.json [--rows shipped,limit80]
set -u
[ -d /tmp/site/pydantic ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry3/*.whl
rm -rf /tmp/shim && mkdir -p /tmp/shim && cp -r dus_plugin /tmp/shim/ \
  && cp -r train /tmp/shim/dus_plugin/train && cp -r eval /tmp/shim/dus_plugin/eval
# a run continues from the rows recorded so far (they travel with the tree)
mkdir -p /tmp/sthr && [ -f benchmarks/results/solar_throughput.json ] && [ ! -f /tmp/sthr/state.json ] \
  && cp benchmarks/results/solar_throughput.json /tmp/sthr/state.json
export PYTHONPATH=/tmp/shim:/tmp/site OMP_NUM_THREADS=8 TRANSFORMERS_VERBOSITY=error
python3 benchmarks/solar_throughput.py "$@" 2>&1 | grep -v -e "^W12" -e "Failed to load"
