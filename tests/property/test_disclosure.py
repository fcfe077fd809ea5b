"""Every count a site sends obeys its floor, including those derived from a hidden one.

Sites are drawn (sizes, splits, label histograms of either kind, skipped files,
GAN ratios, DP, the floor set by the node or raised by the run) and their
replies built as the real handlers build them, then passed through the real
ClientApp mods. Three properties:

- with the floor above the site's size, every count-like value of every reply
  kind is the same for every such site: nothing the coordinator receives
  depends on the hidden counts;
- for any site and floor, a count that is shown is the exact one and clears
  the floor (a weight that is no count is the floor, or 1 under DP);
- no hidden count is pinned by what is shown and the public rules (the split
  rule, histograms adding up to the images, the background cell being the
  images): over every small site, each hidden count takes at least two values
  among the sites that disclose exactly the same.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import product

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod.utils import make_ffn
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from hypothesis import given
from hypothesis import strategies as st

from medfed.client.app import EVALUATE_MODS, QUERY_MODS, TRAIN_MODS
from medfed.client.data.split import validation_count
from medfed.client.privacy.disclosure import SiteCounts, decide, largest_hidden_train, remember
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import (
    SUPPRESSED,
    Config,
    Metric,
    NodeConfig,
    Record,
    SiteKey,
    Statistic,
)
from tests.client.test_privacy_mods import RUN_ID, incoming
from tests.property.strategies import FAST

EPOCHS = 2
SECONDS = 2.0
VAL_FRACTION = 0.2  # the run's public split rule (client/data/site.py carve_validation)
# What a site sends that is no count: image statistics and losses. The training time is
# the same for every drawn site here; as a side channel it is out of scope (docs/security.md).
NOT_COUNTS = {Statistic.INTENSITY_P1, Statistic.INTENSITY_P99, Metric.TRAIN_SECONDS}
NOT_COUNTS |= {Statistic.MIN_COUNT}


@dataclass(frozen=True)
class Site:
    """One hospital's exact numbers, and what its run makes public about it."""

    counts: SiteCounts
    skipped: int
    intensity: tuple[float, ...]
    gan_ratio: float  # public: the run's `gan-augment-ratio`
    dp: bool  # public: the run's DP mode


@dataclass(frozen=True)
class Floor:
    """The site's floor, set by the node or raised by the run; what the coordinator asks."""

    value: int
    by_run: bool
    asked: int

    def context(self, dp: bool) -> Context:
        run = {"stats-min-count": self.value if self.by_run else 1}
        run["dp.mode"] = "client" if dp else "off"
        node = {NodeConfig.MIN_COUNT: 1 if self.by_run else self.value}
        return Context(RUN_ID, 5, node, RecordDict(), RunConfig.from_mapping(run).to_mapping())


def histogram_of(images: int, presence: bool, cells: tuple[int, int]) -> tuple[int, ...]:
    """Images in which each class appears (the background in every one), or images per
    class adding up to `images`, from two draws in 0..images."""
    if presence:
        return (images, *cells)
    low, high = sorted(cells)
    return (low, high - low, images - high)


@st.composite
def sites(draw, max_images: int, floor: int, public: tuple[bool, float, bool]) -> Site:
    presence, gan_ratio, dp = public
    images = draw(st.integers(2, max_images))
    val = draw(st.integers(1, images - 1))
    cells = draw(st.tuples(st.integers(0, images), st.integers(0, images)))
    skipped = draw(st.sampled_from([0, draw(st.integers(1, max(1, floor - 1)))]))
    intensity = tuple(draw(st.lists(st.floats(0, 1), min_size=4, max_size=4)))
    counts = SiteCounts(images - val, val, histogram_of(images, presence, cells), presence)
    return Site(counts, skipped, intensity, gan_ratio, dp)


publics = st.tuples(st.booleans(), st.sampled_from([0.0, 0.5, 100.0]), st.booleans())


