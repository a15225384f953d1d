"""Training on a CPU whose cores other work shares: does dus slow down in proportion, or far more?

Side by side in one run, the same short training (`cpt_tiny.yml` on the quickstart's 32-layer base), each timed
alone and beside `--load` busy processes:
  dus train                         the path users run: on a busy machine idle OpenMP threads sleep
                                    (OMP_WAIT_POLICY=PASSIVE), on an idle one they keep OpenMP's default
  the trainer without that setting  what `dus` did before issue 30 (OpenMP's default: idle threads spin first)
Fair sharing of C cores among the training's threads and L busy processes predicts a slowdown of about
(threads + L) / C at most; spinning threads make it far worse.

  python benchmarks/shared_cpu.py --out benchmarks/results/shared_cpu.json [--load 4] [--steps 30]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PLAIN = ("import sys; from dus_plugin.train.config import load_train_config; from dus_plugin.train.loop import train; "
         "train(load_train_config(sys.argv[1]), quiet=True)")


def busy() -> None:
    while True:
        pass


def config(work: Path, steps: int) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "cpt_tiny.yml").read_text())
    cfg.update(model=str(REPO / "dus_plugin" / "quickstart_data" / "base"), max_steps=steps, save_every=0,
               save_final=False, export=False, tensorboard=False, eval_every=0, seam={"focus": "none"})
    cfg["data"]["sources"] = [{"path": str(REPO / "dus_plugin" / "quickstart_data" / "train.txt")}]
    cfg["data"]["cache_dir"] = str(work / "cache")
    path = work / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def timed(cmd: list[str], cfg: Path, work: Path, env: dict) -> float:
    out = work / f"run-{time.monotonic_ns()}"
    text = cfg.read_text().replace(f"output_dir: {yaml.safe_load(cfg.read_text())['output_dir']}", f"output_dir: {out}")
    run_cfg = work / f"{out.name}.yml"
    run_cfg.write_text(text)
    t0 = time.perf_counter()
    subprocess.run(cmd + [str(run_cfg)], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--load", type=int, default=4, help="busy processes beside the training")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dus-shared-cpu-"))
    cfg = config(work, args.steps)
    base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "TOKENIZERS_PARALLELISM")}
    paths = {"dus train": [sys.executable, "-m", "dus_plugin.cli", "train", "-q"],
             "trainer without the setting": [sys.executable, "-c", PLAIN]}
    timed(paths["dus train"], cfg, work, base_env)  # tokenize once, warm the file cache
    rows = {}
    for load in (0, args.load):
        workers = [mp.Process(target=busy, daemon=True) for _ in range(load)]
        for w in workers:
            w.start()
        time.sleep(1)
        for name, cmd in paths.items():
            rows.setdefault(name, {})[f"load {load}"] = timed(cmd, cfg, work, base_env)
        for w in workers:
            w.terminate()
    for r in rows.values():
        r["slowdown"] = r[f"load {args.load}"] / r["load 0"]
    report = {"machine": f"{platform.node()} ({os.cpu_count()} cores)", "date": dt.date.today().isoformat(),
              "steps": args.steps, "busy_processes": args.load, "seconds": rows,
              "fair_share_slowdown_at_most": (os.cpu_count() + args.load) / os.cpu_count()}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
