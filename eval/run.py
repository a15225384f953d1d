"""`dus eval`: load a model folder once, run perplexity and lm-eval tasks on it, return one result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dus_plugin.eval.perplexity import EvalError, perplexity, read_texts
from dus_plugin.errors import NetworkError
from dus_plugin.eval.results import make_result, save_result
from dus_plugin.eval.settings import EvalSettings
from dus_plugin.io import model_folder_problem
from dus_plugin.network import is_network_error, unreachable


def load_model(model_dir: str | Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if problem := model_folder_problem(path):
        raise EvalError(f"{problem}; pass the folder made by dus upscale or train")
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 device_map="cuda" if cuda else None)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def evaluate(model_dir: str | Path, settings: EvalSettings, use_default_tasks: bool = True,
             limit: float | None = None, label: str | None = None, progress: bool = True,
             save_to: str | Path | None = None) -> dict[str, Any]:
    """Perplexity on the settings' text files and their lm-eval tasks, in one result; with ``save_to``, the
    perplexity is written there before lm-eval starts, so a task that fails (offline, say) loses nothing computed."""
    texts, tasks, batch_size = settings.text_files, settings.tasks, settings.batch_size
    if tasks:
        from dus_plugin.eval.harness import require_lm_eval

        require_lm_eval()  # fail before loading a large model
    text_data = read_texts(texts) if texts else []
    model, tok = load_model(model_dir)
    ppl = None
    if text_data:
        ppl = perplexity(model, tok, text_data, max_length=settings.max_length, stride=settings.stride,
                         batch_size=batch_size, progress=progress).to_dict()
        ppl["files"] = [str(Path(t)) for t in texts]
    scores = None
    if tasks:
        from dus_plugin.eval.harness import parse_tasks, run_tasks

        specs = parse_tasks(tasks)
        if save_to is not None and ppl is not None:
            save_result(make_result(model_dir, perplexity=ppl, label=label), save_to)
        try:
            scores = run_tasks(model, tok, specs, settings.include_paths, use_default_tasks, limit, batch_size,
                               chat=settings.chat)
        except Exception as e:
            if not is_network_error(e):
                raise
            kept = f" (the perplexity is saved in {save_to})" if save_to is not None and ppl is not None else ""
            raise NetworkError(unreachable("the dataset host", f"loading the data of lm-eval tasks {tasks}", e)
                               + kept) from None
    result = make_result(model_dir, perplexity=ppl, tasks=scores, label=label)
    if save_to is not None:
        save_result(result, save_to)
    return result
