"""SecAgg+ at the hospital: the mod that masks the update, and the key-exchange steps.

`secagg_mod` wraps the train handler as Flower's `secaggplus_mod` does: it
takes the neighbours' encrypted shares out of the upload message, lets the
inner chain (DP clipping, then training) produce the plain update, and sends
back only its masked encoding, one flat uint32 vector. The other exchanges
(`advertise`, `share`, `confirm`, `unmask`) are ClientApp actions of their own.

The protocol state sits in the node's `context.state`, which stays on the
hospital's machine: the current round's under STATE_KEY, deleted after its
unmask step, on an abort and on every failure, so no secret outlives its
round, and the next round's keys under NEXT_KEY from the masked upload on
(never after the run's last round). In steady state the next round's keys
travel with the masked upload and its shares with the unmask reply, so a
round costs two exchanges, not four. Every step checks the run's ledger
(round_guard: rounds only move forward), and the pairwise masks are bound to
the round's terms (run config, training settings, global model).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import WARNING
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from medfed.client.privacy.hospital_noise import add_own_noise, noise_multiplier, own_epsilon
from medfed.client.privacy.node_ledger import NodeLedger
from medfed.client.privacy.round_guard import RoundLedger, recorded_round
from medfed.client.privacy.secagg_hospital import (
    HospitalSecAgg,
    RunTerms,
    SecAggRefused,
    ShareRequest,
    UpdateRefused,
)
from medfed.client.round_request import (
    MalformedRequest,
    node_names,
    request_config,
    server_round,
)
from medfed.client.settings import run_config
from medfed.shared_models.arrays import readable
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import Key, Metric, Record, SiteKey
from medfed.shared_models.round_terms import run_config_digest
from medfed.shared_models.secagg.vector import difference

STATE_KEY = "medfed-secagg"
NEXT_KEY = "medfed-secagg-next"
T = TypeVar("T")


def _state(context: Context) -> HospitalSecAgg:
    if STATE_KEY not in context.state.config_records:
        raise SecAggRefused("no secure-aggregation state on this node for the round")
    return HospitalSecAgg(context.state.config_records[STATE_KEY])


def _round(msg: Message) -> int:
    return server_round(request_config(msg))


def _config(context: Context) -> RunConfig:
    """The run's own settings, read from its config without the tasks (no torch needed)."""
    return run_config(context, validate=False)


def _start(context: Context, server_round: int, slot: str) -> dict[str, bytes]:
    state, public = HospitalSecAgg.start(context.run_id, server_round, str(context.node_id))
    context.state[slot] = state.state
    return public


def _forget(context: Context, *slots: str) -> None:
    for slot in slots:
        if slot in context.state.config_records:
            del context.state[slot]


def _forgetting_on_failure(context: Context, step: Callable[[], T]) -> T:
    """`step()`; on any failure the round's secrets (and the next round's) are deleted
    before the error leaves: no way out of a round keeps its keys, seed or shares."""
    try:
        return step()
    except BaseException:
        _forget(context, STATE_KEY, NEXT_KEY)
        raise


def _run_terms(context: Context) -> RunTerms:
    """What this hospital binds into every round it shares keys for, from its own config."""
    cfg = _config(context)
    return RunTerms(
        encoding=cfg.secagg_encoding(),
        run_config=run_config_digest(context.run_config),
        whole_group=cfg.secagg_neighbours == 0,
    )


def advertise(msg: Message, context: Context) -> Message:
    """Fresh key pairs for the round; the public halves go back with the digest of the run
    config this hospital holds (secrets of any earlier round are forgotten here). Refused
    for a round this hospital already trained."""
    number = _round(msg)
    _forget(context, STATE_KEY, NEXT_KEY)
    RoundLedger(context).require_ahead(number)
    public = _start(context, number, STATE_KEY)
    record = ConfigRecord({**public, Key.RUN_CONFIG: run_config_digest(context.run_config)})
    return Message(content=RecordDict({Record.SECAGG: record}), reply_to=msg)


def _share(context: Context, config: Mapping, secagg: Mapping) -> ConfigRecord:
    """Encrypted shares of this hospital's secrets, one per neighbour ("to.<node>"), the
    commitment to every share dealt, and the commitment to its self-mask seed."""
    request = ShareRequest.from_records(config, secagg)
    RoundLedger(context).require_ahead(request.server_round)
    state = _state(context)
    record = ConfigRecord(state.share_keys(request, _run_terms(context)))
    record[Key.SEED_HASH] = state.seed_hash
    return record


def share(msg: Message, context: Context) -> Message:
    """The share exchange of a round that was not prepared during the previous one."""
    sealed = _forgetting_on_failure(
        context, lambda: _share(context, request_config(msg), _secagg(msg))
    )
    return Message(content=RecordDict({Record.SECAGG: sealed}), reply_to=msg)


