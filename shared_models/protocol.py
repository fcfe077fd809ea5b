"""Everything that crosses the wire between the coordinator and a hospital, by name.

Both sides import their names from here and nowhere else: message kinds,
record names, the metric and config keys inside them, the node-config keys a
SuperNode is started with, the marker of a count a site hides and the
SecAgg+ stages and keys, plus the few SecAgg+ rules both ends must compute
alike. The layout follows Flower's `secaggplus_constants.py` (`Stage`, `Key`).
"""

from __future__ import annotations

import hashlib
import re


class SecAggAction:
    """The ClientApp's SecAgg+ actions; the categories are Flower's (`flwr.app.MessageType`)."""

    ADVERTISE = "secagg_advertise"
    SHARE = "secagg_share"
    UNMASK = "secagg_unmask"
    ABORT = "secagg_abort"  # forget the round's secrets: it will not be unmasked
    CONFIRM = "secagg_confirm"  # commit to the round's view; tag it for each neighbour


class MessageKind:
    """The message types of the SecAgg+ exchanges (`category.action`)."""

    SECAGG_ADVERTISE = "train." + SecAggAction.ADVERTISE
    SECAGG_SHARE = "train." + SecAggAction.SHARE
    SECAGG_UNMASK = "train." + SecAggAction.UNMASK
    SECAGG_ABORT = "train." + SecAggAction.ABORT
    SECAGG_CONFIRM = "train." + SecAggAction.CONFIRM


class Record:
    """Names of the records inside a message's RecordDict."""

    ARRAYS = "arrays"  # ArrayRecord: model weights (or the one masked vector)
    CONFIG = "config"  # ConfigRecord: round settings from the coordinator
    METRICS = "metrics"  # MetricRecord: scalars a hospital reports
    SITE = "site"  # ConfigRecord: the hospital's site label
    SECAGG = "secagg"  # ConfigRecord: SecAgg+ keys, ciphertexts or shares
    NEXT_CONFIG = "next-config"  # the next round's share settings, riding on an unmask
    NEXT_SECAGG = "next-secagg"  # the next round's neighbour keys, riding on an unmask
    NEXT_SEALED = "next-sealed"  # the next round's ciphertexts, riding on an unmask reply
    LAYOUT = "layout"  # ConfigRecord: how the one packed array splits into the model's arrays
    # MetricRecord of a training reply: the received global model's validation metrics
    VALIDATION = "validation"


class Metric:
    """Keys of the MetricRecord a hospital sends (besides a task's own metric names)."""

    # The example count, or 1 under differential privacy (its noise assumes equal weights).
    WEIGHT = "aggregation-weight"
    NUM_EXAMPLES = "num-examples"
    LOSS = "loss"  # every task's validation loss
    KEY_METRIC = "key-metric"  # task = bundle: its evaluator's key metric, whatever its name
    SKIPPED_FILES = "skipped-files"
    TRAIN_LOSS = "train-loss"
    TRAIN_SECONDS = "train-seconds"
    IMAGES_PER_SECOND = "images-per-second"
    GENERATED_IMAGES = "generated-images"
    DP_EPSILON = "dp-epsilon"  # added by the coordinator to the global metrics
    # dp.noise at the hospitals: the epsilon a hospital has spent against the coordinator,
    # counting its own noise alone (the worst case: every other hospital's noise known).
    DP_EPSILON_OWN = "dp-epsilon-own-noise"
    # Bookkeeping that is never a quality metric of the model.
    BOOKKEEPING = (WEIGHT, NUM_EXAMPLES, SKIPPED_FILES, DP_EPSILON, DP_EPSILON_OWN)
    # Counts a site reveals only at or above its floor (else SUPPRESSED).
    COUNTS = (NUM_EXAMPLES, SKIPPED_FILES, GENERATED_IMAGES)
    # Everything a site may send as SUPPRESSED: its counts and the throughput that gives one away.
    HIDEABLE = (*COUNTS, IMAGES_PER_SECOND)
    # What a site whose counts are hidden still sends as values: every other metric (loss,
    # accuracy, Dice, AUC, ...) is a mean over its images, a fraction whose denominator a
    # chosen model (or enough honest rounds) gives away, so it goes as SUPPRESSED too.
    SHOWN_WHEN_HIDDEN = (WEIGHT, NUM_EXAMPLES, SKIPPED_FILES, TRAIN_SECONDS, DP_EPSILON_OWN)


