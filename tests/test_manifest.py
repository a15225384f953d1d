"""The typed manifest: one definition every stage reads and writes (issue 15)."""

from __future__ import annotations

import json

import pytest

from dus_plugin.errors import ManifestError
from dus_plugin.manifest import Manifest, TrainStage

from helpers import dus_ok


@pytest.fixture(scope="module")
def upscaled(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    dus_ok("plan", tiny_llama, "--drop", 2, "-o", root / "r.yml")
    dus_ok("upscale", root / "r.yml", root / "out", "-q", "--no-forward")
    return root / "out"


def test_an_upscale_manifest_round_trips_byte_for_byte(upscaled):
    text = (upscaled / "dus_manifest.json").read_text()
    m = Manifest.parse(text)
    assert m.is_upscale_output and not m.is_trained and m.plan.s == 12 and m.layers.prefix == "model.layers."
    assert m.to_json() == text  # what upscale wrote is exactly the typed model's JSON
    assert Manifest.parse(m.to_json()) == m


def test_append_train_stage_drops_the_tensor_record(upscaled):
    m = Manifest.read(upscaled)
    trained = m.append_stage(TrainStage(steps=4, tokens=2048, loss=1.0, **{"from": "x"}))
    assert trained.is_trained and trained.tensors is None and trained.last_train.steps == 4
    assert m.tensors is not None  # the original is unchanged
    again = Manifest.parse(trained.to_json())
    assert again.last_train.from_ == "x" and '"from": "x"' in trained.to_json()


@pytest.mark.parametrize("change,needle", [
    (lambda d: d.update(format=7), "format 7"),
    (lambda d: d["plan"].update(s="many"), "field plan.s"),
    (lambda d: d.update(plna={}), "field plna: unknown key"),
    (lambda d: d["stages"].append({"stage": "bake"}), "field stages[1]"),
])
def test_a_bad_manifest_is_one_error_naming_the_field(upscaled, tmp_path, change, needle):
    data = json.loads((upscaled / "dus_manifest.json").read_text())
    change(data)
    with pytest.raises(ManifestError, match=None) as e:
        Manifest.parse(json.dumps(data), "m.json")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_no_stage_imports_a_private_name_of_another_module():
    """Issue 15: stages talk through public functions and the manifest, never each other's _private names."""
    import ast

    from conftest import REPO

    offenders = []
    for path in [*REPO.joinpath("dus_plugin").glob("*.py"), *REPO.joinpath("train").glob("*.py"),
                 *REPO.joinpath("eval").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dus_plugin"):
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.endswith("__")]
    assert not offenders, offenders
