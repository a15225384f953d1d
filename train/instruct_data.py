"""Chat data for instruction tuning (objective: sft) and preference pairs for DPO (objective: dpo).

Rows come in the layouts the common datasets use; TRL's helpers turn ShareGPT into ChatML, find the prompt
of pairs that repeat it in both answers, and pack conversations (best-fit decreasing). A conversation is
rendered with the chat template once; which tokens the assistant wrote follows from rendering its prefixes,
so any template whose turns render as prefixes of the whole works, with or without generation markers.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dus_plugin.train.config import DataConfig, TrainConfigError
from dus_plugin.train.data import Mixture, iter_rows

LOG = logging.getLogger(__name__)
IGNORE = -100
"""The label transformers' loss skips."""
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
CHAT_LAYOUTS = "messages, conversations (ShareGPT), prompt + completion, or instruction + output (Alpaca)"
PAIR_LAYOUTS = "prompt + chosen + rejected, question + chosen + rejected (Orca), or chosen + rejected conversations"


def require_trl() -> None:
    try:
        import trl  # noqa: F401
    except ImportError:
        raise TrainConfigError("objective sft and dpo read chat data with TRL, which is not installed; run "
                               "pip install 'dus-plugin[instruct]'", setting="objective") from None


class ChatTemplate:
    """The model's chat template (or the one ``chat_template`` names), rendering and masking conversations."""

    def __init__(self, tokenizer, template_file: str | None):
        require_trl()
        self.tokenizer = tokenizer
        if template_file:
            path = Path(template_file)
            if not path.is_file():
                raise TrainConfigError(f"chat template file {template_file} does not exist; set `chat_template` to a "
                                       ".jinja file, or leave it out to use the model's", setting="chat_template")
            self.template = path.read_text(encoding="utf-8")
        else:
            self.template = tokenizer.chat_template
            if isinstance(self.template, dict):
                self.template = self.template.get("default")
        if not self.template:
            raise TrainConfigError("the model's tokenizer has no chat template; set `chat_template` to a .jinja file",
                                   setting="chat_template")
        if not getattr(tokenizer, "is_fast", False):
            raise TrainConfigError("instruction data needs a fast tokenizer (tokenizer.json), which maps tokens to "
                                   "characters; the model folder has only a slow one", setting="model")

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def encode(self, messages: list[dict[str, Any]], where: str, answer_from: int = 0) -> tuple[list[int], list[bool]]:
        """The conversation's token ids, and which of them the assistant wrote in turns ``answer_from`` on: each
        reply and its end-of-turn tokens, not the header that announces it."""
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i < answer_from:
                continue
            start, end = self.render(messages[:i], generation_prompt=True), self.render(messages[:i + 1])
            if not (end.startswith(start) and text.startswith(end)):
                raise TrainConfigError(
                    f"{where}: the chat template does not render a conversation's first turns as the start of the "
                    "whole, so the assistant's tokens cannot be told apart; set `chat_template` to a template that "
                    "does", setting="chat_template")
            spans.append((len(start), len(end)))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [any(a <= first < b for a, b in spans) for first, _ in enc["offset_mapping"]]
        return list(enc["input_ids"]), mask


