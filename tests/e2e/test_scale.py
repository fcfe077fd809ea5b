"""The scale benchmark, reduced (3 and 6 hospitals, 2 rounds): every size completes with
every hospital in every round, and its row is complete and finite. Values are not
asserted (no timing asserts in tests); tests/bench/scale.py records them."""

from __future__ import annotations

import math

import pytest

from tests.bench.scale import measure, table

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_the_scale_table_is_complete_and_finite(tmp_path):
    rows = [measure(n, rounds=2, images_per_site=12, out=tmp_path / str(n)) for n in (3, 6)]
    for sites, row in zip((3, 6), rows, strict=True):
        assert "error" not in row, row
        assert row["replied"] == sites
        numbers = [v for k, v in row.items() if k not in ("sites", "replied")]
        assert all(math.isfinite(v) and v > 0 for v in numbers), row
    # more hospitals, more work: the images counted per round follow the sites
    assert rows[1]["images_per_round"] > rows[0]["images_per_round"]
    # the process tree was measured, not just the launcher (Ray and torch take > 0.5 GiB)
    assert all(row["peak_gib"] > 0.5 for row in rows)
    lines = table(rows).splitlines()
    assert len(lines) == 4 and "failed" not in table(rows)
