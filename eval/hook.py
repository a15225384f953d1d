"""The eval hook the trainer calls every N steps and at the end (perplexity on held-out text)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dus_plugin.eval.perplexity import perplexity, read_texts
from dus_plugin.eval.results import make_result, save_result


class EvalHook:
    """should_run(step) / run(model, tokenizer, step); results land in OUT/eval/step-N.json."""

    def __init__(self, text_files: list[str], out_dir: str | Path, every: int = 0, max_tokens: int = 20000,
                 max_length: int = 1024, model_dir: str | Path | None = None):
        self.texts = read_texts(text_files)
        self.every, self.max_tokens, self.max_length = every, max_tokens, max_length
        self.out_dir, self.model_dir = Path(out_dir), model_dir

    def should_run(self, step: int, final: bool = False) -> bool:
        return final or (self.every > 0 and step % self.every == 0)

    def run(self, model, tokenizer, step: int, write: bool = True, device=None) -> dict[str, Any]:
        ids_budget = self.max_tokens
        texts = []
        for t in self.texts:  # keep the run short: at most max_tokens tokens of text in all
            ids = tokenizer(t, add_special_tokens=False)["input_ids"][:ids_budget]
            if ids:
                texts.append(tokenizer.decode(ids))
            ids_budget -= len(ids)
            if ids_budget <= 0:
                break
        was_training = model.training
        r = perplexity(model, tokenizer, texts, max_length=self.max_length, progress=False, device=device)
        if was_training:
            model.train()
        result = make_result(self.model_dir or self.out_dir, perplexity=r.to_dict(), label=f"step {step}", step=step)
        if write:
            save_result(result, self.out_dir / "eval" / f"step-{step:07d}.json")
        return result
