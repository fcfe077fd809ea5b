"""A malformed message from the coordinator is refused with its own code, naming the key."""

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from medfed.shared_models.audit import AUDIT_ENV
from medfed.shared_models.protocol import Config, ErrorCode, NodeConfig
from tests.client.test_privacy_mods import RUN_ID, SHAPES, incoming


@pytest.mark.parametrize(
    ("kind", "config", "named"),
    [
        ("train", {Config.SERVER_ROUND: "one"}, "'server-round' = 'one'"),
        ("evaluate", {Config.SERVER_ROUND: -1}, "'server-round' = -1"),
        ("evaluate", {Config.CROSS_SITE_MODEL: "../site-1"}, "'cross-site-model' = '../site-1'"),
        ("evaluate", {Config.CROSS_SITE_MODEL: 3}, "'cross-site-model' = 3: expected a site"),
        ("query", {}, "'stats-min-count' = None"),
    ],
)
def test_a_malformed_request_is_refused_naming_the_key(tmp_path, monkeypatch, kind, config, named):
    from medfed.client.app import app

    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    ctx = Context(RUN_ID, 5, {NodeConfig.DATA_PATH: str(tmp_path)}, RecordDict(), {})
    arrays = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    reply = app(incoming(kind, config, arrays if kind != "query" else None), ctx)
    assert reply.has_error() and reply.error.code == ErrorCode.MALFORMED_REQUEST
    assert named in reply.error.reason


def test_packed_arrays_whose_layout_does_not_fit_are_refused_naming_why(tmp_path, monkeypatch):
    """The coordinator packs a model's arrays into one for the wire; a layout that does not
    describe the bytes is a malformed request, refused before any handler or mod sees it."""
    from medfed.client.app import app
    from medfed.shared_models.flat_arrays import pack_content
    from medfed.shared_models.protocol import Record

    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit.jsonl"))
    ctx = Context(RUN_ID, 5, {NodeConfig.DATA_PATH: str(tmp_path)}, RecordDict(), {})
    arrays = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    message = incoming("train", {Config.SERVER_ROUND: 1}, arrays)
    message.content = pack_content(message.content)
    message.content[Record.LAYOUT]["dtypes"] = ["|O"] * len(SHAPES)
    reply = app(message, ctx)
    assert reply.has_error() and reply.error.code == ErrorCode.MALFORMED_REQUEST
    assert (
        "packed arrays: array" in reply.error.reason and "not a plain number" in reply.error.reason
    )
