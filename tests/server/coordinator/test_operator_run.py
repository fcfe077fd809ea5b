"""`medfed operator run` checks a run's config before anything is sent: an unknown key is
named with the closest known one (Flower's SuperLink answers only "[code: 15] Invalid
run configuration"), a bad value with medfed's own rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfed.server.coordinator import operator_run
from medfed.shared_models.config import ConfigError

REPO = Path(__file__).resolve().parents[3]


def test_a_valid_override_gives_the_runs_whole_config():
    fused = operator_run.checked_config(REPO, "num-server-rounds=3 dp.mode='client'")
    assert fused["num-server-rounds"] == 3 and fused["dp.mode"] == "client"
    assert fused["local-epochs"] == 2  # the app's own default


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ("local-epoch=1", "unknown config key 'local-epoch': did you mean 'local-epochs'?"),
        ("num-server-rounds=-1", "num-server-rounds"),
        ("dp.mode='sometimes'", "dp.mode"),
    ],
)
def test_a_bad_override_is_refused_naming_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named.replace("?", r"\?")):
        operator_run.checked_config(REPO, overrides)


def test_nothing_is_sent_for_a_refused_config(monkeypatch, capsys):
    monkeypatch.setattr(operator_run.subprocess, "run", pytest.fail)  # flwr never called
    options = operator_run.RunOptions(REPO, run_config="local-epoch=1")
    assert operator_run.run(options) == 2
    assert "run config refused: --run-config: unknown config key 'local-epoch'" in (
        capsys.readouterr().err
    )
