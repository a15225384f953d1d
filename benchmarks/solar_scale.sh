#!/usr/bin/env bash
# On the GPU machine (device tool, carrying .whl: see BENCHMARKS.md): install the carried wheels once,
# put the package together as it installs (train/ and eval/ inside dus_plugin/), then run or resume.
#   bash benchmarks/solar_scale.sh --work /tmp/solar --out $OUT/solar_scale.json [--stages ...] [--small]
set -u
[ -d /tmp/site/pydantic ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
rm -rf /tmp/shim && mkdir -p /tmp/shim && cp -r dus_plugin /tmp/shim/ \
  && cp -r train /tmp/shim/dus_plugin/train && cp -r eval /tmp/shim/dus_plugin/eval
export PYTHONPATH=/tmp/shim:/tmp/site OMP_NUM_THREADS=8 TRANSFORMERS_VERBOSITY=error
python3 benchmarks/solar_scale.py "$@" 2>&1 | grep -v -e "^W11" -e "Failed to load"