def handlers(site: Site) -> dict[str, Callable[[Message, Context], Message]]:
    """The query, train and evaluate replies for `site` as the real handlers build them
    (client/handlers.py), each handler stating the site's counts to the filters."""
    counts = site.counts

    def reply(metrics: dict) -> Callable[[Message, Context], Message]:
        def handler(msg: Message, ctx: Context) -> Message:
            remember(ctx, counts)
            content = RecordDict({Record.METRICS: MetricRecord(metrics)})
            content[Record.SITE] = ConfigRecord({SiteKey.NAME: "site-x"})
            if Record.ARRAYS in msg.content.array_records:  # trained: the model moved
                moved = {k: a.numpy() + 0.1 for k, a in msg.content[Record.ARRAYS].items()}
                content[Record.ARRAYS] = ArrayRecord({k: Array(v) for k, v in moved.items()})
            return Message(content, reply_to=msg)

        return handler

    return {
        "query": reply({
            Statistic.NUM_TRAIN: counts.train, Statistic.NUM_VAL: counts.val,
            Statistic.LABEL_HISTOGRAM: list(counts.histogram),
            Statistic.INTENSITY_P1: site.intensity[0], Statistic.INTENSITY_P99: site.intensity[1],
            Statistic.INTENSITY_HISTOGRAM: list(site.intensity),
        }),
        "train": reply({
            # a mean over the site's images: a fraction whose denominator is its count
            Metric.TRAIN_LOSS: 1 / counts.train, Metric.TRAIN_SECONDS: SECONDS,
            Metric.IMAGES_PER_SECOND: counts.train * EPOCHS / SECONDS,
            Metric.NUM_EXAMPLES: counts.train,
            Metric.GENERATED_IMAGES: round(site.gan_ratio * counts.train),
            Metric.WEIGHT: 1.0 if site.dp else float(counts.train),
            Metric.SKIPPED_FILES: site.skipped,
        }),
        "evaluate": reply({
            Metric.LOSS: 1 / counts.val, "accuracy": (counts.val // 2) / counts.val,
            Metric.NUM_EXAMPLES: counts.val, Metric.WEIGHT: counts.val,
            Metric.SKIPPED_FILES: site.skipped,
        }),
    }  # fmt: skip


MODS = {"query": QUERY_MODS, "train": TRAIN_MODS, "evaluate": EVALUATE_MODS}


def sent(site: Site, floor: Floor) -> dict[str, dict]:
    """The count-like values of every reply kind the coordinator receives from `site`."""
    model = {"w": np.zeros(3, np.float32)}
    clipping = {KEY_CLIPPING_NORM: RunConfig().dp_clipping_norm} if site.dp else {}
    requests = {
        "query": incoming("query", {Config.STATS_MIN_COUNT: floor.asked}),
        # under DP, Flower's wrapper sends the run's clipping norm with the round
        "train": incoming("train", {Config.SERVER_ROUND: 1, **clipping}, model),
        "evaluate": incoming("evaluate", {Config.SERVER_ROUND: 1}, model),
    }
    received = {}
    for kind, handler in handlers(site).items():
        reply = make_ffn(handler, MODS[kind])(requests[kind], floor.context(site.dp))
        metrics = reply.content[Record.METRICS]
        received[kind] = {k: v for k, v in metrics.items() if k not in NOT_COUNTS}
    return received


@st.composite
def floors(draw, smallest: int = 2) -> Floor:
    value = draw(st.integers(smallest, 200))
    return Floor(value, draw(st.booleans()), draw(st.integers(1, value)))


@FAST
@given(data=st.data(), floor=floors(smallest=3), public=publics)
def test_nothing_a_site_sends_depends_on_counts_below_its_floor(data, floor, public):
    """Two sites smaller than the floor, alike only in what is public (task, GAN ratio, DP)
    and in whether they skipped files at all: the coordinator receives the same."""
    first = data.draw(sites(floor.value - 1, floor.value, public))
    second = data.draw(sites(floor.value - 1, floor.value, public))
    if (first.skipped == 0) != (second.skipped == 0):  # none skipped is no hidden count
        second = replace(second, skipped=first.skipped)
    assert sent(first, floor) == sent(second, floor)


@FAST
@given(data=st.data(), floor=floors(), public=publics)
def test_a_shown_count_is_exact_and_clears_the_floor(data, floor, public):
    site = data.draw(sites(3 * floor.value, floor.value, public))
    received = sent(site, floor)
    counts = site.counts
    exact = {
        "query": {Statistic.NUM_TRAIN: counts.train, Statistic.NUM_VAL: counts.val},
        "train": {Metric.NUM_EXAMPLES: counts.train, Metric.SKIPPED_FILES: site.skipped,
                  Metric.GENERATED_IMAGES: round(site.gan_ratio * counts.train)},
        "evaluate": {Metric.NUM_EXAMPLES: counts.val, Metric.SKIPPED_FILES: site.skipped},
    }  # fmt: skip
    for kind, values in exact.items():
        for key, true in values.items():
            shown = received[kind][key]
            assert shown == SUPPRESSED or (shown == true and (true == 0 or true >= floor.value))
    cells = received["query"][Statistic.LABEL_HISTOGRAM]
    assert all(c in (SUPPRESSED, t) and (c == SUPPRESSED or t >= floor.value)
               for c, t in zip(cells, counts.histogram, strict=True))  # fmt: skip
    split_shown = received["train"][Metric.NUM_EXAMPLES] != SUPPRESSED
    assert (received["evaluate"][Metric.NUM_EXAMPLES] != SUPPRESSED) is split_shown
    assert (received["query"][Statistic.NUM_TRAIN] != SUPPRESSED) is split_shown, "one decision"
    assert received["evaluate"][Metric.WEIGHT] == (counts.val if split_shown else floor.value)
    weight = 1.0 if site.dp else counts.train if split_shown else floor.value
    assert received["train"][Metric.WEIGHT] == weight
    assert (received["train"][Metric.IMAGES_PER_SECOND] == SUPPRESSED) is not split_shown


def carved_val(images: int) -> int:
    """The validation count the public split rule gives `images` (carve_validation)."""
    return min(images - 1, max(1, round(images * VAL_FRACTION)))


def every_small_site(largest: int, presence: bool):
    """Every site of 2..largest images split by the public rule, with every histogram."""
    for images in range(2, largest + 1):
        val = carved_val(images)
        for cells in product(range(images + 1), repeat=2):
            if presence or cells[0] <= cells[1]:
                histogram = histogram_of(images, presence, cells)
                yield SiteCounts(images - val, val, histogram, presence)


def test_no_hidden_count_is_pinned_by_the_shown_ones_and_the_public_rules():
    """An attacker who knows the decision's rules and the split rule groups every site by
    what it discloses: within a group, each hidden count must still take two values or
    more. (What the train and evaluate replies add is a function of the same disclosure:
    the properties above.) A floor of 2 is left out: a site always validates on at least
    one image, so any val count hidden under 2 is 1, whatever the rules."""
    for floor, presence in product((3, 5, 10), (False, True)):
        groups: dict[tuple, list[SiteCounts]] = defaultdict(list)
        for counts in every_small_site(30, presence):
            shown = decide(counts, floor)
            groups[(shown.train, shown.val, shown.histogram)].append(counts)
        for (train, val, histogram), members in groups.items():
            hidden = [i for i, c in enumerate((train, val, *histogram)) if c == SUPPRESSED]
            for i in hidden:
                values = {(m.train, m.val, *m.histogram)[i] for m in members}
                assert len(values) >= 2, (floor, presence, members[0], i)


@FAST
@given(floor=st.integers(2, 60), val_fraction=st.sampled_from([0.05, 0.2, 0.5, 0.8, 0.95]))
def test_a_hidden_sites_epoch_is_the_most_a_hidden_site_can_train_on(floor, val_fraction):
    """`largest_hidden_train` is exactly the largest train count of any site whose split is
    hidden under the public split rule (so no hidden site trains on fewer draws than it
    has, and all train on the same number)."""
    hidden_trains = []
    for images in range(2, 4000):
        val = validation_count(images, val_fraction)
        if min(images - val, val) < floor:
            hidden_trains.append(images - val)
    assert largest_hidden_train(floor, val_fraction) == max([floor - 1, *hidden_trains])