class Config:
    """Keys of the coordinator's ConfigRecord."""

    SERVER_ROUND = "server-round"  # Flower's strategies set it on every message
    PROXIMAL_MU = "proximal-mu"  # Flower's FedProx sets it
    STATS_MIN_COUNT = "stats-min-count"
    # Cross-site evaluation: the site whose last local model an evaluate message carries
    # (absent for the global model), so the evaluating hospital audits whose model it ran.
    CROSS_SITE_MODEL = "cross-site-model"
    # task = bundle: the coordinator's hash of the bundle configs; a node holding others refuses
    BUNDLE_SHA256 = "bundle-sha256"


class SiteKey:
    """Keys of the `site` ConfigRecord in a hospital's reply."""

    NAME = "name"


# What a site name may be: a label for reports and metrics, not free text.
SITE_NAME = re.compile(r"\w[\w.-]{0,63}")


class Statistic:
    """Keys of a site's summary (the reply to a statistics query)."""

    NUM_TRAIN = "num-train"
    NUM_VAL = "num-val"
    LABEL_HISTOGRAM = "label-histogram"  # images per class (or value bin)
    INTENSITY_P1 = "intensity-p1"
    INTENSITY_P99 = "intensity-p99"
    INTENSITY_HISTOGRAM = "intensity-histogram"  # pixel fractions over fixed bins
    # The minimum the site applied: the larger of its own floor and the coordinator's ask.
    MIN_COUNT = "min-count"


# A count the site hides (below its floor, or one a hidden count would follow from),
# replaced at the site before it is sent. A marker, never a value to compute with.
SUPPRESSED = -1


class ErrorCode:
    """Codes of the errors a hospital sends instead of a reply (with generic text only)."""

    INTERNAL = 100  # anything unexpected; the details are in the node's log
    SITE_DATA = 101  # the site's data cannot be used
    CONFIG = 102  # the run's config is not valid
    SECAGG_REFUSED = 103  # a secure-aggregation step the hospital refuses
    UPDATE_REFUSED = 104  # an update the hospital will not send (e.g. not finite)
    MALFORMED_REQUEST = 105  # a message from the coordinator the hospital cannot act on
    ROUND_REFUSED = 106  # a round repeated, or terms that differ from the run's own
    MALFORMED_REPLY = 107  # set by the coordinator: a reply whose packed arrays do not unpack


class NodeConfig:
    """Keys of a SuperNode's `--node-config` (simulation adds the partition keys)."""

    DATA_PATH = "data-path"
    SITE_NAME = "site-name"
    DEVICE = "device"
    CACHE_DIR = "cache-dir"
    LOADER_WORKERS = "loader-workers"
    MIN_COUNT = "min-count"  # the site's floor: no smaller count of images leaves it
    # The hospital's own policy: it trains only in runs with secure aggregation on.
    REQUIRE_SECURE_AGGREGATION = "require-secure-aggregation"
    PARTITION_ID = "partition-id"  # Flower's simulation engine sets these two
    NUM_PARTITIONS = "num-partitions"


class Stage:
    """The four SecAgg+ exchanges of a secure round."""

    ADVERTISE = "advertise"  # hospitals send fresh public keys and their weight
    SHARE = "share"  # hospitals send encrypted Shamir shares for their neighbours
    UPLOAD = "upload"  # the training message: neighbours' shares in, masked update out
    CONFIRM = "confirm"  # with dropouts: hospitals commit to one view of the round and tag it
    UNMASK = "unmask"  # hospitals send the shares that remove the masks


