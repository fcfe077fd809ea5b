"""Differential privacy at the hospital: the update is clipped before anything else sees it.

Flower's own client-side mods do the clipping (`fixedclipping_mod`,
`adaptiveclipping_mod`); this mod picks the one the run asks for and applies
it to training messages that carry Flower's clipping norm, i.e. those of a
run with `dp.mode = "client"`. It sits inside `secagg_mod`, so under secure
aggregation the update is clipped before it is masked.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import Record


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip (reply arrays - received arrays) to the coordinator's norm, as Flower's mods do."""
    config = msg.content.config_records.get(Record.CONFIG)
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or config is None
        or KEY_CLIPPING_NORM not in config
    ):
        return call_next(msg, context)
    adaptive = RunConfig.from_mapping(context.run_config).dp_adaptive
    flower_mod = adaptiveclipping_mod if adaptive else fixedclipping_mod
    return flower_mod(msg, context, call_next)
