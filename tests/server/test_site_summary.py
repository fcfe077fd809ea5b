"""The coordinator's view of the sites' summaries: suppressed counts shown as "<N", with
the minimum each site applied."""

from __future__ import annotations

from medfed.server.site_summary import format_summaries
from medfed.shared_models.protocol import SUPPRESSED, Statistic


def summary(num_train, labels, histogram):
    return {
        Statistic.NUM_TRAIN: num_train,
        Statistic.NUM_VAL: 4,
        Statistic.LABEL_HISTOGRAM: labels,
        Statistic.INTENSITY_P1: 0.01,
        Statistic.INTENSITY_P99: 0.97,
        Statistic.INTENSITY_HISTOGRAM: histogram,
    }


def test_suppressed_counts_and_histograms_are_shown_as_such():
    table = format_summaries(
        {
            "site-a": summary(40, [20, SUPPRESSED, 12], [0.5, 0.25, 0.25, 0.0]),
            "site-b": summary(SUPPRESSED, [SUPPRESSED] * 3, [float(SUPPRESSED)] * 4),
            "site-c": {
                **summary(SUPPRESSED, [25, 30, SUPPRESSED], [0.5] * 4),
                Statistic.MIN_COUNT: 25,
            },  # its own floor is above the ask
        },
        ["normal", "pneumonia", "covid"],
        min_count=10,
    )
    rows = {line.split()[0]: line for line in table[2:]}
    assert rows["site-a"].split()[1:6] == ["40", "4", "20", "<10", "12"]
    assert "(suppressed)" not in rows["site-a"] and "█" in rows["site-a"]
    assert rows["site-b"].split()[1:6] == ["<10", "4", "<10", "<10", "<10"]
    assert rows["site-b"].endswith("(suppressed)")
    assert rows["site-c"].split()[1:6] == ["<25", "4", "25", "30", "<25"]
