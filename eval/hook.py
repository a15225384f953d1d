"""The eval hook the trainer calls every N steps and at the end (perplexity on held-out text)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dus_plugin.eval.perplexity import PerplexityResult, perplexity, read_texts
from dus_plugin.eval.results import make_result, save_result
from dus_plugin.eval.settings import HookSettings


class EvalHook:
    """should_run(step) / run(model, tokenizer, step); results land in OUT/eval/step-N.json, per file and pooled."""

    def __init__(self, settings: HookSettings, out_dir: str | Path, seq_len: int = 1024,
                 model_dir: str | Path | None = None):
        self.names = [Path(f).name for f in settings.text_files]
        self.texts = read_texts(settings.text_files)
        self.settings, self.max_length = settings, settings.max_length or seq_len
        self.every, self.max_tokens = settings.every, settings.max_tokens
        self.out_dir, self.model_dir = Path(out_dir), model_dir

    def should_run(self, step: int, final: bool = False) -> bool:
        return final or (self.every > 0 and step % self.every == 0)

    def run(self, model, tokenizer, step: int, write: bool = True, device=None) -> dict[str, Any]:
        """Perplexity on each file (its first max_tokens tokens, so a run stays short) and on all of them together."""
        was_training = model.training
        by_file = {}
        for name, text in zip(self.names, self.texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:self.max_tokens]
            by_file[name] = perplexity(model, tokenizer, [tokenizer.decode(ids)], max_length=self.max_length,
                                       stride=self.settings.stride, batch_size=self.settings.batch_size,
                                       progress=False, device=device)
        if was_training:
            model.train()
        pooled = PerplexityResult.combine(list(by_file.values()))
        result = make_result(self.model_dir or self.out_dir, perplexity=pooled.to_dict(), label=f"step {step}",
                             step=step)
        if len(by_file) > 1:
            result["perplexity_by_file"] = {name: r.to_dict() for name, r in by_file.items()}
        if write:
            save_result(result, self.out_dir / "eval" / f"step-{step:07d}.json")
        return result
