"""The hospital's Flower ClientApp: which mods run around which handler, and nothing else.

A deployed SuperNode starts a ClientApp process for every message (forked
from the node's warm worker, client/warm_worker.py). Training and evaluation
need torch and MONAI; the SecAgg+ steps between them need only NumPy and
`cryptography`. So `handlers`, the heavy module, is imported inside the
routes that use it (`bundle_handlers` instead for a MONAI bundle run).

The mods, one list per kind of message, outermost first. Flower runs a
reply back through them inside-out, so a training update is clipped, its
counts floored (the weight too, which masking then puts inside the masked
vector), then masked, then audited exactly as sent. Only model arrays (or a
masked vector) and scalar metrics leave the site.
"""

from __future__ import annotations

from types import ModuleType

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from medfed.client.outbound_audit import outbound_audit_mod
from medfed.client.packed_arrays import packed_arrays_mod
from medfed.client.privacy import secagg_mod
from medfed.client.privacy.filters import count_floor_mod, dp_clipping_mod, small_count_mod
from medfed.client.privacy.round_guard import round_guard_mod
from medfed.client.safe_errors import safe_errors_mod
from medfed.shared_models.protocol import SecAggAction

# Every message, outermost: a failure leaves as a code and text medfed wrote, never a path
# (client/safe_errors.py); the arrays the coordinator packed into one for the wire are
# unpacked, and the reply's packed (client/packed_arrays.py): everything further in sees
# named arrays.
EVERY_MESSAGE_MODS = [safe_errors_mod, packed_arrays_mod]
# Training, outermost first: the reply as sent is audited (client/outbound_audit.py); a
# round or a global model already trained, settings not the run's own and a plain round
# where the hospital requires secure ones are refused, the round's terms recorded
# (privacy/round_guard.py); the update masked under SecAgg+ (privacy/secagg_mod.py); its
# counts shown as the site's one disclosure decision allows (privacy/filters.py); the
# update clipped to the coordinator's norm under client-side DP (privacy/filters.py).
TRAIN_MODS = [
    outbound_audit_mod,
    round_guard_mod,
    secagg_mod.secagg_mod,
    count_floor_mod,
    dp_clipping_mod,
]
# Evaluation of a model: audited, its counts floored as in training.
EVALUATE_MODS = [outbound_audit_mod, count_floor_mod]
# The site's summary (federated statistics): audited, a count below the floor hidden.
QUERY_MODS = [outbound_audit_mod, small_count_mod]
# The SecAgg+ steps (advertise, share, confirm, unmask, abort) carry keys and shares, no
# update and no count: their handlers are secagg_mod's own steps, with no mods of their own.
SECAGG_STEP_MODS: list = []

app = ClientApp(mods=EVERY_MESSAGE_MODS)


def _handlers(context: Context) -> ModuleType:
    """The run's handlers: medfed's own tasks, or a MONAI bundle's recipe (task = bundle)."""
    if context.run_config.get("task") == "bundle":
        from medfed.client import bundle_handlers

        return bundle_handlers
    from medfed.client import handlers

    return handlers


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


@app.train(SecAggAction.ADVERTISE, mods=SECAGG_STEP_MODS)
def secagg_advertise(msg: Message, context: Context) -> Message:
    """SecAgg+ step 1: this round's public keys."""
    return secagg_mod.advertise(msg, context)


@app.train(SecAggAction.SHARE, mods=SECAGG_STEP_MODS)
def secagg_share(msg: Message, context: Context) -> Message:
    """SecAgg+ step 2: encrypted Shamir shares for each neighbour."""
    return secagg_mod.share(msg, context)


@app.train(SecAggAction.CONFIRM, mods=SECAGG_STEP_MODS)
def secagg_confirm(msg: Message, context: Context) -> Message:
    """SecAgg+ step 4a, when neighbours dropped: commit to the round's view, tag it."""
    return secagg_mod.confirm(msg, context)


@app.train(SecAggAction.UNMASK, mods=SECAGG_STEP_MODS)
def secagg_unmask(msg: Message, context: Context) -> Message:
    """SecAgg+ step 4: the shares the coordinator needs to remove the masks."""
    return secagg_mod.unmask(msg, context)


@app.train(SecAggAction.ABORT, mods=SECAGG_STEP_MODS)
def secagg_abort(msg: Message, context: Context) -> Message:
    """The round was given up: its secrets are forgotten at once."""
    return secagg_mod.abort(msg, context)
