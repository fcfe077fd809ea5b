"""The coordinator's view of the sites' summaries: hidden counts shown as "hidden" (never as
a bound such as "<10", which is false for a count hidden only to protect another), beside
the minimum each site applied."""

from __future__ import annotations

from medfed.server.run.federated_statistics import format_summaries
from medfed.server.run.hidden_counts import HIDDEN
from medfed.shared_models.protocol import Statistic


def summary(num_train, labels, histogram, minimum=10):
    return {
        Statistic.NUM_TRAIN: num_train,
        Statistic.NUM_VAL: num_train,
        Statistic.LABEL_HISTOGRAM: labels,
        Statistic.INTENSITY_P1: 0.01,
        Statistic.INTENSITY_P99: 0.97,
        Statistic.INTENSITY_HISTOGRAM: histogram,
        Statistic.MIN_COUNT: minimum,
    }


def test_hidden_counts_and_histograms_are_shown_as_such():
    table = format_summaries(
        {
            "site-a": summary(40, [20, HIDDEN, HIDDEN], [0.5, 0.25, 0.25, 0.0]),
            "site-b": summary(HIDDEN, [HIDDEN] * 3, [HIDDEN] * 4),
            "site-c": summary(30, [25, 30, 5], [0.5] * 4, minimum=5),
        },
        ["normal", "pneumonia", "covid"],
    )
    rows = {line.split()[0]: line for line in table[2:]}
    assert rows["site-a"].split()[1:7] == ["10", "40", "40", "20", "hidden", "hidden"]
    assert "█" in rows["site-a"]
    assert rows["site-b"].split()[1:7] == ["10", "hidden", "hidden", "hidden", "hidden", "hidden"]
    assert rows["site-b"].endswith("  hidden")
    assert rows["site-c"].split()[1:7] == ["5", "30", "30", "25", "30", "5"]
    assert not any("<" in line for line in table), "no bound: a hidden count may be above it"
