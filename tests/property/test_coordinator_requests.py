"""What the coordinator sends a hospital: read, or refused with medfed's own error.

The hospital's SecAgg+ steps and its reply filters read the coordinator's
`config` and `secagg` records; whatever they hold, a step answers or raises
SecAggRefused / MalformedRequest (a code and text for the coordinator), never
a KeyError or TypeError.
"""

from uuid import uuid4

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod.utils import make_ffn
from hypothesis import given
from hypothesis import strategies as st

from medfed.client.privacy import secagg_mod
from medfed.client.privacy.filters import small_count_mod
from medfed.client.privacy.round_guard import RoundRefused, round_guard_mod
from medfed.client.privacy.secagg_hospital import SecAggRefused
from medfed.client.round_request import MalformedRequest, round_settings
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import Config, Key, Metric, Record, Statistic
from tests.in_process_grid import act_as_coordinator
from tests.property.strategies import FAST, config_values, records_or_reject

REQUEST_KEYS = st.sampled_from(
    [
        Config.SERVER_ROUND,
        Config.PROXIMAL_MU,
        Config.STATS_MIN_COUNT,
        "clipping_norm",
        Key.THRESHOLD,
        Key.PARTICIPANTS,
        Key.SURVIVORS,
        Key.DROPPED,
        "x.5",
        "x.6",
        "c-pk.6",
        "s-pk.6",
        "from.6",
    ]
)
records = st.dictionaries(REQUEST_KEYS | st.text(max_size=6), config_values, max_size=6).map(
    lambda v: records_or_reject(ConfigRecord, v)
)
messages = st.fixed_dictionaries({}, optional={Record.CONFIG: records, Record.SECAGG: records}).map(
    RecordDict
)
REFUSALS = (SecAggRefused, MalformedRequest, RoundRefused)


def _message(content: RecordDict, message_type: str = "train") -> Message:
    act_as_coordinator()
    message = Message(content=content, dst_node_id=5, message_type=message_type)
    message.metadata.__dict__["_message_id"] = str(uuid4())
    return message


def _context() -> Context:
    config = RunConfig(secure_aggregation=True).to_mapping()
    return Context(7, 5, {}, RecordDict(), config)


def _answers_or_refuses(step, *args):
    try:
        return step(*args)
    except REFUSALS as err:
        assert str(err)
        return None


@FAST
@given(advertise=messages, share=messages, unmask=messages)
def test_the_secure_aggregation_steps_answer_or_refuse(advertise, share, unmask):
    context = _context()
    _answers_or_refuses(secagg_mod.advertise, _message(advertise), context)
    _answers_or_refuses(secagg_mod.share, _message(share), context)
    _answers_or_refuses(secagg_mod.unmask, _message(unmask), context)
    _answers_or_refuses(secagg_mod.abort, _message(unmask), context)
    assert secagg_mod.STATE_KEY not in context.state.config_records


@FAST
@given(config=records, inbox=records, arrays=st.booleans())
def test_a_masked_upload_request_answers_or_refuses(config, inbox, arrays):
    """After this round's keys were advertised, whatever the upload message holds, through
    the train route's guard and masking mods."""
    context = _context()
    secagg_mod.advertise(
        _message(RecordDict({Record.CONFIG: ConfigRecord({"server-round": 1})})), context
    )
    config["server-round"] = 1
    content = RecordDict({Record.CONFIG: config, Record.SECAGG: inbox})
    if arrays:
        content[Record.ARRAYS] = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    chain = make_ffn(_train, [round_guard_mod, secagg_mod.secagg_mod])
    _answers_or_refuses(chain, _message(content), context)


def _train(msg: Message, context: Context) -> Message:
    """Stands in for training: the received arrays back, with a weight (handlers.train
    refuses a message without arrays before it trains, as here)."""
    if Record.ARRAYS not in msg.content:
        raise MalformedRequest(f"the message has no '{Record.ARRAYS}' record")
    metrics = MetricRecord({Metric.WEIGHT: 10.0})
    content = RecordDict({Record.METRICS: metrics, Record.ARRAYS: msg.content[Record.ARRAYS]})
    return Message(content, reply_to=msg)


@FAST
@given(request=messages)
def test_training_and_statistics_requests_are_read_or_refused(request):
    message = _message(request)
    settings = _answers_or_refuses(round_settings, message)
    if settings is not None:
        assert settings.server_round >= 0 and settings.proximal_mu >= 0

    def summary(msg: Message, context: Context) -> Message:
        counts = {Statistic.NUM_TRAIN: 40, Statistic.NUM_VAL: 10}
        metrics = {**counts, Statistic.LABEL_HISTOGRAM: [25, 25]}
        metrics[Statistic.INTENSITY_HISTOGRAM] = [0.5, 0.5]
        return Message(RecordDict({Record.METRICS: MetricRecord(metrics)}), reply_to=msg)

    reply = _answers_or_refuses(small_count_mod, _message(request, "query"), _context(), summary)
    assert reply is None or reply.content[Record.METRICS][Statistic.MIN_COUNT] >= 10
