"""Real English text, reproducibly: Debian's documentation packages as a corpus for the real-base study.

Domains (each a Debian package; install them first, `apt-get install python3-doc linux-doc git-doc`):
  python  the Python 3 documentation (reStructuredText sources of the HTML build)     trained on + held out
  linux   the Linux kernel's Documentation/ tree (.rst and .txt, gzipped by Debian)    trained on + held out
  git     git's documentation (AsciiDoc .txt sources of its manual pages and guides)   held out only: never trained

Each file is one document, reduced to plain text (markup lines dropped, heading underlines removed),
de-duplicated by its normalised text, and assigned to train or held-out by a hash of its path, so the
split is stable however the package grows. Outputs in OUT:
  train.jsonl                         {"text", "domain"} per training document (python + linux)
  heldout_python.txt, heldout_linux.txt, heldout_git.txt   held-out documents, blank-line separated
  corpus.json                         package versions, document and byte counts, sha256, token counts
  corpus.tar.xz (with --pack)         all of the above, to carry to a machine without network

  python benchmarks/real_corpus.py --out /tmp/real_corpus --tokenizer BASE_DIR --pack
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import tarfile
from pathlib import Path

DOMAINS = {
    "python": {"package": "python3-doc", "roots": ["/usr/share/doc/python3-doc/html/_sources"],
               "suffixes": (".rst.txt",), "train": True},
    "linux": {"package": "linux-doc", "roots": ["/usr/share/doc/linux-doc/Documentation",
                                                "/usr/share/doc/linux-doc-6.1/Documentation"],
              "suffixes": (".rst", ".txt", ".rst.gz", ".txt.gz"), "train": True},
    "git": {"package": "git-doc", "roots": ["/usr/share/doc/git-doc", "/usr/share/doc/git/RelNotes"],
            "suffixes": (".txt", ".txt.gz", ".adoc"), "train": False},
}
HELDOUT_SHARE = 0.05  # of each trained domain's documents
MIN_CHARS = 400  # shorter files are mostly index stubs and lists

_DIRECTIVE = re.compile(r"^\s*(\.\. |:[\w-]+:\s|\[\[|ifdef::|endif::|include::|image::|//)")
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{2,}\s*$")


def plain_text(raw: str) -> str:
    """Markup-light plain text: directive, label and option lines dropped, heading underlines removed."""
    keep = [line.rstrip() for line in raw.splitlines() if not _DIRECTIVE.match(line) and not _UNDERLINE.match(line)]
    text = "\n".join(keep)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def domain_files(spec: dict) -> list[Path]:
    files: set[Path] = set()
    for root in spec["roots"]:
        root_p = Path(root)
        if root_p.is_dir():
            files |= {p.resolve() for p in root_p.rglob("*") if p.is_file() and p.name.endswith(spec["suffixes"])}
    return sorted(files)


def package_version(name: str) -> str | None:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True)
    return proc.stdout.strip() or None


def is_heldout(relpath: str) -> bool:
    return int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < HELDOUT_SHARE


def collect(name: str, spec: dict, seen: set[str]) -> tuple[list[str], list[str]]:
    """(train documents, held-out documents) of one domain, deduplicated against every domain before it."""
    files = domain_files(spec)
    if not files:
        raise SystemExit(f"no files of domain {name!r} under {spec['roots']}; apt-get install {spec['package']}")
    train, held = [], []
    for path in files:
        text = plain_text(_read(path))
        key = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
        if len(text) < MIN_CHARS or key in seen:
            continue
        seen.add(key)
        rel = str(path).split("/doc/", 1)[-1]
        (held if not spec["train"] or is_heldout(rel) else train).append(text)
    return train, held


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def token_count(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0


def build(out: Path, tokenizer_dir: str | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tok = None
    if tokenizer_dir:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    seen: set[str] = set()
    report: dict = {"heldout_share": HELDOUT_SHARE, "min_chars": MIN_CHARS, "domains": {}, "files": {}}
    rows = []
    for name, spec in DOMAINS.items():
        train, held = collect(name, spec, seen)
        rows += [{"text": t, "domain": name} for t in train]
        (out / f"heldout_{name}.txt").write_text("\n\n".join(held), encoding="utf-8")
        entry = {"package": spec["package"], "version": package_version(spec["package"]), "trained": spec["train"],
                 "train_documents": len(train), "heldout_documents": len(held),
                 "train_bytes": sum(len(t.encode()) for t in train), "heldout_bytes": sum(len(t.encode()) for t in held)}
        if tok is not None:
            entry["train_tokens"], entry["heldout_tokens"] = token_count(tok, train), token_count(tok, held)
        report["domains"][name] = entry
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    for p in sorted(out.glob("*.txt")) + [out / "train.jsonl"]:
        report["files"][p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    if tok is not None:
        report["tokenizer"] = tokenizer_dir
        report["train_tokens"] = sum(d.get("train_tokens", 0) for d in report["domains"].values())
    (out / "corpus.json").write_text(json.dumps(report, indent=2))
    return report


def pack(out: Path) -> Path:
    archive = out / "corpus.tar.xz"
    with tarfile.open(archive, "w:xz", preset=6) as tar:
        for p in sorted(out.iterdir()):
            if p.name != archive.name:
                tar.add(p, arcname=p.name)
    return archive


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", help="model folder whose tokenizer counts the tokens (SmolLM2's)")
    ap.add_argument("--pack", action="store_true", help="also write corpus.tar.xz to carry elsewhere")
    args = ap.parse_args()
    report = build(Path(args.out), args.tokenizer)
    if args.pack:
        report["archive"] = str(pack(Path(args.out)))
    print(json.dumps({k: v for k, v in report.items() if k != "files"}, indent=2))


if __name__ == "__main__":
    main()
