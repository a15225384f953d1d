"""lm-evaluation-harness on an already-loaded model, with the paper's H6 preset.

H6 = the Open LLM Leaderboard v1 set that SOLAR reports, listed explicitly (lm-eval's own
`openllm` group pulls extra TruthfulQA variants):

| task           | shots | metric                      |
|----------------|-------|-----------------------------|
| arc_challenge  | 25    | acc_norm                    |
| hellaswag      | 10    | acc_norm                    |
| mmlu           | 5     | acc (see below)             |
| truthfulqa_mc2 | 0     | acc                         |
| winogrande     | 5     | acc                         |
| gsm8k          | 5     | exact_match,strict-match    |

MMLU: lm-eval's `mmlu` group score weights subjects by their number of questions; the
leaderboard (and so the paper) averaged the 57 subjects equally. We report both
(`mmlu` = subject macro-average, used in the H6 average; `mmlu_weighted` = lm-eval's group value).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from dus_plugin.eval.perplexity import EvalError

LOG = logging.getLogger(__name__)
SHIPPED_TASKS = Path(__file__).parent / "tasks"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    num_fewshot: int | None = None
    metric: str = "acc"


H6 = (
    TaskSpec("arc_challenge", 25, "acc_norm"),
    TaskSpec("hellaswag", 10, "acc_norm"),
    TaskSpec("mmlu", 5, "acc"),
    TaskSpec("truthfulqa_mc2", 0, "acc"),
    TaskSpec("winogrande", 5, "acc"),
    TaskSpec("gsm8k", 5, "exact_match,strict-match"),
)


def parse_tasks(spec: str) -> list[TaskSpec]:
    """``h6`` or a comma list of ``task[:shots[:metric]]``."""
    out: list[TaskSpec] = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        if item == "h6":
            out.extend(H6)
            continue
        name, *rest = item.split(":")
        try:
            shots = int(rest[0]) if rest and rest[0] else None
        except ValueError:
            raise EvalError(f"`tasks` item {item!r}: shots must be a number, e.g. arc_challenge:25",
                          setting="tasks") from None
        out.append(TaskSpec(name, shots, rest[1] if len(rest) > 1 else "acc"))
    if not out:
        raise EvalError("`tasks` is empty; give h6 or task names, e.g. h6 or dus_tiny_mc", setting="tasks")
    return out


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError("`tasks` needs lm-evaluation-harness: pip install 'dus-plugin[eval]' "
                        "(that is lm-eval[hf]; plain lm-eval lacks what its HF wrapper needs)") from None


def _materialize(include: list[Path]) -> Path:
    """Copy task folders to a temp dir, replacing @TASK_DIR@ by each source folder's absolute path."""
    dst = Path(tempfile.mkdtemp(prefix="dus-tasks-"))
    for k, src in enumerate(include):
        if not src.is_dir():
            raise EvalError(f"task folder {src} does not exist; give a folder of lm-eval task YAMLs in `include_paths`",
                            setting="include_paths")
        for f in src.rglob("*.yaml"):
            target = dst / str(k) / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f.read_text().replace("@TASK_DIR@", str(f.parent.absolute())))
    return dst


def run_tasks(model, tokenizer, tasks: list[TaskSpec], include_paths: list[str | Path] = (),
              use_default_tasks: bool = True, limit: int | float | None = None, batch_size: int = 8,
              chat: bool = False) -> dict[str, Any]:
    """Run each task with its own shot count; return {task: {metric: value, ...}} plus 'h6' when complete.
    ``chat``: each request through the tokenizer's chat template, the few-shot examples as earlier turns."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if chat and not getattr(tokenizer, "chat_template", None):
        raise EvalError("`chat` renders lm-eval's requests with the model's chat template, and this model's tokenizer "
                        "has none; leave `chat` off for a base model", setting="chat")
    folders = [SHIPPED_TASKS, *(Path(p) for p in include_paths)]
    tmp = _materialize(folders)
    try:
        manager = TaskManager(include_path=str(tmp), include_defaults=use_default_tasks)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        scores: dict[str, Any] = {}
        for spec in tasks:
            if spec.name not in manager.all_tasks:
                raise EvalError(f"lm-eval task {spec.name!r} is unknown; add its YAML folder to `include_paths`",
                                setting="include_paths")
            LOG.info("lm-eval %s (%s-shot)", spec.name, spec.num_fewshot)
            with _no_git_probe():
                out = simple_evaluate(model=lm, tasks=[spec.name], num_fewshot=spec.num_fewshot,
                                      task_manager=manager, limit=limit, log_samples=False, bootstrap_iters=0,
                                      verbosity="ERROR", apply_chat_template=chat,
                                      fewshot_as_multiturn=chat and spec.num_fewshot > 0)
            scores[spec.name] = {**_task_scores(spec, out), "chat": chat}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if {s.name for s in H6} <= scores.keys():
        scores["h6"] = {"average": sum(scores[s.name]["score"] for s in H6) / len(H6) * 100}
    return scores


@contextlib.contextmanager
def _no_git_probe() -> Iterator[None]:
    """lm-eval runs `git describe` in the working directory to record its commit, and outside a git checkout
    git prints "fatal: not a git repository" to the terminal. The hash describes the user's folder, not
    lm-eval or the model, so the probe is skipped while it runs (dus records the versions it used itself)."""
    import lm_eval.evaluator as evaluator

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def _task_scores(spec: TaskSpec, out: dict[str, Any]) -> dict[str, Any]:
    results = out["results"]
    main = results.get(spec.name) or next(iter(results.values()))
    metrics = {k.removesuffix(",none"): v for k, v in main.items() if isinstance(v, (int, float)) and "stderr" not in k}
    key = spec.metric if spec.metric in metrics else spec.metric.removesuffix(",none")
    if key not in metrics:
        raise EvalError(f"lm-eval task {spec.name} reported {sorted(metrics)}, not {spec.metric}")
    score = metrics[key]
    entry: dict[str, Any] = {"metric": spec.metric, "num_fewshot": spec.num_fewshot, "score": score,
                             "metrics": metrics, "samples": out.get("n-samples", {}).get(spec.name, {}).get("effective")}
    if spec.name == "mmlu":
        subjects = [v[f"{spec.metric},none"] for k, v in results.items()
                    if k.startswith("mmlu_") and k not in out.get("groups", {}) and f"{spec.metric},none" in v]
        if subjects:
            entry["score"] = sum(subjects) / len(subjects)
            entry["weighted"] = score
            entry["subjects"] = len(subjects)
    return entry
