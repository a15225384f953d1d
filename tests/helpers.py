"""Small helpers shared by tests: run the CLI in-process and read a model folder's tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from dus_plugin.cli import main


def free_port() -> str:
    """A TCP port nothing listens on now: a host that cannot be reached, or a port of its own for each
    `accelerate launch` of the suite (tests run in parallel, and two launches on accelerate's default 29500 would
    meet)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def dus(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def dus_ok(*args: str) -> Result:
    """Run the CLI and require success: a fixture built through the CLI never continues on a failure."""
    result = dus(*args)
    assert result.exit_code == 0, f"dus {' '.join(map(str, args))} exited {result.exit_code}: {result.output}"
    return result


def assert_one_line_error(result: Result, *needles: str) -> str:
    """Exit != 0, stderr is one `error: ...` line, no traceback, and it mentions every needle."""
    assert result.exit_code != 0, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def ctrl_c_after_checkpoint(args: list[str], checkpoints: Path, wait_s: float = 300) -> list[str]:
    """Run `dus ARGS` in its own process, send SIGINT (what Ctrl-C in the terminal sends) once a checkpoint is in
    CHECKPOINTS, require exit status 130, and return the non-empty lines it wrote to stderr."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    # stderr goes to a file: a pipe that nobody reads while we wait fills and stalls the child
    with tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "dus_plugin.cli", *args], stdout=subprocess.DEVNULL,
                                stderr=err_file, text=True, start_new_session=True, preexec_fn=_sigint_default,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + wait_s
        while not list(checkpoints.glob("step-*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            state = _process_state(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)  # never leave a training process behind to slow later tests
            proc.wait()
            raise AssertionError(f"dus {args[0]} did not stop within 120 s of SIGINT: {state}") from None
        err_file.seek(0)
        err = err_file.read()
    assert proc.returncode == 130, err
    return [line for line in err.splitlines() if line.strip()]


def _sigint_default() -> None:
    """In the child: SIGINT as a terminal delivers it. A test run started in the background of a non-interactive
    shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _process_state(pid: int) -> str:
    """What a stuck process is doing (Linux /proc), for the failure message."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
        tasks = sorted(p.name for p in Path(f"/proc/{pid}/task").iterdir())
    except OSError as e:
        return f"unreadable ({e})"
    fields = ("State", "Threads", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")
    keep = [line for line in status if line.split(":")[0] in fields]
    return f"{'; '.join(keep)}; wchan={wchan}; tasks={tasks}"
