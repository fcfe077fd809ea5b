"""The hospital side: the Flower ClientApp, its handlers and the mods around them.

A deployed SuperNode starts a fresh ClientApp process for every message.
Training and evaluation need torch and MONAI (about 4 s to import); the
SecAgg+ share and unmask steps need only NumPy and `cryptography` (0.4 s).
So `handlers`, the heavy module, is imported inside the handlers that use it.

The mods on the train handler, outermost first: `outbound_audit_mod` records
what leaves the site, `secagg_mod` masks the update, `dp_clipping_mod` clips
it. Flower runs a reply back through them inside-out, so the update is
clipped, then masked, then audited exactly as sent. Only model arrays (or a
masked vector) and scalar metrics leave the site.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from medfed.client.privacy import secagg_mod
from medfed.client.privacy.dp_clipping import dp_clipping_mod
from medfed.client.privacy.outbound_audit import outbound_audit_mod
from medfed.client.privacy.small_counts import small_count_mod

app = ClientApp()

# Outermost first; see the module docstring for why this order.
TRAIN_MODS = [outbound_audit_mod, secagg_mod.secagg_mod, dp_clipping_mod]


@app.train(mods=TRAIN_MODS)
def train(msg: Message, context: Context) -> Message:
    """Local epochs from the global weights."""
    from medfed.client import handlers

    return handlers.train(msg, context)


@app.evaluate(mods=[outbound_audit_mod])
def evaluate(msg: Message, context: Context) -> Message:
    """Validation metrics of the received global model on this site's held-out split."""
    from medfed.client import handlers

    return handlers.evaluate(msg, context)


@app.query(mods=[outbound_audit_mod, small_count_mod])
def query(msg: Message, context: Context) -> Message:
    """This site's summary for the coordinator, small counts suppressed on the way out."""
    from medfed.client import handlers

    return handlers.query(msg, context)


@app.train("secagg_advertise")
def secagg_advertise(msg: Message, context: Context) -> Message:
    """SecAgg+ step 1: this round's public keys and the site's aggregation weight."""
    from medfed.client import handlers

    return secagg_mod.advertise(msg, context, handlers.aggregation_weight(context))


@app.train("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    """SecAgg+ step 2: encrypted Shamir shares for each neighbour."""
    return secagg_mod.share(msg, context)


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """SecAgg+ step 4: the shares the coordinator needs to remove the masks."""
    return secagg_mod.unmask(msg, context)
