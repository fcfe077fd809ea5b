"""The hospital side: the Flower ClientApp, its routes, and the mods around the handlers.

A deployed SuperNode starts a fresh ClientApp process for every message.
Training and evaluation need torch and MONAI (about 4 s to import); the
SecAgg+ steps between them need only NumPy and `cryptography` (0.4 s).
So `handlers`, the heavy module, is imported inside the handlers that use it
(`bundle_handlers` instead for a MONAI bundle run).

Every route has two mods of this module outermost. `safe_errors_mod` turns a
failure into a code and generic text (the details stay in the node's log: a
path or file name never leaves the site). Right inside it, `packed_arrays_mod`
unpacks the model arrays the coordinator packed into one array for the wire
and packs the reply's (client/packed_arrays.py): everything further in sees
named arrays. `outbound_audit_mod` records what
leaves: array names and shapes, metric names, whether the update was masked
and to which norm it was clipped; never values, file names or images. Inside
them on the train route, outermost first: SecAgg+ masking, the site's floor on
counts, DP clipping. Flower runs a reply back through the mods inside-out, so
the update is clipped, its counts floored (the weight too, which masking then
puts inside the masked vector), then masked, then audited exactly as sent.
Before all of them, `round_guard_mod` refuses a round this hospital already
trained, a global model it already trained on and settings that are not the
run's own, and records the round's terms the masks are bound to.
Only model arrays (or a masked vector) and scalar metrics leave the site.
"""

from __future__ import annotations

from logging import ERROR
from types import ModuleType
from typing import Any

from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from medfed.client import telemetry
from medfed.client.approval import AppNotApproved
from medfed.client.data.manifest import SiteDataError
from medfed.client.node_settings import NodeConfigError
from medfed.client.packed_arrays import packed_arrays_mod
from medfed.client.privacy import secagg_mod
from medfed.client.privacy.filters import count_floor_mod, dp_clipping_mod, small_count_mod
from medfed.client.privacy.round_guard import RoundRefused, round_guard_mod
from medfed.client.privacy.secagg_hospital import SecAggRefused, UpdateRefused
from medfed.client.round_request import MalformedRequest
from medfed.shared_models.audit import audit
from medfed.shared_models.config import ConfigError
from medfed.shared_models.protocol import (
    Config,
    ErrorCode,
    Key,
    Metric,
    Record,
    SecAggAction,
    SiteKey,
)

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
        telemetry.record_sent(site, task, training, reply.content[Record.METRICS])
    validation = reply.content.metric_records.get(Record.VALIDATION)
    if training and validation is not None:
        telemetry.record_sent(site, task, False, validation)
    sent = sum(len(a.data) for r in reply.content.array_records.values() for a in r.values())
    if sent:
        telemetry.model_bytes_sent(site, sent)
    return reply


def error_report(err: Exception) -> tuple[int, str]:
    """The code and the text the coordinator may see for a failure at this site.

    Texts medfed writes from the run's config or the protocol pass through;
    anything else (site data errors name files and paths) becomes generic.
    """
    if isinstance(err, SiteDataError):
        return ErrorCode.SITE_DATA, "site data unusable; the node's log says why"
    if isinstance(err, NodeConfigError):  # its value may be a path: it stays in the log
        return ErrorCode.CONFIG, "node config refused; the node's log says why"
    if isinstance(err, ConfigError):
        return ErrorCode.CONFIG, f"run config refused: {err}"
    if isinstance(err, AppNotApproved):  # it names the hash the coordinator itself sent
        return ErrorCode.CONFIG, f"refused: {err}"
    if isinstance(err, MalformedRequest):  # it names what the coordinator itself sent
        return ErrorCode.MALFORMED_REQUEST, f"malformed request refused: {err}"
    if isinstance(err, SecAggRefused):
        return ErrorCode.SECAGG_REFUSED, f"secure aggregation refused: {err}"
    if isinstance(err, RoundRefused):  # it names rounds and settings the coordinator sent
        return ErrorCode.ROUND_REFUSED, f"round refused: {err}"
    if isinstance(err, UpdateRefused):
        return ErrorCode.UPDATE_REFUSED, str(err)
    return ErrorCode.INTERNAL, f"{type(err).__name__} at the site; the node's log says why"


def safe_errors_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A failure leaves the site as a code and generic text; the details go to its log."""
    try:
        return call_next(msg, context)
    except Exception as err:
        code, reason = error_report(err)
        log(ERROR, "[medfed] %s failed (code %d)", msg.metadata.message_type, code, exc_info=err)
        audit("reply-error", run=context.run_id, message=msg.metadata.message_type, code=code)
        return Message(Error(code=code, reason=reason), reply_to=msg)


app = ClientApp(mods=[safe_errors_mod, packed_arrays_mod])


def _handlers(context: Context) -> ModuleType:
    """The run's handlers: medfed's own tasks, or a MONAI bundle's recipe (task = bundle)."""
    if context.run_config.get("task") == "bundle":
        from medfed.client import bundle_handlers

        return bundle_handlers
    from medfed.client import handlers

    return handlers


# Outermost first; see the module docstring for why this order.
TRAIN_MODS = [
    outbound_audit_mod,
    round_guard_mod,
    secagg_mod.secagg_mod,
    count_floor_mod,
    dp_clipping_mod,
]
EVALUATE_MODS = [outbound_audit_mod, count_floor_mod]
QUERY_MODS = [outbound_audit_mod, small_count_mod]


@app.train(mods=TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    """Local epochs from the global weights."""
    return _handlers(context).train(msg, context)


@app.evaluate(mods=EVALUATE_MODS)
def evaluate(msg: Message, context: Context) -> Message:
    """Validation metrics of the received global model on this site's held-out split."""
    return _handlers(context).evaluate(msg, context)


@app.query(mods=QUERY_MODS)
def query(msg: Message, context: Context) -> Message:
    """This site's summary for the coordinator, its counts as the site's decision shows them."""
    return _handlers(context).query(msg, context)


@app.train(SecAggAction.ADVERTISE)
def secagg_advertise(msg: Message, context: Context) -> Message:
    """SecAgg+ step 1: this round's public keys."""
    return secagg_mod.advertise(msg, context)


@app.train(SecAggAction.SHARE)
def secagg_share(msg: Message, context: Context) -> Message:
    """SecAgg+ step 2: encrypted Shamir shares for each neighbour."""
    return secagg_mod.share(msg, context)


@app.train(SecAggAction.CONFIRM)
def secagg_confirm(msg: Message, context: Context) -> Message:
    """SecAgg+ step 4a, when neighbours dropped: commit to the round's view, tag it."""
    return secagg_mod.confirm(msg, context)


@app.train(SecAggAction.UNMASK)
def secagg_unmask(msg: Message, context: Context) -> Message:
    """SecAgg+ step 4: the shares the coordinator needs to remove the masks."""
    return secagg_mod.unmask(msg, context)


@app.train(SecAggAction.ABORT)
def secagg_abort(msg: Message, context: Context) -> Message:
    """The round was given up: its secrets are forgotten at once."""
    return secagg_mod.abort(msg, context)
