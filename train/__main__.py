"""`python -m dus_plugin.train CONFIG [--resume]`, the entry point for `accelerate launch`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from dus_plugin.errors import DusError, Interrupted
from dus_plugin.logs import silence_benign
from dus_plugin.threads import share_cpus_politely


def main(argv: list[str] | None = None) -> int:
    share_cpus_politely()
    parser = argparse.ArgumentParser(prog="python -m dus_plugin.train", description="Continued pretraining of a DUS model.")
    parser.add_argument("config", help="training YAML (see configs/cpt_tiny.yml)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output folder that has checkpoints (removes them)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="stop after step N with a checkpoint (resume later with --resume)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    silence_benign()
    from dus_plugin.train.config import TrainConfigError, load_train_config
    from dus_plugin.train.loop import train

    try:
        result = train(load_train_config(args.config), resume=args.resume, quiet=args.quiet,
                       stop_after=args.stop_after, overwrite=args.overwrite)
    except DusError as e:
        if not (isinstance(e, TrainConfigError) and int(os.environ.get("RANK", "0")) > 0):  # the same on every rank
            flags = {"resume": "--resume", "overwrite": "--overwrite", "stop_after": "--stop-after"}
            print(f"{'interrupted' if isinstance(e, Interrupted) else 'error'}: {e.naming(flags)}", file=sys.stderr)
        return 130 if isinstance(e, Interrupted) else 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
