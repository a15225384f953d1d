"""`dus analyze`: angular distances between hidden states and the overlap recommendation."""

import json
import math

import pytest
import torch

from dus_plugin.analyze import angular_distances, recommend

from conftest import REPO
from helpers import dus


def test_angular_distance_definition():
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    b = torch.tensor([[[0.0, 3.0], [0.0, 1.0]]])  # 90 degrees, then 0 degrees
    c = torch.tensor([[[-1.0, 0.0], [0.0, -1.0]]])  # 180 degrees from a
    d = angular_distances([a, b, c])
    assert d[0][0] == pytest.approx(0.25)  # mean of 0.5 and 0
    assert d[0][1] == pytest.approx(1.0)
    assert d[1][0] == pytest.approx((0.5 + 1.0) / 2)
    assert d[1][1] is None


def test_recommendation_compares_the_seam_with_jumps_of_its_size():
    n = 16
    # distance grows with the gap only: d(i, k) = k / n. The raw seam cost falls as m grows, but no m is
    # special, so the recommendation stays at the paper's n/4.
    dist = [[(k / n if i + k <= n else None) for k in range(1, n + 1)] for i in range(n)]
    cost, relative, m, reason = recommend(n, dist)
    assert all(r == pytest.approx(1.0) for r in relative.values())
    assert cost[4] == pytest.approx((n - 8) / n)
    assert m == 4 and "s = 24 layers" in reason
    # make the pair (h_5, h_11) unusually close: m = 5 becomes the cheap seam
    dist[5][11 - 5 - 1] = 0.1
    _, relative, m, reason = recommend(n, dist)
    assert relative[5] < 1
    assert m == 5 and "s = 22 layers" in reason


def test_dus_analyze_on_a_tiny_model(tiny_models, tmp_path):
    out = tmp_path / "a.png"
    r = dus("analyze", tiny_models["llama"], "--text", REPO / "data" / "tiny_corpus.txt", "--max-length", 64,
            "--windows", 3, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    data = json.loads(out.with_suffix(".json").read_text())
    n = data["n"]
    assert n == 8 and len(data["distances"]) == n and data["tokens"] == 192
    assert all(0 <= v <= 1 for row in data["distances"] for v in row if v is not None)
    assert 1 <= data["recommended_m"] < n / 2 and f"m = {data['recommended_m']}" in r.output
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "note: the relative seam cost ranks the loss right after upscaling" in r.output
    # issue 16: the step-0 pick and the advice for the end result are two named, separate statements
    assert "lowest seam cost right after upscaling: m =" in r.output
    assert "for the model after continued pretraining: with plain copies (--method solar) on a well-trained base, take this m" in r.output
    assert "recommended overlap" not in r.output
    assert data["notes"] and "real_growth.md" in data["notes"][0] and "reproduction.md" in data["notes"][0]
    m = data["recommended_m"]
    assert math.isclose(data["seam_cost"][str(m)], data["distances"][m][n - 2 * m - 1])