def conversation(row: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """A chat row in any of CHAT_LAYOUTS as ChatML messages with at least one assistant turn."""
    from trl import maybe_convert_to_chatml

    if "conversations" in row or "messages" in row:
        messages = maybe_convert_to_chatml(dict(row))["messages"]
        messages = [{**m, "role": SHAREGPT_ROLES.get(m.get("role"), m.get("role"))} for m in messages]
    elif "prompt" in row and "completion" in row:
        messages = _system(row) + _turns(row["prompt"], "user") + _turns(row["completion"], "assistant")
    elif "instruction" in row and "output" in row:
        ask = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": ask}, {"role": "assistant", "content": row["output"]}]
    else:
        raise TrainConfigError(f"{where} is not a chat row: it has {sorted(row)}; objective sft reads "
                               f"{CHAT_LAYOUTS}", setting="data.sources")
    _check_messages(messages, where)
    return messages


def preference(row: dict[str, Any], where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """A preference row in any of PAIR_LAYOUTS as (prompt, chosen, rejected) ChatML messages."""
    from trl import extract_prompt, maybe_convert_to_chatml

    if not {"chosen", "rejected"} <= row.keys():
        raise TrainConfigError(f"{where} is not a preference pair: it has {sorted(row)}; objective dpo reads "
                               f"{PAIR_LAYOUTS}", setting="data.sources")
    row = maybe_convert_to_chatml(dict(row))
    if isinstance(row["chosen"], list) and any(m.get("role") != "assistant" for m in row["chosen"]):
        row = extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})  # the prompt is in both
    if "prompt" in row or "question" in row:
        prompt = _system(row) + _turns(row.get("prompt", row.get("question")), "user")
    else:
        raise TrainConfigError(f"{where} has chosen and rejected but no prompt; objective dpo reads {PAIR_LAYOUTS}",
                               setting="data.sources")
    chosen, rejected = _turns(row["chosen"], "assistant"), _turns(row["rejected"], "assistant")
    for messages in (prompt + chosen, prompt + rejected):
        _check_messages(messages, where)
    return prompt, chosen, rejected


def check_rows(cfg: DataConfig, objective: str, template_file: str | None) -> None:
    """Every row of every source in a layout the objective reads, and the template file there, before the model
    loads: a wrong column costs a second, not a model load."""
    require_trl()
    if template_file and not Path(template_file).is_file():
        raise TrainConfigError(f"chat template file {template_file} does not exist; set `chat_template` to a "
                               ".jinja file, or leave it out to use the model's", setting="chat_template")
    read = conversation if objective == "sft" else preference
    for src in cfg.sources:
        if src.path.endswith(".txt"):
            raise TrainConfigError(f"data source {src.path}: objective {objective} reads rows (.jsonl, .parquet, a "
                                   "datasets folder or hf:NAME), not plain text", setting="data.sources")
        for row, where in source_rows(src):
            read(row, where)


def _system(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A system prompt column (OpenOrca, Orca DPO pairs), when the row has a non-empty one."""
    return [{"role": "system", "content": row["system"]}] if row.get("system") else []


def renamed(row: dict[str, Any], columns: dict[str, str], where: str) -> dict[str, Any]:
    """The row with each of the source's own columns under the name dus reads (`columns`: ours -> theirs)."""
    if missing := [theirs for theirs in columns.values() if theirs not in row]:
        raise TrainConfigError(f"{where} has no column {missing[0]!r}; it has {sorted(row)}: fix "
                               "data.sources[].columns", setting="data.sources")
    return {**{k: v for k, v in row.items() if k not in columns.values()},
            **{ours: row[theirs] for ours, theirs in columns.items()}}


def source_rows(src) -> Any:
    """A source's rows, their columns renamed as the source says."""
    for row, where in iter_rows(src):
        yield renamed(row, src.columns, where), where


def _turns(value: Any, role: str) -> list[dict[str, Any]]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in messages):
        raise TrainConfigError(f"{where}: messages must be a list of {{role, content}} with string content",
                               setting="data.sources")
    if not any(m["role"] == "assistant" for m in messages):
        raise TrainConfigError(f"{where} has no assistant turn, so nothing to learn from", setting="data.sources")


