"""What a person watches: a JSONL log, TensorBoard scalars, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

LOG = logging.getLogger(__name__)


class MetricsLog:
    """Append-only JSONL (trimmed to the resume step), mirrored to TensorBoard when installed."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop rows the run will write again (all of them on a fresh start)
            rows = [r for r in self.rows() if resume_step and r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                LOG.warning("tensorboard is not installed; pip install 'dus-plugin[train]' for TensorBoard scalars")

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_loss(rows: list[dict[str, Any]], path: Path, title: str = "Continued pretraining") -> Path | None:
    """Train and validation loss against tokens seen, and the base model's validation loss as a line when it was
    measured (``baseline_model``); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        LOG.warning("matplotlib is not installed; no loss curve (pip install 'dus-plugin[train]')")
        return None
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", ms=3)
        if val[0][0] == 0:  # eval_on_start: the seam's cost before any update
            ax.annotate(f"step 0: {val[0][1]:.3f}", val[0], textcoords="offset points", xytext=(8, 4), fontsize=8)
    baseline = next((r["baseline_val_loss"] for r in rows if r.get("baseline_val_loss") is not None), None)
    if baseline is not None:  # the base before growing, on the same validation rows: the line to get under
        ax.axhline(baseline, color="gray", ls="--", lw=1, label=f"base model's validation loss ({baseline:.3f})")
    focus = [r["tokens"] for r in rows if r.get("phase") == "focus"]
    if focus:
        ax.axvspan(0, max(focus), color="tab:orange", alpha=0.12, label="seam focus (only chosen layers train)")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val or focus or baseline is not None:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
