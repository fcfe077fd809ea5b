"""The ClientApp side of a secure round: messages in, SecAgg+ steps, messages out.

The protocol state of the round sits in the node's `context.state`, which
stays on the hospital's machine (Flower keeps it in the SuperNode), and is
deleted after the unmask step so no secret outlives its round.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from medfed.client.secagg import SecAggClient, SecAggRefused

STATE_KEY = "medfed-secagg"


def _client(context: Context) -> SecAggClient:
    if STATE_KEY not in context.state.config_records:
        raise SecAggRefused("no secure-aggregation state on this node for the round")
    return SecAggClient(context.state.config_records[STATE_KEY])


def _round(msg: Message) -> int:
    return int(msg.content["config"]["server-round"])


def advertise(msg: Message, context: Context, weight: float) -> Message:
    """Fresh key pairs for the round; the public halves and the aggregation weight go back."""
    client, public = SecAggClient.start(context.run_id, _round(msg), str(context.node_id))
    context.state[STATE_KEY] = client.state
    content = RecordDict(
        {
            "secagg": ConfigRecord(public),
            "metrics": MetricRecord({"aggregation-weight": weight}),
        }
    )
    return Message(content=content, reply_to=msg)


def share(msg: Message, context: Context) -> Message:
    """Encrypted shares of this hospital's secrets, one per neighbour."""
    config = msg.content["config"]
    secagg = msg.content["secagg"]
    xs = {key[2:]: int(value) for key, value in secagg.items() if key.startswith("x.")}
    neighbours = {
        key[5:]: (secagg[key], secagg[f"s-pk.{key[5:]}"])
        for key in secagg
        if key.startswith("c-pk.")
    }
    sealed = _client(context).share_keys(
        _round(msg),
        xs,
        neighbours,
        int(config["threshold"]),
        float(config["fraction"]),
        float(config["clipping-range"]),
        int(config["quantization-bits"]),
    )
    content = RecordDict({"secagg": ConfigRecord({f"to.{n}": c for n, c in sealed.items()})})
    return Message(content=content, reply_to=msg)


def masked_update(
    msg: Message, context: Context, global_arrays: ArrayRecord, trained: ArrayRecord
) -> tuple[ArrayRecord, int]:
    """The masked encoding of (trained - global), and the count of clipped values."""
    client = _client(context)
    inbox = msg.content["secagg"]
    client.receive_shares(
        _round(msg), {key[5:]: value for key, value in inbox.items() if key.startswith("from.")}
    )
    update = ((key, trained[key].numpy() - global_arrays[key].numpy()) for key in global_arrays)
    masked, clipped = client.mask(_round(msg), update)
    return ArrayRecord({key: Array(values) for key, values in masked.items()}), clipped


def unmask(msg: Message, context: Context) -> Message:
    """One share per neighbour as the round's outcome requires, then forget the round."""
    config: Mapping = msg.content["config"]
    shares = _client(context).unmask(
        _round(msg), list(config["survivors"]), list(config["dropped"])
    )
    del context.state[STATE_KEY]
    return Message(content=RecordDict({"secagg": ConfigRecord(shares)}), reply_to=msg)
