"""The house rules, checked on the code itself: no import cycles, errors in errors.py, short functions, and the
base's architecture resolved once per stage (issue 28)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = {"dus_plugin": REPO / "dus_plugin", "dus_plugin.train": REPO / "train", "dus_plugin.eval": REPO / "eval"}
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    return {f"{pkg}.{p.stem}": p for pkg, folder in PACKAGES.items() for p in sorted(folder.glob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every dus module a file imports, at the top or inside a function, in any of Python's spellings."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dus_plugin"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names} & known  # from dus_plugin import upscale
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dus_plugin.")}
    return {m for m in found if m in known}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) - {name} for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per module that can reach itself."""
    found = []
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    found.append(path + [start])
                    stack = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def test_no_module_imports_itself_back() -> None:
    """Every module is a start, and an import inside a function counts: a cycle is a design smell even when
    Python tolerates it."""
    assert not cycles(import_graph()), cycles(import_graph())[:3]


def test_the_cycle_check_sees_a_planted_cycle() -> None:
    graph = import_graph()
    assert "dus_plugin.architecture" in graph["dus_plugin.planner"] or graph["dus_plugin.planner"]
    graph["dus_plugin.plan"] = graph["dus_plugin.plan"] | {"dus_plugin.architecture"}
    graph["dus_plugin.architecture"] = graph["dus_plugin.architecture"] | {"dus_plugin.plan"}
    assert any(c[0] == "dus_plugin.plan" for c in cycles(graph))


def test_the_graph_reads_every_import_form(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("import dus_plugin.plan\nfrom dus_plugin import upscale\ndef f():\n    from dus_plugin.io import x\n")
    assert imports_of(src, set(modules())) == {"dus_plugin.plan", "dus_plugin.upscale", "dus_plugin.io"}


def test_plan_is_pure_arithmetic() -> None:
    assert imports_of(REPO / "dus_plugin" / "plan.py", set(modules())) == {"dus_plugin.errors"}


def test_error_classes_live_in_errors_py() -> None:
    offenders = []
    for name, path in modules().items():
        if name == "dus_plugin.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception")) for b in node.bases):
                offenders.append(f"{path.name}: {node.name}")
    assert not offenders, offenders


def test_no_function_is_longer_than_a_screen() -> None:
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_one_upscale_with_verify_builds_two_meta_models(tiny_llama: Path, tmp_path: Path) -> None:
    """The base's architecture is resolved once and handed down: plan, upscale, stream and verify share one
    meta model of the base and one of its output (there were about 13 builds before)."""
    from dus_plugin import architecture
    from dus_plugin.planner import PlanOptions, make_recipe
    from dus_plugin.upscale import UpscaleOptions, upscale

    before = architecture.META_BUILDS
    planned = make_recipe(str(tiny_llama), PlanOptions(drop=2, method="identity"))
    assert architecture.META_BUILDS - before == 2
    recipe = tmp_path / "r.yml"
    recipe.write_text(planned.render("identity"))
    before = architecture.META_BUILDS
    manifest = upscale(recipe, tmp_path / "out", UpscaleOptions(quiet=True))
    assert architecture.META_BUILDS - before == 2
    assert manifest.plan.m == 2 and manifest.plan.layout == "solar"
