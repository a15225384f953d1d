"""Data: read text sources, tokenize once (cached on disk), pack into full sequences, mix by weight.

The sampler is a pure function of (seed, sample index): the data position of a run is one
integer, so resume is exact and any world size sees the same global batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dus_plugin.io import not_utf8
from dus_plugin.train.config import DataConfig, DataSource, TrainConfigError

LOG = logging.getLogger(__name__)
CACHE_VERSION = 1


def iter_documents(src: DataSource) -> Iterator[str]:
    """Yield the documents of one source, by its kind."""
    if not src.path.startswith("hf:") and Path(src.path).suffix == ".txt":
        yield from _iter_text_blocks(Path(src.path))
        return
    for row, where in iter_rows(src):
        if text := _field(row, src, where):  # an empty document would add a lone EOS
            yield text


def iter_rows(src: DataSource) -> Iterator[tuple[dict[str, Any], str]]:
    """Yield the rows of a .jsonl, .parquet, datasets or hf: source, each with where it came from."""
    path = src.path
    if path.startswith("hf:"):
        yield from ((row, f"{path} row {k}") for k, row in enumerate(_load_hf(src)))
        return
    p = Path(path)
    if not p.exists():
        raise TrainConfigError(f"data source {path} does not exist; check data.sources[].path")
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[src.split]
        yield from ((row, f"{path} row {k}") for k, row in enumerate(ds))
    elif p.suffix == ".jsonl":
        with open(p, encoding="utf-8") as f:
            for k, line in enumerate(f, 1):
                if line.strip():
                    yield json.loads(line), f"{p}:{k}"
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from ((row, f"{p} row {k}") for k, row in enumerate(pq.read_table(p).to_pylist()))
    else:
        raise _unknown_kind(path, p.suffix)


def _iter_text_blocks(p: Path) -> Iterator[str]:
    """A .txt file's documents: blocks separated by blank lines."""
    if not p.exists():
        raise TrainConfigError(f"data source {p} does not exist; check data.sources[].path")
    block: list[str] = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                block.append(line.rstrip("\n"))
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)


KNOWN_SUFFIXES = (".txt", ".jsonl", ".parquet")


def check_sources(data) -> None:
    """Refuse an unusable source before anything heavy loads: a missing path or a file of unknown kind."""
    for src in data.sources:
        if src.path.startswith("hf:"):
            continue
        p = Path(src.path)
        if not p.exists():
            raise TrainConfigError(f"data source {src.path} does not exist; check data.sources[].path")
        if p.is_file() and p.suffix not in KNOWN_SUFFIXES:
            raise _unknown_kind(src.path, p.suffix)


def _unknown_kind(path: str, suffix: str) -> TrainConfigError:
    return TrainConfigError(f"data source {path}: unknown kind {suffix!r}; use .txt, .jsonl, .parquet, "
                            "a datasets folder or hf:NAME")


def _field(row: dict[str, Any], src: DataSource, where: str) -> str:
    if src.text_field not in row:
        raise TrainConfigError(f"{where} has no field {src.text_field!r}; set data.sources[].text_field")
    return row[src.text_field]


def _load_hf(src: DataSource):
    import datasets

    return datasets.load_dataset(src.path[3:], split=src.split, streaming=src.streaming)


