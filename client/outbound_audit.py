"""What leaves the site, recorded in the hospital's audit log as it is sent.

The ClientApp's `outbound_audit_mod` sees each reply after every other mod
has had its turn (clipped, counts floored, masked): it records array names
and shapes, metric names, whether the update was masked and to which norm it
was clipped; never values, file names or images. It also counts the reply's
model bytes and shows its metrics on the node's Prometheus gauges.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from medfed.client import node_metrics
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
    if Config.CROSS_SITE_MODEL in config:  # another hospital's local model was run here
        fields["model"] = str(config[Config.CROSS_SITE_MODEL])
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
        validation = reply.content.metric_records.get(Record.VALIDATION)
        if validation is not None:  # the received model's, validated before training
            fields["sent_validation_metrics"] = sorted(validation)
    return fields


def outbound_audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Audit the reply that actually leaves the site; count its model bytes and show it, as
    sent, on the node's gauges (a training reply; an evaluation of the global model)."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    site = str(reply.content[Record.SITE][SiteKey.NAME])
    event = EVENTS[msg.metadata.message_type.split(".")[0]]
    audit(event, run=context.run_id, site=site, **_fields(msg, reply, context))
    training = msg.metadata.message_type == MessageType.TRAIN
    global_model = Config.CROSS_SITE_MODEL not in msg.content[Record.CONFIG]
    task = str(context.run_config.get("task", ""))
    if training or (msg.metadata.message_type == MessageType.EVALUATE and global_model):
        node_metrics.record_sent(site, task, training, reply.content[Record.METRICS])
    validation = reply.content.metric_records.get(Record.VALIDATION)
    if training and validation is not None:
        node_metrics.record_sent(site, task, False, validation)
    sent = sum(len(a.data) for r in reply.content.array_records.values() for a in r.values())
    if sent:
        node_metrics.model_bytes_sent(site, sent)
    return reply
