"""Shared fixtures: an isolated HF cache and tiny models of every family, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dus_plugin.fixtures import FAMILIES, make_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _isolated_hub(tmp_path_factory: pytest.TempPathFactory):
    """No test reads the real HF cache, a token, or the network."""
    home = tmp_path_factory.mktemp("hf_home")
    saved = dict(os.environ)
    os.environ.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_XET="1", HF_TOKEN="",
                      HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {f: make_tiny_model(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]