def _fingerprint(src: DataSource, tokenizer) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, src.model_dump(exclude={"weight"})], sort_keys=True).encode())
    p = Path(src.path)
    if p.exists():
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for q in files:
            st = q.stat()
            h.update(f"{q.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()[:20]


def tokenize_source(src: DataSource, tokenizer, cache_dir: Path, show_progress: bool = True) -> np.ndarray:
    """All documents of ``src`` as one uint32 token stream, EOS after each document; cached."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir / f"{Path(src.path).name.replace(':', '_')}-{_fingerprint(src, tokenizer)}.npy"
    if cache.is_file():
        LOG.info("using cached tokens %s", cache)
        return np.load(cache, mmap_mode="r")
    from tqdm import tqdm

    eos = tokenizer.eos_token_id
    if eos is None:
        raise TrainConfigError("the tokenizer has no eos_token; DUS training separates documents with EOS")
    chunks: list[np.ndarray] = []
    total, batch = 0, []
    bar = tqdm(desc=f"Tokenizing {src.path}", unit="doc", disable=not show_progress)

    def flush() -> None:
        nonlocal total
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            chunks.append(np.asarray(ids + [eos], dtype=np.uint32))
            total += len(ids) + 1
        bar.update(len(batch))
        batch.clear()

    try:
        for doc in iter_documents(src):
            batch.append(doc)
            if len(batch) == 256:
                flush()
                if src.max_tokens and total >= src.max_tokens:
                    break
    except UnicodeDecodeError as e:
        raise TrainConfigError(f"data source {not_utf8(src.path, e)}") from None
    if batch:
        flush()
    bar.close()
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint32)
    if src.max_tokens:
        tokens = tokens[: src.max_tokens]
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, tokens)
    os.replace(tmp, cache)
    return tokens


@dataclass
class Split:
    """One source's packed sequences: rows of seq_len tokens, train then validation."""

    tokens: np.ndarray
    seq_len: int
    n_train: int
    n_val: int

    def row(self, k: int) -> np.ndarray:
        return np.asarray(self.tokens[k * self.seq_len:(k + 1) * self.seq_len], dtype=np.int64)


class Mixture:
    """Sources mixed by weight, addressed by global sample index: sample i of a run is a pure function of
    (seed, i), so the data position of a run is one integer and resume is exact at any world size. Each split
    has ``n_train`` and ``n_val`` rows and ``row(k)``; a subclass says how rows become a batch (``collate``)
    and a batch a loss (``loss``)."""

    def __init__(self, splits: list[Any], weights: list[float], seed: int, total_samples: int):
        self.splits, self.seed = splits, seed
        w = np.array(weights, dtype=np.float64)
        rng = np.random.default_rng([seed, 0xD05])
        self.source_of = rng.choice(len(w), size=total_samples, p=w / w.sum()).astype(np.int32)
        self.rank_in_source = np.zeros(total_samples, dtype=np.int64)
        for s in range(len(w)):
            mask = self.source_of == s
            self.rank_in_source[mask] = np.arange(mask.sum())

    def _permutation(self, s: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, s, epoch]).permutation(self.splits[s].n_train)

    def locate(self, i: int) -> tuple[int, int]:
        """(source, row) of training sample number i of the run (epochs of a source are reshuffled each time)."""
        s = int(self.source_of[i])
        epoch, pos = divmod(int(self.rank_in_source[i]), self.splits[s].n_train)
        return s, int(self._permutation(s, epoch)[pos])

    def sample(self, i: int) -> Any:
        s, k = self.locate(i)
        return self.splits[s].row(k)

    def batch(self, first: int, size: int) -> dict[str, Any]:
        return self.collate([self.sample(i) for i in range(first, first + size)])

    def val_index(self) -> list[tuple[int, int]]:
        """(source, row) of the held-out rows, round-robin over sources, in a fixed order."""
        out: list[tuple[int, int]] = []
        for k in range(max((sp.n_val for sp in self.splits), default=0)):
            out.extend((s, sp.n_train + k) for s, sp in enumerate(self.splits) if k < sp.n_val)
        return out

    def val_rows(self) -> list[Any]:
        return [self.splits[s].row(k) for s, k in self.val_index()]

    def collate(self, rows: list[Any]) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, model, batch: dict[str, Any]):
        """The batch's mean loss: next-token cross-entropy over the tokens whose label is not -100."""
        return model(**batch).loss


class PackedData(Mixture):
    """Text sources, each tokenized once and packed into full rows of seq_len tokens."""

    def __init__(self, cfg: DataConfig, tokenizer, cache_dir: Path, seed: int, total_samples: int,
                 show_progress: bool = True):
        self.cfg, self.eos = cfg, tokenizer.eos_token_id
        splits: list[Split] = []
        for k, src in enumerate(cfg.sources):
            tokens = tokenize_source(src, tokenizer, cache_dir, show_progress)
            n = len(tokens) // cfg.seq_len
            n_val = math.ceil(n * cfg.val_fraction) if cfg.val_fraction > 0 else 0
            if n - n_val < 1:
                raise TrainConfigError(
                    f"data.sources[{k}] ({src.path}) has {len(tokens)} tokens, less than one training sequence "
                    f"of seq_len {cfg.seq_len} after the validation share; add text or lower data.seq_len")
            splits.append(Split(tokens, cfg.seq_len, n - n_val, n_val))
        super().__init__(splits, [src.weight for src in cfg.sources], seed, total_samples)

    def collate(self, rows: list[np.ndarray]) -> dict[str, Any]:
        import torch

        ids = torch.from_numpy(np.stack(rows))
        batch: dict[str, Any] = {"input_ids": ids, "labels": ids.clone()}
        if self.cfg.document_mask:
            batch["position_ids"] = document_position_ids(ids, self.eos)
        return batch


def document_position_ids(ids, eos: int):
    """Positions that restart after every EOS, so transformers masks attention per document."""
    import torch

    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, :-1] == eos
    starts[:, 0] = True
    idx = torch.arange(ids.shape[1]).expand_as(ids)
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last_start
