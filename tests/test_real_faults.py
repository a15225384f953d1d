"""I/O faults planted for real (issue 30): a read-only filesystem and a full one, mounted by the test as tmpfs.

Root ignores permission bits, so only a read-only mount refuses root a write, and only a small filesystem fills
up. Mounting needs the right to mount (CAP_SYS_ADMIN): where the machine refuses it, each test is skipped with the
reason in the report; the same faults injected at the write (tests/test_user_faults.py) run everywhere.
"""

import errno
import shutil
import subprocess
from pathlib import Path

import pytest

from test_user_faults import CORPUS, train_config
from helpers import assert_one_line_error, dus


@pytest.fixture
def mount(tmp_path):
    """mount(name, *options) -> a fresh tmpfs at tmp_path/name, unmounted after the test."""
    points: list[Path] = []

    def make(name: str, *options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no `mount` command here; the injected faults of test_user_faults.py cover this case")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"this machine refuses a tmpfs mount ({done.stderr.strip()}); the injected faults of "
                        "test_user_faults.py cover this case")
        points.append(point)
        return point

    yield make
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_read_only_filesystem_is_one_line_for_plan_upscale_and_eval(tiny_llama, tmp_path, mount, monkeypatch):
    import dus_plugin.eval.run as run

    ro = mount("ro", "ro", "size=1m")
    with pytest.raises(OSError) as e:
        (ro / "probe").write_text("x")
    assert e.value.errno == errno.EROFS  # the fault is real
    assert_one_line_error(dus("plan", tiny_llama, "--drop", 2, "-o", ro / "r.yml"), "read-only", str(ro))
    recipe = tmp_path / "r.yml"
    assert dus("plan", tiny_llama, "--drop", 2, "-o", recipe).exit_code == 0
    assert_one_line_error(dus("upscale", recipe, ro / "out", "-q"), "read-only")
    monkeypatch.setattr(run, "evaluate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("evaluated")))
    held = tmp_path / "held.txt"
    held.write_text(CORPUS.read_text()[:2000])
    assert_one_line_error(dus("eval", tiny_llama, "--text", held, "-q", "-o", ro / "r.json"), "read-only", str(ro))


def test_a_full_filesystem_at_a_checkpoint_leaves_no_partial_checkpoint(tiny_llama, tmp_path, mount):
    full = mount("full", "size=96k")
    cfg = train_config(tmp_path, tiny_llama, max_steps=4, save_every=2, tensorboard=False,
                       output_dir=str(full / "run"))
    assert_one_line_error(dus("train", cfg, "-q"), "could not write checkpoint step-0000002",
                          "No space left on device")
    ckpts = full / "run" / "checkpoints"
    assert not ckpts.exists() or not list(ckpts.iterdir())  # the partial checkpoint is gone
