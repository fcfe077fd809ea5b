"""The site's one decision about which of its counts the coordinator may see.

A site's counts are linked, so hiding each small one on its own is not
enough: train + val = the images; the split rule is public
(`carve_validation`: the val count is a function of the images), so the
train count alone pins the total and the val count; a classification
histogram adds up to the images and a segmentation histogram's background
cell (images in which the background appears) is the images; generated
images = round(ratio x train); the clear aggregation weight is the train
count; images per second x seconds = train x epochs. A count hidden in one
reply and shown (or derivable) in another is not hidden.

So the decision is made once, from the exact counts and the floor, and every
reply kind (query, train, evaluate) is written from it (`filters`):

- the split is shown only when train and val are both at or above the
  floor. Otherwise every image count is hidden — train, val, every histogram
  cell, generated images, images per second — and so is the intensity
  histogram; a count weight becomes the floor, a public constant.
- with the split shown, a histogram cell below the floor is hidden; where
  the cells add up to the images, with complementary suppression
  (`hide_small`); where they count images in which a class appears
  (segmentation), also a cell whose complement (images without that class)
  is a small non-zero count.
- skipped files and generated images are hidden when below the floor
  (`small`); skipped files are a count of their own, linked to none of these.

The exact counts reach the filters through the node's own context state
(`remember` / `recall`), which stays on the node: they are never put in a reply.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Context, MetricRecord

from medfed.shared_models.protocol import SUPPRESSED

# Where a handler leaves its site's exact counts for the filters (the node's own state).
STATE_KEY = "medfed.site-counts"


@dataclass(frozen=True)
class SiteCounts:
    """A site's exact image counts: its split and, for a statistics query, its label histogram."""

    train: int
    val: int
    histogram: tuple[int, ...] = ()
    presence: bool = False  # cells count images in which each class appears (segmentation)


@dataclass(frozen=True)
class Disclosure:
    """What the coordinator may see of one site's counts (SUPPRESSED where hidden)."""

    floor: int
    split_shown: bool
    train: int
    val: int
    histogram: tuple[int, ...]

    @classmethod
    def hiding_everything(cls, floor: int, histogram_cells: int = 0) -> Disclosure:
        """Every image count hidden: a site below the floor, or one whose counts are unknown."""
        return cls(floor, False, SUPPRESSED, SUPPRESSED, (SUPPRESSED,) * histogram_cells)


def decide(counts: SiteCounts, floor: int) -> Disclosure:
    """The one disclosure decision for a site's counts under `floor`."""
    if min(counts.train, counts.val) < floor:
        return Disclosure.hiding_everything(floor, len(counts.histogram))
    images = counts.train + counts.val
    if counts.presence:
        histogram = [
            SUPPRESSED if c < floor or small(images - c, floor) else c for c in counts.histogram
        ]
    else:
        histogram = hide_small(list(counts.histogram), floor)
    return Disclosure(floor, True, counts.train, counts.val, tuple(histogram))


def small(count: int, floor: int) -> bool:
    """A non-zero count below the floor (none of something singles out nobody)."""
    return 0 < count < floor


def hide_small(counts: list[int], min_count: int) -> list[int]:
    """`counts` with every count below `min_count` SUPPRESSED, and, when any is, enough of
    the others too that no hidden count follows from their known total (complementary
    suppression).

    Counts that add up to a known total (a classification histogram = the images)
    would give one hidden cell away by subtraction. So at least two cells are
    hidden, holding at least `min_count` between them: the smallest shown ones
    are added until that holds.
    """
    shown = [c if c >= min_count else SUPPRESSED for c in counts]
    hidden = [i for i, c in enumerate(shown) if c == SUPPRESSED]
    if not hidden:
        return shown
    remaining = sorted((c, i) for i, c in enumerate(shown) if c != SUPPRESSED)
    while remaining and (len(hidden) < 2 or sum(counts[i] for i in hidden) < min_count):
        _, index = remaining.pop(0)
        shown[index] = SUPPRESSED
        hidden.append(index)
    return shown


def remember(context: Context, counts: SiteCounts) -> None:
    """A handler states its site's exact counts for the filters, in the node's own state."""
    record = MetricRecord({"train": counts.train, "val": counts.val})
    record["histogram"] = list(counts.histogram)
    record["presence"] = int(counts.presence)
    context.state[STATE_KEY] = record


def recall(context: Context) -> SiteCounts | None:
    """The counts the handler of this message stated (taken out of the state: each message
    states its own); None when it stated none, and the filters then hide every count."""
    record = context.state.metric_records.pop(STATE_KEY, None)
    if record is None:
        return None
    return SiteCounts(
        train=int(record["train"]),
        val=int(record["val"]),
        histogram=tuple(int(c) for c in record["histogram"]),
        presence=bool(record["presence"]),
    )
