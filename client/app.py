"""The hospital side: the Flower ClientApp (message routing only).

A deployed SuperNode starts a fresh ClientApp process for every message.
Training and evaluation need torch and MONAI (about 4 s to import); the
secure-aggregation steps between them need only NumPy and `cryptography`
(0.4 s). So the heavy module is imported inside the handlers that use it.
Only model arrays (or a masked vector) and scalar metrics leave the site.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from medfed.client import secure_stage

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local epochs from the global weights; masked under secure aggregation."""
    from medfed.client import training

    return training.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation metrics of the received global model on this site's held-out split."""
    from medfed.client import training

    return training.evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """This site's summary for the coordinator, with small counts suppressed here."""
    from medfed.client import training

    return training.query(msg, context)


@app.train("secagg_advertise")
def secagg_advertise(msg: Message, context: Context) -> Message:
    """SecAgg+ step 1: this round's public keys and the site's aggregation weight."""
    from medfed.client import training

    return training.advertise(msg, context)


@app.train("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    """SecAgg+ step 2: encrypted Shamir shares for each neighbour."""
    return secure_stage.share(msg, context)


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """SecAgg+ step 4: the shares the coordinator needs to remove the masks."""
    return secure_stage.unmask(msg, context)