def _secagg(msg: Message) -> Mapping:
    record = msg.content.config_records.get(Record.SECAGG)
    if record is None:
        raise MalformedRequest(f"the message has no '{Record.SECAGG}' record")
    return record


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Mask the trained update of a secure round; pass the messages of other runs through.

    Whether a run is secure is the run's config, never the message: a training
    message of a secure run without the neighbours' shares is refused, so a
    coordinator cannot obtain an update in the clear by leaving them out. The
    update masked is (reply arrays - received arrays), so an inner mod that
    clips the reply (DP) is clipped before it is masked.
    """
    if not _config(context).secure_aggregation:
        return call_next(msg, context)
    if Record.SECAGG not in msg.content.config_records:
        _forget(context, STATE_KEY, NEXT_KEY)
        raise SecAggRefused(
            "this run uses secure aggregation, but the training message carries no "
            "neighbour shares: the update is not sent in the clear"
        )
    inbox = msg.content.config_records[Record.SECAGG]
    del msg.content[Record.SECAGG]  # the inner chain sees a plain training message
    NodeLedger(context).require_unreleased(recorded_round(context, _round(msg))[1])

    def masked() -> Message:
        reply = call_next(msg, context)
        if reply.has_error():
            _forget(context, STATE_KEY, NEXT_KEY)
            return reply
        state = _state(context)
        state.receive_shares(_round(msg), inbox)
        _mask_reply(msg, reply, state, context)
        return reply

    return _forgetting_on_failure(context, masked)


def _mask_reply(msg: Message, reply: Message, state: HospitalSecAgg, context: Context) -> None:
    """Replace the reply's arrays by the masked update (with this hospital's share of the DP
    noise when the run adds it here); add the next round's public keys unless this was
    the run's last round."""
    number, cfg = _round(msg), _config(context)
    received, trained = msg.content[Record.ARRAYS], reply.content[Record.ARRAYS]
    keys = list(received)
    if list(trained) != keys:
        raise SecAggRefused("the trained arrays do not match the received ones by name")
    update = difference(_views(trained), _views(received), keys)
    metrics = reply.content[Record.METRICS]
    if cfg.noise_at_hospitals:
        update = _with_own_noise(update, msg, state, context, metrics)
    terms, model = recorded_round(context, number)
    state.state["model"] = model  # a sum over it is revealed when this round unmasks
    try:
        masked, clipped = state.mask(number, update, float(metrics[Metric.WEIGHT]), terms)
    except SecAggRefused:
        raise
    except ValueError as err:
        raise UpdateRefused(f"this hospital's update cannot be sent: {err}") from err
    reply.content[Record.ARRAYS] = ArrayRecord({Key.MASKED_ARRAY: Array(masked)})
    if number < cfg.num_server_rounds:
        public = _start(context, number + 1, NEXT_KEY)
        reply.content[Record.SECAGG] = ConfigRecord(
            {Key.NEXT_PREFIX + name: key for name, key in public.items()}
        )
    if clipped:
        site = reply.content[Record.SITE][SiteKey.NAME] if Record.SITE in reply.content else ""
        log(
            WARNING,
            "[medfed] %s: %d update values exceeded secagg-clipping-range and were clipped",
            site,
            clipped,
        )


def _with_own_noise(
    update: np.ndarray, msg: Message, state: HospitalSecAgg, context: Context, metrics: Mapping
) -> np.ndarray:
    """The clipped update plus this hospital's share of the noise, recorded in its ledger;
    the reply says the epsilon this hospital has spent against the coordinator."""
    cfg = _config(context)
    participants = int(state.state["participants"])
    norm = float(request_config(msg)[KEY_CLIPPING_NORM])
    released = NodeLedger(context).add_noise(noise_multiplier(cfg, participants))  # counted first
    metrics[Metric.DP_EPSILON_OWN] = own_epsilon(released, cfg.dp_delta)
    return add_own_noise(update, cfg, norm, participants)


def _views(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Read-only views of the record's arrays (no copies); refused when one is not an array."""
    views = {}
    for key, array in record.items():
        values = readable(array)
        if values is None or values.shape != tuple(array.shape):
            raise SecAggRefused(f"array '{key}' of the training round is not a readable array")
        views[key] = values
    return views


def abort(msg: Message, context: Context) -> Message:
    """The coordinator gave the round up: forget its secrets now, not at the next round."""
    _forget(context, STATE_KEY, NEXT_KEY)
    return Message(content=RecordDict(), reply_to=msg)


def confirm(msg: Message, context: Context) -> Message:
    """With neighbours dropped: commit to the round's view (survivors and dropped) and tag it
    for each surviving neighbour; the shares wait for the unmask step."""
    config = request_config(msg)
    tags = _forgetting_on_failure(
        context,
        lambda: _state(context).confirm(
            _round(msg), node_names(config, Key.SURVIVORS), node_names(config, Key.DROPPED)
        ),
    )
    return Message(content=RecordDict({Record.SECAGG: ConfigRecord(tags)}), reply_to=msg)


def unmask(msg: Message, context: Context) -> Message:
    """One share per neighbour as the round's outcome requires (with neighbours dropped,
    only once enough of them confirmed the same view: their tags ride in the request),
    then forget the round; with the next round's plan attached (never past the run's last
    round), also that round's encrypted shares."""
    config = request_config(msg)
    number = _round(msg)
    tags = msg.content.config_records.get(Record.SECAGG)
    state = _forgetting_on_failure(context, lambda: _state(context))
    shares = _forgetting_on_failure(
        context,
        lambda: state.unmask(
            number,
            node_names(config, Key.SURVIVORS),
            node_names(config, Key.DROPPED),
            {k: v for k, v in (tags or {}).items() if isinstance(v, bytes)},
        ),
    )
    NodeLedger(context).release(bytes(state.state["model"]))  # before the shares leave
    _forget(context, STATE_KEY)
    content = RecordDict({Record.SECAGG: ConfigRecord(shares)})
    prepared = Record.NEXT_CONFIG in msg.content.config_records
    if prepared and NEXT_KEY in context.state.config_records:
        context.state[STATE_KEY] = context.state.config_records[NEXT_KEY]
        _forget(context, NEXT_KEY)
        try:
            content[Record.NEXT_SEALED] = _share(
                context, msg.content[Record.NEXT_CONFIG], msg.content[Record.NEXT_SECAGG]
            )
        except (SecAggRefused, ValueError, KeyError) as err:  # this round's shares still go back
            log(WARNING, "[medfed] not preparing the next secure round: %s", err)
            _forget(context, STATE_KEY)
    else:
        _forget(context, NEXT_KEY)
    return Message(content=content, reply_to=msg)
