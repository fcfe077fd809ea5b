"""What a failure at the site may tell the coordinator: a code and text medfed wrote.

`safe_errors_mod`, the ClientApp's outermost mod, turns any exception into
an error reply: a code (shared_models/protocol.py ErrorCode) and a text that
names only what the coordinator itself sent or the run's config; the details
(a site data error names files and paths) stay in the node's log.
"""

from __future__ import annotations

from logging import ERROR

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore import log

from medfed.client.approval import AppNotApproved
from medfed.client.data.manifest import SiteDataError
from medfed.client.privacy.round_guard import RoundRefused
from medfed.client.privacy.secagg_hospital import SecAggRefused, UpdateRefused
from medfed.client.round_request import MalformedRequest
from medfed.client.settings import NodeConfigError
from medfed.shared_models.audit import audit
from medfed.shared_models.config import ConfigError
from medfed.shared_models.protocol import ErrorCode


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
