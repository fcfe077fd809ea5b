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
- with the split shown, where the histogram's cells add up to the images
  (classes, value bins), one cell below the floor hides them all. Hiding
  only enough others to cover the subtraction (complementary suppression,
  what medfed did before) is not enough against a coordinator that knows the
  rule: [6, 6, 2] under a floor of 3 showed [hidden, 6, hidden], and no other
  histogram of 14 images shows that, so the 2 followed. Where the cells
  count images in which a class appears (segmentation), a cell is hidden
  when it, or its complement (images without that class), is below the floor.
- skipped files and generated images are hidden when below the floor
  (`small`); skipped files are a count of their own, linked to none of these.

The exact counts reach the filters through the node's own context state
(`remember` / `recall`), which stays on the node: they are never put in a reply.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Context, MetricRecord

from medfed.client.data.split import validation_count
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
    cells = counts.histogram
    if counts.presence:
        histogram = tuple(SUPPRESSED if c < floor or small(images - c, floor) else c for c in cells)
    elif any(c < floor for c in cells):
        histogram = (SUPPRESSED,) * len(cells)
    else:
        histogram = cells
    return Disclosure(floor, True, counts.train, counts.val, histogram)


def largest_hidden_train(floor: int, val_fraction: float) -> int:
    """The most training images a site whose split is hidden can have, under the public
    split rule: what such a site draws per epoch (with replacement), whatever its own
    count, so that neither its number of optimiser steps nor anything a chosen model makes
    of them (a batch-norm layer's running statistics, how many values the clipping range
    cut) tells how many images it has."""
    largest, images = floor - 1, 2
    while True:
        val = validation_count(images, val_fraction)
        train = images - val
        if min(train, val) >= floor:  # both grow with the images: shown from here on
            return largest
        largest = max(largest, train)
        images += 1


def small(count: int, floor: int) -> bool:
    """A non-zero count below the floor (none of something singles out nobody)."""
    return 0 < count < floor


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