class Key:
    """Keys inside the `secagg` and `config` records of SecAgg+ messages."""

    C_PK = "c-pk"  # public key for encrypting shares
    S_PK = "s-pk"  # public key for pairwise masks
    RUN_CONFIG = "run-config"  # advertise: the digest of the run config the hospital holds
    NEXT_PREFIX = "next."  # next round's public keys, riding on the masked upload
    X_PREFIX = "x."  # x.<node>: a group member's Shamir x-coordinate
    C_PK_PREFIX = "c-pk."  # c-pk.<node>: a neighbour's share-encryption key
    S_PK_PREFIX = "s-pk."  # s-pk.<node>: a neighbour's mask key
    TO_PREFIX = "to."  # to.<node>: a ciphertext for that neighbour
    FROM_PREFIX = "from."  # from.<node>: a ciphertext from that neighbour
    SEED_SHARE_PREFIX = "b."  # b.<node>: a share of that node's self-mask seed
    KEY_SHARE_PREFIX = "sk."  # sk.<node>: a share of that node's mask private key
    SEED_HASH = "b-hash"  # SHA-256 of the self-mask seed: a rebuilt seed can be checked
    # hb.<node> / hsk.<node>: the dealer's commitment to the seed / mask-key share it gave
    # <node> (share_commitment): a share returned at unmasking is checked against it.
    SEED_COMMIT_PREFIX = "hb."
    KEY_COMMIT_PREFIX = "hsk."
    THRESHOLD = "threshold"
    PARTICIPANTS = "participants"  # hospitals in the round (scales the encoding)
    SURVIVORS = "survivors"
    TAG_PREFIX = "tag."  # tag.<node>: a view of the round tagged for (or by) that neighbour
    DROPPED = "dropped"
    MASKED_ARRAY = "masked"  # the one array of a masked upload


# Fewer hospitals than this, and one could learn another's update from the sum.
SECAGG_MIN_PARTICIPANTS = 3
# More than this is no consortium of hospitals; beyond it a weight's fixed-point unit
# (2**31 / participants) gets too coarse to carry one hospital's example count.
SECAGG_MAX_PARTICIPANTS = 10_000


def share_terms(encoding_terms: str, run_config: bytes) -> str:
    """A round's terms as share ciphertexts bind them: the encoding (participants,
    threshold, range, bits, weights) and the digest of the run's whole config
    (round_terms.run_config_digest), so hospitals given different configs cannot open
    each other's shares and none of them masks."""
    return f"{encoding_terms}|run-config={run_config.hex()}"


def share_context(run: int, server_round: int, route: tuple[str, str], terms: str) -> bytes:
    """Authenticated data binding a share ciphertext to its round, (sender, receiver) and the
    round's terms (share_terms): neighbours told different terms cannot open each other's
    shares, so no hospital can be given a scale or a config of its own."""
    sender, receiver = route
    return (
        f"medfed-secagg|run={run}|round={server_round}|from={sender}|to={receiver}|{terms}".encode()
    )


def pair_label(purpose: bytes, ends: tuple[tuple[str, bytes], tuple[str, bytes]]) -> bytes:
    """Key-derivation label of one pair: the purpose, then both node ids and both public
    keys in node order, so both ends derive alike and a derived key serves only the pair,
    the keys and the purpose it was made for."""
    low, high = sorted(ends, key=lambda end: int(end[0]))
    return purpose + f"|{low[0]}|{high[0]}|".encode() + low[1] + high[1]


def share_purpose(run: int, server_round: int) -> bytes:
    """Key-derivation purpose of the key that encrypts a round's shares between a pair."""
    return f"share|run={run}|round={server_round}".encode()


def consistency_purpose(run: int, server_round: int) -> bytes:
    """Key-derivation purpose of the key a pair tags a round's view with (confirm/unmask)."""
    return f"view|run={run}|round={server_round}".encode()


def mask_purpose(run: int, server_round: int, terms: bytes) -> bytes:
    """Key-derivation purpose of a round's pairwise masks: fresh every round, and bound to
    the round's terms (round_terms.round_digest: the run config, the training message's
    settings, the global model's hash). Two hospitals given different terms derive
    different masks, which then do not cancel: the sum is noise to the coordinator."""
    return f"mask|run={run}|round={server_round}|terms=".encode() + terms.hex().encode()


def share_commitment(
    run: int, server_round: int, route: tuple[str, str], kind: str, share: bytes
) -> bytes:
    """The dealer's commitment to one share (kind "b": seed, "sk": mask key) it gave the
    holder: shares are uniform field elements of 521 bits, so the hash hides them, and a
    share returned at unmasking that differs from what was dealt is told apart and its
    holder named (a share that matches but rebuilds no committed secret names the dealer)."""
    dealer, holder = route
    label = f"medfed-share|run={run}|round={server_round}|from={dealer}|to={holder}|{kind}|"
    return hashlib.sha256(label.encode() + share).digest()


def minimum_threshold(group_size: int) -> int:
    """A strict majority of the group: fewer could let a coordinator rebuild both secrets."""
    return group_size // 2 + 1


def pairwise_sign(me: str, other: str) -> bool:
    """True where `me` adds the pair's mask (the other end subtracts it)."""
    return int(me) < int(other)
