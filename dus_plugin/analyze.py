"""Choosing m from the base itself: angular distances between hidden states (Gromov et al., 2024).

d(i, k) = arccos(cos(h_i, h_{i+k})) / pi, averaged over the tokens of a text sample, where h_i is
the hidden state entering layer i. For DUS the seam feeds h_{n-m} (the output of the first copy)
into layer m of the second copy, which was trained to receive h_m; the seam's mismatch for an
overlap m is therefore d(m, n - 2m). A small mismatch is what continued pretraining has to heal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from dus_plugin.errors import AnalyzeError


SCOPE = ("the relative seam cost ranks the loss right after upscaling. What it says about the end depends on the "
         "base: on a well-trained base (docs/real_growth.md, SmolLM2-135M) the seam decided the end too; on an "
         "undertrained one (docs/reproduction.md, 27.8M) every m was back at the base's loss within 1.3M tokens and "
         "depth decided")
AFTER_TRAINING = ("with plain copies (--method solar) on a well-trained base, take this m: on SmolLM2-135M the "
                  "recommended m = 11 ended 0.012-0.013 nats ahead of m = 7 and 0.020-0.028 ahead of m = 4 after 20M "
                  "tokens (docs/real_growth.md). On an undertrained base choose m by the size you want (there m = 4 "
                  "ended best). With --method identity there is no seam to pay")


@dataclass
class Analysis:
    n: int
    distances: list[list[float | None]]
    """distances[i][k-1] = d(i, k) for k = 1 .. n - i; None past the top."""
    seam_cost: dict[int, float]
    """m -> d(m, n - 2m) for 1 <= m < n/2 (see recommend() for why it is compared relatively)."""
    relative_cost: dict[int, float]
    """m -> seam cost over the mean distance of jumps of the same size (what the recommendation ranks)."""
    recommended_m: int
    """The m with the lowest relative seam cost in the searched range: the best start, not the best end."""
    reason: str
    tokens: int
    after_training: str = AFTER_TRAINING
    """What the measured ablation says about m for the end result, a separate recommendation."""
    searched: tuple[int, int] = (1, 1)
    """The range of m the step-0 recommendation was chosen from."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"n": self.n, "tokens": self.tokens, "seam_cost": self.seam_cost, "relative_cost": self.relative_cost,
                "recommended_m": self.recommended_m,
                "reason": self.reason, "after_training": self.after_training, "searched": list(self.searched),
                "notes": self.notes, "distances": self.distances}


def angular_distances(hidden: list, mask=None) -> list[list[float | None]]:
    """Mean angular distance between every pair of hidden states (list of [batch, seq, d] tensors)."""
    import torch

    n = len(hidden) - 1
    flat = [h.float().reshape(-1, h.shape[-1]) for h in hidden]
    if mask is not None:
        keep = mask.reshape(-1).bool()
        flat = [h[keep] for h in flat]
    unit = [torch.nn.functional.normalize(h, dim=-1) for h in flat]
    out: list[list[float | None]] = []
    for i in range(n):
        row: list[float | None] = []
        for k in range(1, n + 1):
            if i + k > n:
                row.append(None)
                continue
            cos = (unit[i] * unit[i + k]).sum(-1).clamp(-1, 1)
            row.append((torch.arccos(cos) / math.pi).mean().item())
        out.append(row)
    return out


def recommend(n: int, distances: list[list[float | None]]) -> tuple[dict[int, float], dict[int, float], int, str]:
    """Seam cost per m, and the m to use.

    The raw seam cost d(m, n - 2m) shrinks with the gap n - 2m, so taken alone it would always favour
    the largest m. What tells one m from another is how unusual the seam's jump is for its size:
    relative cost = d(m, n - 2m) / (mean over i of d(i, n - 2m)). Below 1, the base's layer m
    already sees states close to what the first copy hands it. Recommended: the lowest relative
    cost for m in [n/8, 3n/8], the range around the paper's n/4 (ties go to the m nearest n/4).
    """
    cost = {m: distances[m][n - 2 * m - 1] for m in range(1, (n + 1) // 2) if n - 2 * m >= 1}
    relative = {}
    for m, c in cost.items():
        same_size = [row[n - 2 * m - 1] for row in distances if row[n - 2 * m - 1] is not None]
        relative[m] = c / (sum(same_size) / len(same_size)) if same_size and sum(same_size) > 0 else 1.0
    lo, hi = max(1, n // 8), max(1, (3 * n) // 8)
    window = [m for m in cost if lo <= m <= hi] or list(cost)
    m = min(window, key=lambda k: (round(relative[k], 6), abs(k - n / 4)))
    reason = (f"relative seam cost {relative[m]:.3f} (seam jump d = {cost[m]:.3f} over the mean jump of the same size) "
              f"is the lowest for m in {min(window)}..{max(window)}; s = {2 * (n - m)} layers"
              + (f"; the paper's m = {n // 4} scores {relative[n // 4]:.3f}" if n // 4 in relative else ""))
    return cost, relative, m, reason
def analyze(model_dir: str | Path, texts: list[str], max_length: int = 512, max_windows: int = 16,
            progress: bool = True) -> Analysis:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dus_plugin.io import model_folder_problem

    path = Path(model_dir)
    if problem := model_folder_problem(path):
        raise AnalyzeError(f"{problem}; pass the base's folder")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if len(ids) < 2:
        raise AnalyzeError("the text sample has fewer than 2 tokens; give more text in `texts`", setting="texts")
    windows = [ids[k:k + max_length] for k in range(0, len(ids), max_length)][:max_windows]
    totals: list[list[float | None]] | None = None
    for w in tqdm(windows, desc="Hidden states", disable=not progress):
        with torch.no_grad():
            hs = model(input_ids=w[None], output_hidden_states=True, use_cache=False).hidden_states
        d = angular_distances(list(hs))
        weight = len(w)
        totals = [[None if v is None else v * weight + (0 if totals is None else totals[i][j])
                   for j, v in enumerate(row)] for i, row in enumerate(d)]
    n_tok = sum(len(w) for w in windows)
    dist = [[None if v is None else v / n_tok for v in row] for row in totals or []]
    n = model.config.num_hidden_layers
    cost, relative, m, reason = recommend(n, dist)
    return Analysis(n, dist, cost, relative, m, reason, n_tok, notes=[SCOPE],
                    searched=(max(1, n // 8), max(1, (3 * n) // 8)))


def heatmap(a: Analysis, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[np.nan if v is None else v for v in row] for row in a.distances]).T  # [k-1, i]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xlabel("layer i (hidden state entering it)")
    ax.set_ylabel("block size k")
    ax.set_yticks(range(0, a.n, max(1, a.n // 8)), [str(k + 1) for k in range(0, a.n, max(1, a.n // 8))])
    ax.set_title("angular distance d(h_i, h_i+k)")
    fig.colorbar(im, ax=ax, label="angular distance (0 = same direction, 1 = opposite)")
    ms = sorted(a.seam_cost)
    ax2.plot(ms, [a.seam_cost[m] for m in ms], "o-", label="seam jump d(h_m, h_(n-m))")
    ax2.plot(ms, [a.relative_cost[m] for m in ms], "s-", label="relative to jumps of the same size")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.axvspan(a.searched[0] - 0.5, a.searched[1] + 0.5, color="tab:red", alpha=0.08,
                label=f"searched m = {a.searched[0]}..{a.searched[1]}")
    ax2.axvline(a.recommended_m, color="tab:red", ls="--", label=f"lowest step-0 seam cost: m = {a.recommended_m}")
    ax2.set_xlabel("overlap m")
    ax2.set_title("DUS seam mismatch")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
