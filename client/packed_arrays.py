"""The hospital's end of packed model arrays (shared_models/flat_arrays.py).

`packed_arrays_mod` sits right inside `safe_errors_mod`, around every route:
a packed message is unpacked before the round guard, the SecAgg+ mod, the
count floor, DP clipping, the audit or a handler sees it, and the reply to a
packed message is packed after all of them. A layout that does not describe
its bytes is a malformed request, refused naming what is wrong.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from medfed.client.round_request import MalformedRequest
from medfed.shared_models.flat_arrays import LayoutError, pack_content, unpack_content
from medfed.shared_models.protocol import Record


def packed_arrays_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Unpack the coordinator's packed arrays; pack the reply's the same way."""
    packed = Record.LAYOUT in msg.content.config_records
    try:
        msg.content = unpack_content(msg.content)
    except LayoutError as error:
        raise MalformedRequest(f"packed arrays: {error}") from error
    reply = call_next(msg, context)
    if packed and reply.has_content():
        reply.content = pack_content(reply.content)
    return reply