@dataclass
class ChatSplit:
    """One source's packed rows: token ids, labels (-100 outside the assistant's tokens) and positions that
    restart at each conversation."""

    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    n_train: int
    n_val: int

    def row(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.rows[k]


class ChatData(Mixture):
    """Conversations packed into rows of at most seq_len tokens, the loss on the assistant's tokens only."""

    def __init__(self, cfg: DataConfig, template: ChatTemplate, seed: int, total_samples: int):
        self.pad = _pad_id(template.tokenizer)
        splits = [self._split(cfg, k, template) for k in range(len(cfg.sources))]
        super().__init__(splits, [src.weight for src in cfg.sources], seed, total_samples)

    @staticmethod
    def _split(cfg: DataConfig, k: int, template: ChatTemplate) -> ChatSplit:
        from datasets import Dataset
        from trl import pack_dataset

        encoded = [template.encode(conversation(row, where), where) for row, where in source_rows(cfg.sources[k])]
        n_val = math.ceil(len(encoded) * cfg.val_fraction) if cfg.val_fraction > 0 else 0
        if len(encoded) - n_val < 1:
            raise TrainConfigError(f"data.sources[{k}] ({cfg.sources[k].path}) has {len(encoded)} conversations, "
                                   "none left for training after the validation share; add rows or lower "
                                   "data.val_fraction", setting="data.sources")
        parts = []
        with _no_progress_bars():  # packing takes a moment; its bars would only interleave with training's
            for chunk in (encoded[:len(encoded) - n_val], encoded[len(encoded) - n_val:]):
                table = Dataset.from_dict({"input_ids": [ids for ids, _ in chunk],
                                           "labels": [[t if m else IGNORE for t, m in zip(ids, mask)]
                                                      for ids, mask in chunk]})
                parts.append([_row(r) for r in pack_dataset(table, cfg.seq_len, strategy="bfd")] if chunk else [])
        return ChatSplit(parts[0] + parts[1], len(parts[0]), len(parts[1]))

    def collate(self, rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, Any]:
        import torch

        width = max(len(ids) for ids, _, _ in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        positions = torch.arange(width).repeat(len(rows), 1)  # padding comes after every real token, without loss
        for r, (i, lab, pos) in enumerate(rows):
            ids[r, :len(i)], labels[r, :len(i)], positions[r, :len(i)] = map(torch.from_numpy, (i, lab, pos))
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


@dataclass
class PairSplit:
    """One source's preference pairs, each (chosen ids, chosen labels, rejected ids, rejected labels), and the
    reference model's log-probabilities of both answers once measured."""

    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    n_train: int
    n_val: int
    reference: np.ndarray | None = None

    def row(self, k: int) -> tuple[Any, ...]:
        ref = self.reference[k] if self.reference is not None else np.full(2, np.nan)
        return (*self.pairs[k], ref)


class PreferenceData(Mixture):
    """Preference pairs for DPO: the loss is -log sigmoid(beta x (how much more the model prefers the chosen
    answer than the reference model did, minus the same for the rejected one))."""

    def __init__(self, cfg: DataConfig, template: ChatTemplate, seed: int, total_samples: int, beta: float):
        self.beta, self.pad = beta, _pad_id(template.tokenizer)
        splits = [self._split(cfg, k, template) for k in range(len(cfg.sources))]
        super().__init__(splits, [src.weight for src in cfg.sources], seed, total_samples)

    @staticmethod
    def _split(cfg: DataConfig, k: int, template: ChatTemplate) -> PairSplit:
        pairs, cut = [], 0
        for row, where in source_rows(cfg.sources[k]):
            prompt, chosen, rejected = preference(row, where)
            c_ids, c_mask = template.encode(prompt + chosen, where, answer_from=len(prompt))
            r_ids, r_mask = template.encode(prompt + rejected, where, answer_from=len(prompt))
            c_lab, r_lab = (_labels(i, m, cfg.seq_len) for i, m in ((c_ids, c_mask), (r_ids, r_mask)))
            if (c_lab == IGNORE).all() or (r_lab == IGNORE).all():
                cut += 1  # the prompt fills seq_len: no answer token is left to compare
                continue
            pairs.append((np.asarray(c_ids[:cfg.seq_len], np.int64), c_lab, np.asarray(r_ids[:cfg.seq_len], np.int64),
                          r_lab))
        if cut:
            LOG.warning("data.sources[%d]: %d pairs left out, their prompts fill seq_len %d", k, cut, cfg.seq_len)
        n_val = math.ceil(len(pairs) * cfg.val_fraction) if cfg.val_fraction > 0 else 0
        if len(pairs) - n_val < 1:
            raise TrainConfigError(f"data.sources[{k}] ({cfg.sources[k].path}) has {len(pairs)} usable pairs, none "
                                   "left for training after the validation share; add rows or raise data.seq_len",
                                   setting="data.sources")
        return PairSplit(pairs, len(pairs) - n_val, n_val)

    def collate(self, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
        """The chosen answers of every pair, then the rejected ones, padded on the right (causal attention never
        looks ahead, so padding changes no real token's output)."""
        import torch

        seqs = [(r[0], r[1]) for r in rows] + [(r[2], r[3]) for r in rows]
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        for k, (i, lab) in enumerate(seqs):
            ids[k, :len(i)], labels[k, :len(i)] = torch.from_numpy(i), torch.from_numpy(lab)
        reference = torch.from_numpy(np.stack([r[4] for r in rows])).float()
        return {"input_ids": ids, "labels": labels, "reference": reference}

    def answer_logps(self, model, batch: dict[str, Any]):
        """Each sequence's summed log-probability of its answer tokens, as (chosen, rejected)."""
        import torch.nn.functional as F

        logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        token_logp = -F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        total = token_logp.sum(dim=1)
        half = total.shape[0] // 2
        return total[:half], total[half:]

    def loss(self, model, batch: dict[str, Any]):
        import torch.nn.functional as F

        chosen, rejected = self.answer_logps(model, batch)
        ref = batch["reference"]
        return -F.logsigmoid(self.beta * ((chosen - ref[:, 0]) - (rejected - ref[:, 1]))).mean()

    def measure_reference(self, model, device, micro: int, rows: set[tuple[int, int]], progress: bool = False) -> None:
        """The model's log-probabilities of the answers of ``rows`` ((source, row) pairs: those the run will see),
        before training changes it: DPO's reference, kept as numbers so no second model stays in memory."""
        import torch
        from tqdm import tqdm

        for split in self.splits:
            split.reference = np.full((len(split.pairs), 2), np.nan)
        todo = sorted(rows)
        model.eval()
        with torch.no_grad():
            for k in tqdm(range(0, len(todo), micro), desc="DPO reference", unit="batch", disable=not progress):
                chunk = todo[k:k + micro]
                batch = self.collate([self.splits[s].row(r) for s, r in chunk])
                chosen, rejected = self.answer_logps(model, {key: v.to(device) for key, v in batch.items()})
                for (s, r), c, j in zip(chunk, chosen.tolist(), rejected.tolist()):
                    self.splits[s].reference[r] = (c, j)
        model.train()

    def save_reference(self, path: Path) -> None:
        import io

        from dus_plugin.io import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, *[s.reference for s in self.splits])
        atomic_write_bytes(path, buf.getvalue())

    def load_reference(self, path: Path) -> bool:
        """The reference measured when this run started; False when there is none for these pairs."""
        if not path.is_file():
            return False
        with np.load(path) as saved:
            refs = [saved[f"arr_{k}"] for k in range(len(saved.files))]
        if [len(r) for r in refs] != [len(s.pairs) for s in self.splits]:
            return False
        for split, ref in zip(self.splits, refs):
            split.reference = ref
        return True


def _pad_id(tokenizer) -> int:
    """What fills a batch's short rows (never attended to by real tokens, never in the loss)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _labels(ids: list[int], mask: list[bool], seq_len: int) -> np.ndarray:
    return np.asarray([t if m else IGNORE for t, m in zip(ids[:seq_len], mask[:seq_len])], np.int64)


@contextmanager
def _no_progress_bars():
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def _row(packed: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    positions = np.concatenate([np.arange(n) for n in packed["seq_lengths"]])
    return np.asarray(packed["input_ids"], np.int64), np.asarray(packed["labels"], np.int64), positions


def count_answer_tokens(labels) -> int:
    """Tokens that carry loss in a batch's labels."""
    return int((labels != IGNORE).sum())
