"""The coordinator's checks of a hospital's reply: a list of problems, a value, or
MalformedReply, whatever the reply holds; never an exception that ends the round."""

from uuid import uuid4

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import given
from hypothesis import strategies as st

from medfed.server.run.replies import SiteNames, metrics_problems, update_problems
from medfed.server.secagg.stage_replies import (
    MalformedReply,
    advertised_keys,
    masked_upload_problems,
    returned_shares,
    sealed_shares,
)
from medfed.shared_models.protocol import Key, Record
from tests.in_process_grid import act_as_coordinator
from tests.property.strategies import (
    FAST,
    config_values,
    metric_values,
    records_or_reject,
)
from tests.property.test_model_records import arrays

SECAGG_KEYS = st.sampled_from(
    [Key.C_PK, Key.S_PK, Key.SEED_HASH, "to.1", "to.2", "b.1", "sk.2", "name"]
) | st.text(max_size=6)
config_records = st.dictionaries(SECAGG_KEYS, config_values, max_size=5).map(
    lambda v: records_or_reject(ConfigRecord, v)
)
metric_records = st.dictionaries(
    st.sampled_from(["aggregation-weight", "loss", "dice"]) | st.text(max_size=6),
    metric_values,
    max_size=4,
).map(lambda v: records_or_reject(MetricRecord, v))
array_records = st.dictionaries(st.sampled_from(["w", Key.MASKED_ARRAY]), arrays, max_size=2).map(
    ArrayRecord
)
contents = st.fixed_dictionaries(
    {},
    optional={
        Record.METRICS: metric_records,
        Record.SITE: config_records,
        Record.SECAGG: config_records,
        Record.ARRAYS: array_records,
    },
).map(RecordDict)
SENT = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32))})


def reply(content: RecordDict, node: int = 5) -> Message:
    """`content` as node `node`'s reply to a training message."""
    act_as_coordinator()
    sent = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    sent.metadata.__dict__["_message_id"] = str(uuid4())
    return Message(content=content, reply_to=sent)


def _raises_malformed_or_returns(check, *args):
    try:
        return check(*args)
    except MalformedReply as err:
        assert str(err)
        return None


@FAST
@given(content=contents, weighted=st.booleans())
def test_update_and_metrics_checks_list_problems(content, weighted):
    message = reply(content)
    problems = update_problems(content.array_records.get(Record.ARRAYS), SENT)
    problems += metrics_problems(message, weighted)
    problems += masked_upload_problems(content.array_records.get(Record.ARRAYS), 6)
    assert all(isinstance(p, str) and p for p in problems)


@FAST
@given(content=contents, allowed=st.sets(st.sampled_from(["b.1", "sk.2", "name"])))
def test_secure_aggregation_replies_parse_or_are_malformed(content, allowed):
    message = reply(content)
    secagg = content.config_records.get(Record.SECAGG)
    keys = _raises_malformed_or_returns(advertised_keys, message, b"\x00" * 32)
    assert keys is None or all(isinstance(k, bytes) and len(k) == 32 for k in keys)
    _raises_malformed_or_returns(sealed_shares, secagg, "3", ["1", "2"])
    shares = _raises_malformed_or_returns(returned_shares, message, allowed)
    assert shares is None or set(shares) <= allowed


@FAST
@given(first=contents, second=contents)
def test_site_names_are_taken_or_refused_with_a_reason(first, second):
    names = SiteNames()
    for node, content in ((5, first), (6, second), (5, second)):
        message = reply(content, node)
        problem = names.problem(message)
        assert problem is None or (isinstance(problem, str) and problem)
        if problem is None:
            names.learn(message)
    assert len(set(names.by_node.values())) == len(names.by_node), "no two nodes share a name"
