"""docs/architecture.md's round walks are counted: each lists exactly the modules a traced
round runs (tests/round_walk.py), and a plain round's coordinator runs at most 12 core."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.round_walk import core, described, walk_round

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def documented(walk: str) -> str:
    """The block under `<!-- walk: NAME -->` in docs/architecture.md."""
    found = re.search(rf"<!-- walk: {walk} -->\n```\n(.*?)\n```", ARCHITECTURE.read_text(), re.S)
    assert found, f"docs/architecture.md has no walk '{walk}'"
    return found.group(1)


@pytest.fixture(scope="module")
def walks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[str]]]:
    return {
        walk: walk_round(tmp_path_factory.mktemp(walk), secure=walk == "secure")
        for walk in ("plain", "secure")
    }


@pytest.mark.parametrize("walk", ["plain", "secure"])
def test_the_documented_walk_is_the_traced_round(walks, walk):
    assert documented(walk) == described(walks[walk]), (
        f"regenerate with `python -m tests.round_walk{' --secure' if walk == 'secure' else ''}`"
    )


def test_a_plain_rounds_coordinator_runs_at_most_twelve_core_modules(walks):
    assert len(core(walks["plain"]["coordinator"])) <= 12


def test_the_walk_sees_both_sides_and_the_secure_steps(walks):
    """The trace sees what it claims to: the hospital's handler and the coordinator's
    aggregation, and SecAgg+ on both sides only in a secure round."""
    plain, secure = walks["plain"], walks["secure"]
    assert "client/handlers.py" in plain["hospital"]
    assert "server/run/round_loop.py" in plain["coordinator"]
    assert "server/secagg/workflow.py" not in plain["coordinator"]
    assert "server/secagg/workflow.py" in secure["coordinator"]
    assert "client/privacy/secagg_hospital.py" in secure["hospital"]
