"""Secure aggregation and differential privacy in a real simulated federation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import SHOWN

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY = ["--task", "classification", "--sites", "3", "--images-per-site", "24",
        "-c", "image-size=32", "-c", "model-width=4", "-c", "batch-size=8",
        "-c", "federated-stats=false", *SHOWN]  # fmt: skip


def _simulate(out, *extra: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", "simulate", "--out", str(out), *TINY, *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "metrics.json").read_text())


def test_secure_federation_reaches_the_plain_model(tmp_path):
    """Same seeds, one round: only the quantisation of the update may differ.

    (DP and the secure-aggregation metrics run end to end in test_observability.py.)
    """
    plain = _simulate(tmp_path / "plain", "--rounds", "1")
    # the public maximum weight near the sites' sizes (about 20 training images each)
    # keeps the resolution of the weighted sum below float32 rounding (docs/security.md)
    secure = _simulate(
        tmp_path / "secure", "--rounds", "1", "-c", "secure-aggregation=true",
        "-c", "secagg-max-weight=50",
    )  # fmt: skip
    assert secure["config"]["secure-aggregation"] is True
    stages = secure["rounds"][1]["secure-aggregation"]["stage-seconds"]
    assert set(stages) == {"advertise", "share", "upload", "unmask"}
    assert secure["rounds"][1]["replied"] == plain["rounds"][1]["replied"] == [
        "site-0", "site-1", "site-2",
    ]  # fmt: skip
    a = torch.load(tmp_path / "plain" / "global_model.pt", weights_only=True)
    b = torch.load(tmp_path / "secure" / "global_model.pt", weights_only=True)
    floats = [k for k in a if torch.is_floating_point(a[k])]
    assert floats and set(a) == set(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in floats)
    # quantisation step: 16 * 3 / 2**29 / (sum of weights ~ 1.1) = 8e-8 per hospital;
    # float32 rounding adds as much
    assert worst < 1e-6, worst
