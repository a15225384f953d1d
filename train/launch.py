"""`python -m dus_plugin.train.launch [accelerate launch flags] -m dus_plugin.train CONFIG`.

`accelerate launch` itself, except that a failed training process ends the launch with one line (the
process has already printed its own error) instead of the launcher's traceback. `dus run` uses it.
"""

from __future__ import annotations

import logging
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"error: training process {rank} exited with status {failure.exitcode}; its error is printed above",
              file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"error: the training process exited with status {e.returncode}; its error is printed above",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
