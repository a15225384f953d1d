"""Sliding-window perplexity on local text, with bits per byte (comparable across tokenizers).

Each window of ``max_length`` tokens starts ``stride`` tokens after the previous one and scores
only the tokens the previous window did not (the transformers perplexity guide's definition).
With stride < max_length every token after the first is scored once; with disjoint windows
(stride = max_length) the first token of each later window has no context and is not scored.
The default stride is half a window.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from dus_plugin.errors import EvalError
from dus_plugin.io import not_utf8


DEFAULT_MAX_LENGTH = 512
"""The perplexity window when none is given (capped by the model's context): one value everywhere."""


@dataclass
class PerplexityResult:
    tokens: int
    """Scored tokens."""
    nll: float
    """Summed negative log-likelihood in nats."""
    bytes: int
    """UTF-8 bytes of the evaluated text."""
    max_length: int
    stride: int

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    @classmethod
    def combine(cls, parts: list["PerplexityResult"]) -> "PerplexityResult":
        """One result over several texts scored separately with the same window."""
        return cls(sum(p.tokens for p in parts), sum(p.nll for p in parts), sum(p.bytes for p in parts),
                   parts[0].max_length, parts[0].stride)

    def to_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def read_texts(files: Iterable[str | Path]) -> list[str]:
    texts = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise EvalError(f"text file {p} does not exist; give held-out text in `text_files`", setting="text_files")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise EvalError(not_utf8(p, e), setting="text_files") from None
        if not text.strip():
            raise EvalError(f"text file {p} is empty")
        texts.append(text)
    return texts


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a sequence of n_tokens."""
    if not 0 < stride <= max_length:
        raise EvalError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    out, prev_end, begin = [], 0, 0
    while prev_end < n_tokens:
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        begin += stride
    return out


def perplexity(model, tokenizer, texts: list[str], max_length: int | None = None, stride: int | None = None,
               batch_size: int = 4, progress: bool = True, device=None) -> PerplexityResult:
    """Perplexity of ``model`` over ``texts`` (each text is tokenized as one sequence)."""
    import torch
    from tqdm import tqdm

    max_length = max_length or min(getattr(model.config, "max_position_embeddings", DEFAULT_MAX_LENGTH),
                                   DEFAULT_MAX_LENGTH)
    stride = stride or max(1, max_length // 2)
    batch_size = windows_per_batch(batch_size, max_length, model.config.get_text_config().vocab_size)
    device = device or next(model.parameters()).device
    jobs = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        jobs += [(ids, w) for w in windows(len(ids), max_length, stride)]
    by_length: dict[int, list] = {}
    for ids, (b, e, first) in jobs:
        by_length.setdefault(e - b, []).append((ids[b:e], first - b))
    batches = [group[k:k + batch_size] for group in by_length.values() for k in range(0, len(group), batch_size)]
    nll, scored = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in tqdm(batches, desc="Perplexity", unit="batch", disable=not progress):
            ids = torch.stack([w for w, _ in batch]).to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            for row, (_, first) in enumerate(batch):
                nll += _row_nll(logits[row], ids[row], first)
                scored += ids.shape[1] - first
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if scored == 0:
        raise EvalError("the text has fewer than 2 tokens; nothing to score")
    return PerplexityResult(scored, nll, n_bytes, max_length, stride)


LOGITS_BUDGET = 256 * 2**20
"""Bytes of float32 logits one batch of windows may hold: the model's activations and logits, not its weights, set
the peak (8 windows of 512 over SmolLM2's 49k vocabulary peaked at 2.8 GB RSS, 2 windows at 1.5 GB)."""


def windows_per_batch(asked: int, max_length: int, vocab: int) -> int:
    """The batch size asked for, lowered so that a batch's float32 logits stay within LOGITS_BUDGET."""
    return max(1, min(asked, LOGITS_BUDGET // (max_length * vocab * 4)))


SCORE_CHUNK = 256
"""Positions scored at a time: the float32 log-probabilities of one chunk, not of a whole batch of windows
(8 windows of 512 over a 49k vocabulary were 0.8 GB per copy)."""


def _row_nll(logits, ids, first: int) -> float:
    """Summed NLL of tokens first.. of one window; logits[t - 1] scores token t."""
    import torch

    total = 0.0
    for start in range(first - 1, ids.shape[0] - 1, SCORE_CHUNK):
        end = min(start + SCORE_CHUNK, ids.shape[0] - 1)
        logp = torch.log_softmax(logits[start:end].float(), dim=-1)
        total -= logp.gather(-1, ids[start + 1:end + 1, None]).double().sum().item()
    return total
