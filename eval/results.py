"""One JSON per evaluated checkpoint, and the before/after table built from several."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from dus_plugin.eval.perplexity import EvalError

RESULT_FORMAT = 1


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("dus-plugin", "torch", "transformers", "lm-eval"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def model_identity(model_dir: str | Path) -> dict[str, Any]:
    """Stage (base / upscaled / trained), training step and manifest hash of a model folder."""
    from dus_plugin.manifest import Manifest, manifest_sha256

    manifest = Manifest.read_optional(model_dir)
    if manifest is None:
        return {"stage": "base", "step": None, "manifest_sha256": None}
    train = manifest.last_train
    return {"stage": "trained" if train else "upscaled", "step": train.steps if train else 0,
            "manifest_sha256": manifest_sha256(model_dir)}


def make_result(model_dir: str | Path, perplexity: dict | None = None, tasks: dict | None = None,
                label: str | None = None, step: int | None = None) -> dict[str, Any]:
    ident = model_identity(model_dir)
    if step is not None:
        ident["step"] = step
    return {"format": RESULT_FORMAT, "label": label or ident["stage"], "model": str(Path(model_dir).absolute()),
            **ident, "perplexity": perplexity, "tasks": tasks or {}, "versions": _versions(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def default_result_path(model_dir: str | Path, label: str | None) -> Path:
    """MODEL/eval/<label>.json, except for a model inside the installed package (never written into)."""
    import dus_plugin

    name = f"{label or model_identity(model_dir)['stage']}.json"
    package = Path(dus_plugin.__file__).resolve().parent
    inside = Path(model_dir).resolve().is_relative_to(package)
    return (Path("eval") if inside else Path(model_dir) / "eval") / name


def save_result(result: dict[str, Any], path: str | Path) -> Path:
    from dus_plugin.io import atomic_write_text

    return atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def load_result(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"result file {path} does not exist; make it with `dus eval MODEL ... -o {path}`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvalError(f"{path} is not valid JSON (line {e.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
        raise EvalError(f"{path} is not a dus eval result (format {RESULT_FORMAT})")
    return data


def metric_rows(results: list[dict[str, Any]]) -> list[tuple[str, list[float | None]]]:
    """(metric name, value per result) for every metric any result has, in a stable order."""
    names: list[str] = []
    for r in results:
        if r.get("perplexity"):
            for k in ("perplexity", "bits_per_byte"):
                if k not in names:
                    names.append(k)
        for task in r.get("tasks", {}):
            if task not in names:
                names.append(task)
    rows = []
    for name in names:
        values: list[float | None] = []
        for r in results:
            if name in ("perplexity", "bits_per_byte"):
                values.append((r.get("perplexity") or {}).get(name))
            else:
                t = r.get("tasks", {}).get(name)
                values.append(None if t is None else (t.get("average") if name == "h6" else t["score"] * 100))
        rows.append((name, values))
    return rows


def window_of(result: dict[str, Any]) -> tuple[int, int] | None:
    """(max_length, stride) of a result's perplexity, the settings its numbers depend on."""
    ppl = result.get("perplexity") or {}
    return (ppl["max_length"], ppl["stride"]) if "max_length" in ppl else None


def column_labels(results: list[dict[str, Any]]) -> list[str]:
    """One label per result, each distinct (a repeated label gets #2, #3) and marked with its perplexity
    window when the results do not share one."""
    windows = {w for w in map(window_of, results) if w}
    labels, seen = [], {}
    for r in results:
        label = r.get("label", "?")
        seen[label] = seen.get(label, 0) + 1
        label += f" #{seen[label]}" if seen[label] > 1 else ""
        if len(windows) > 1 and window_of(r):
            label += f" (window {window_of(r)[0]}/{window_of(r)[1]})"
        labels.append(label)
    return labels


def settings_line(results: list[dict[str, Any]]) -> str:
    """Under a table: how perplexity was measured, or a warning that the columns measured it differently."""
    windows = {w for w in map(window_of, results) if w}
    if not windows:
        return ""
    if len(windows) > 1:
        return ("Perplexity columns were measured with different windows (max_length/stride in each header): "
                "their values are not comparable; evaluate again with one --max-length.")
    length, stride = windows.pop()
    return f"Perplexity: windows of {length} tokens, stride {stride}, on held-out text."


def compare_table(results: list[dict[str, Any]]) -> str:
    """A Markdown table, one column per result (base, upscaled, trained ...), then how it was measured."""
    head = "| metric | " + " | ".join(column_labels(results)) + " |"
    sep = "|---|" + "---|" * len(results)
    lines = [head, sep]
    for name, values in metric_rows(results):
        cells = ["—" if v is None else (f"{v:.3f}" if name in ("perplexity", "bits_per_byte") else f"{v:.2f}")
                 for v in values]
        unit = "" if name in ("perplexity", "bits_per_byte") else " (%)"
        lines.append(f"| {name}{unit} | " + " | ".join(cells) + " |")
    note = settings_line(results)
    return "\n".join(lines + ([f"\n{note}"] if note else []))
