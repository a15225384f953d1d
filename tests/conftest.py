"""Shared fixtures: an isolated HF cache and tiny models of every family, built once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub (it reads these at import): no test reads the real HF
# cache, a token, or the network. Hub tests switch offline mode off against the local test server.
# The pytest-xdist controller reads this file before it starts its workers, which inherit its environment: one
# compile cache for the whole run, so a kernel one worker compiled is not compiled again by the other.
RUN_DIR = os.environ.setdefault("DUS_TEST_RUN_DIR", tempfile.mkdtemp(prefix="dus-test-run-"))
os.environ.update(HF_HOME=tempfile.mkdtemp(prefix="dus-hf-home-"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                  HF_HUB_DISABLE_XET="1", HF_TOKEN="", HF_HUB_DISABLE_TELEMETRY="1",
                  HF_HUB_DISABLE_UPDATE_CHECK="1", TOKENIZERS_PARALLELISM="false",
                  # torchao's optimizer step is compiled: a cache of this run only, never a stale one
                  TORCHINDUCTOR_CACHE_DIR=os.path.join(RUN_DIR, "inductor"))

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: two workers on two cores must not spin on each other
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402

from dus_plugin.fixtures import FAMILIES, make_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {f: make_tiny_model(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]
