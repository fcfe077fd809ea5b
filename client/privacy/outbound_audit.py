"""What leaves the hospital, recorded: the outermost mod of every data handler.

It sees each reply exactly as it goes out (after DP clipping, SecAgg+ masking
and small-count suppression) and writes one audit line: array names and
shapes, metric names, whether the update was masked and to which norm it was
clipped. Never values, file names or images. It also counts the model bytes
sent, for the node's own dashboard.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from medfed.client import telemetry
from medfed.shared_models.audit import audit
from medfed.shared_models.protocol import Config, Key, Metric, Record, SiteKey

EVENTS = {
    MessageType.TRAIN: "round-trained",
    MessageType.EVALUATE: "round-evaluated",
    MessageType.QUERY: "run-joined",
}


def _fields(msg: Message, reply: Message, context: Context) -> dict[str, Any]:
    """The audit fields of one reply: names and shapes of what was sent, never values."""
    kind = msg.metadata.message_type.split(".")[0]
    config = msg.content[Record.CONFIG]
    metrics = reply.content[Record.METRICS]
    if kind == MessageType.QUERY:
        return {
            "task": context.run_config.get("task"),
            "sent_statistics": sorted(metrics),
            "min_count": int(config[Config.STATS_MIN_COUNT]),
        }
    fields: dict[str, Any] = {
        "round": int(config.get(Config.SERVER_ROUND, 0)),
        "sent_metrics": sorted(metrics),
    }
    if kind == MessageType.TRAIN:
        arrays = reply.content[Record.ARRAYS]
        clipped_to = config.get(KEY_CLIPPING_NORM)
        fields.update(
            examples=int(metrics[Metric.NUM_EXAMPLES]),
            skipped_files=int(metrics[Metric.SKIPPED_FILES]),
            sent_arrays={name: list(array.shape) for name, array in arrays.items()},
            masked=Key.MASKED_ARRAY in arrays,
            clipped_to_norm=float(clipped_to) if clipped_to is not None else None,
        )
    return fields


def outbound_audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Audit the reply that actually leaves the site, and count its model bytes."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    site = str(reply.content[Record.SITE][SiteKey.NAME])
    event = EVENTS[msg.metadata.message_type.split(".")[0]]
    audit(event, run=context.run_id, site=site, **_fields(msg, reply, context))
    sent = sum(len(a.data) for r in reply.content.array_records.values() for a in r.values())
    if sent:
        telemetry.model_bytes_sent(site, sent)
    return reply
