"""An in-process Grid whose hospitals run medfed's real ClientApp mods around scripted training.

It lets the tests drive the coordinator's actual round loop and SecAgg+
workflow against the hospitals' actual protocol code (the SecAgg+ steps and
the ClientApp's own chains of mods: audit, masking, the count floor, DP
clipping) with chosen updates, chosen site sizes, chosen dropouts, hostile
replies and a record of everything the coordinator receives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from uuid import uuid4

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod.utils import make_ffn
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.task_identity import TaskIdentity

from medfed.client.app import EVALUATE_MODS, QUERY_MODS, TRAIN_MODS
from medfed.client.packed_arrays import packed_arrays_mod
from medfed.client.privacy import secagg_mod
from medfed.client.privacy.disclosure import SiteCounts, remember
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import Config, Metric, NodeConfig, Record, SiteKey, Statistic

RUN_ID = 7
# What the grid calls each kind of message when deciding whether a hospital answers it.
STAGES = {
    "train": "upload",
    "train.secagg_advertise": "advertise",
    "train.secagg_share": "share",
    "train.secagg_unmask": "unmask",
    "train.secagg_abort": "abort",
    "train.secagg_confirm": "confirm",
    "evaluate": "evaluate",
    "query": "query",
}


def act_as_coordinator() -> None:
    """Give this process the identity Flower gives a ServerApp process (messages need it)."""
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = 1  # the coordinator's id in Flower
    TaskIdentity.task_id = 1


class InProcessGrid:
    """Hospitals with fixed updates and weights, answering as a deployed node would.

    `run_config` is the run's config at every node (default: a secure run).

    `drop[stage]`: nodes that never answer that stage ("advertise", "share",
    "upload", "confirm", "unmask", "evaluate", "query"); `silent_from[node]`: the round
    from which a node answers nothing at all (as if killed); `stage_silent_from[stage]`:
    the round from which no node answers that stage; `unavailable_from[node]`:
    the round from which the SuperLink answers for it, as Flower does for a node
    whose heartbeats stopped (its own id as sender); `hostile[node]`:
    replaces that node's training reply; `corrupt[(stage, node)]`: rewrites
    the honest reply of that stage (a broken or malicious hospital);
    `alter[(stage, node)]`: rewrites the request of that stage before the node
    handles it (a deviating coordinator, message by message);
    `tamper`: (receiver, sender) share ciphertexts to corrupt in transit;
    `site_counts[node]`: the exact counts its handlers state to the count floor
    (default: 10 training and 10 validation images).
    """

    def __init__(
        self,
        updates: dict[int, dict[str, np.ndarray]],
        weights: dict[int, float],
        run_config: RunConfig | None = None,
    ) -> None:
        act_as_coordinator()
        self.updates, self.weights = updates, weights
        config = (run_config or secure_config()).to_mapping()
        # a floor of 1 lets the tests see exact weights; tests of the floor set their own
        node_config = {NodeConfig.MIN_COUNT: 1}
        self.contexts = {
            node: Context(RUN_ID, node, dict(node_config), RecordDict(), config) for node in updates
        }
        self.sites = {node: f"site-{i}" for i, node in enumerate(updates)}
        self.drop: dict[str, set[int]] = {}
        self.silent_from: dict[int, int] = {}
        self.stage_silent_from: dict[str, int] = {}  # stage -> round from which nobody answers
        self.unavailable_from: dict[int, int] = {}
        self.hostile: dict[int, Callable[[Message], Message]] = {}
        self.corrupt: dict[tuple[str, int], Callable[[Message], Message]] = {}
        self.alter: dict[tuple[str, int], Callable[[Message], Message]] = {}
        self.tamper: set[tuple[int, int]] = set()
        # the metrics a node reports for an evaluate message (default: fixed ones)
        self.evaluation: Callable[[Message, int], dict] = lambda message, node: {
            "loss": 1.0,
            "auc": 0.5,
        }
        self.seen: list[Message] = []  # every reply the coordinator received
        self.pushed: list[Message] = []  # every message the coordinator sent
        self.outbox: list[Message] = []
        self.secrets: dict[int, list[bytes]] = {node: [] for node in updates}
        self.site_counts = {node: SiteCounts(10, 10) for node in updates}
        self.train = make_ffn(self._scripted_training, TRAIN_MODS)
        self.evaluate = make_ffn(self._scripted_evaluation, EVALUATE_MODS)
        self.query = make_ffn(self._scripted_summary, QUERY_MODS)

    def use_config(self, run_config: RunConfig) -> None:
        """Make `run_config` the run's config at every node (the coordinator's own)."""
        for context in self.contexts.values():
            context.run_config = run_config.to_mapping()

    def get_node_ids(self) -> Iterable[int]:
        return list(self.updates)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Handle each message at once; its reply waits to be pulled (ids as Flower sets them)."""
        ids = []
        for message in messages:
            self.pushed.append(message)
            message.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(message.metadata.message_id)
            node = message.metadata.dst_node_id
            if self._silent(message, node):
                continue
            if self.round_of(message) >= self.unavailable_from.get(node, 1 << 30):
                reply = create_message_error_unavailable_res_message(
                    message.metadata, "node_unavail"
                )
                self.outbox.append(reply)
                continue
            stage = STAGES[message.metadata.message_type]
            try:
                if (stage, node) in self.alter:  # the rewritten request keeps the message id
                    altered = self.alter[(stage, node)](message)
                    altered.metadata.__dict__["_message_id"] = message.metadata.message_id
                    message = altered
                # the app-level mod every route of medfed's ClientApp runs first
                handle = functools.partial(self._handle_at, stage, node)
                reply = packed_arrays_mod(message, self.contexts[node], handle)
                if (stage, node) in self.corrupt:
                    reply = self.corrupt[(stage, node)](reply)
            except Exception as err:  # worded as Flower's ClientApp runner words it
                reason = str(type(err)) + ":<'" + str(err) + "'>"
                reply = Message(error=Error(code=1, reason=reason), reply_to=message)
            self.outbox.append(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        ready = [m for m in self.outbox if m.metadata.reply_to_message_id in wanted]
        self.outbox = [m for m in self.outbox if m not in ready]
        self.seen += ready
        return ready

    @staticmethod
    def round_of(message: Message) -> int:
        return int(message.content[Record.CONFIG].get(Config.SERVER_ROUND, 0))

    def _silent(self, message: Message, node: int) -> bool:
        stage = STAGES[message.metadata.message_type]
        server_round = self.round_of(message)
        killed = node in self.silent_from and server_round >= self.silent_from[node]
        killed = killed or server_round >= self.stage_silent_from.get(stage, 1 << 30)
        return killed or node in self.drop.get(stage, set())

    def _handle_at(self, stage: str, node: int, message: Message, _context: Context) -> Message:
        return self._handle(stage, message, node)

    def _handle(self, stage: str, message: Message, node: int) -> Message:
        context = self.contexts[node]
        if stage == "advertise":
            reply = secagg_mod.advertise(message, context)
            state = context.state.config_records[secagg_mod.STATE_KEY]
            self.secrets[node] += [state["c-sk"], state["s-sk"]]
            return reply
        if stage == "share":
            reply = secagg_mod.share(message, context)
            self.secrets[node].append(context.state.config_records[secagg_mod.STATE_KEY]["seed"])
            return reply
        if stage == "upload":
            return self._upload(message, node, context)
        if stage == "abort":
            return secagg_mod.abort(message, context)
        if stage == "confirm":
            return secagg_mod.confirm(message, context)
        if stage == "unmask":
            reply = secagg_mod.unmask(message, context)
            if secagg_mod.STATE_KEY in context.state.config_records:  # next round prepared
                state = context.state.config_records[secagg_mod.STATE_KEY]
                self.secrets[node].append(state["seed"])
            return reply
        if stage == "evaluate":
            return self.evaluate(message, context)
        return self.query(message, context)

    def _upload(self, message: Message, node: int, context: Context) -> Message:
        inbox = message.content.config_records.get(Record.SECAGG)
        for receiver, sender in self.tamper:
            key = f"from.{sender}"
            if inbox is not None and receiver == node and key in inbox:
                corrupted = bytearray(inbox[key])
                corrupted[-1] ^= 1
                inbox[key] = bytes(corrupted)
        if node in self.hostile:
            return self.hostile[node](message)
        reply = self.train(message, context)
        if secagg_mod.NEXT_KEY in context.state.config_records:
            upcoming = context.state.config_records[secagg_mod.NEXT_KEY]
            self.secrets[node] += [upcoming["c-sk"], upcoming["s-sk"]]
        return reply

    def _scripted_training(self, message: Message, context: Context) -> Message:
        """The train handler's contract: received arrays + this node's update, and metrics."""
        node = context.node_id
        start = message.content[Record.ARRAYS]
        trained = {k: start[k].numpy() + self.updates[node][k] for k in self.updates[node]}
        remember(context, self.site_counts[node])
        reply = self.training_reply(message, node, trained)
        cfg = RunConfig.from_mapping(context.run_config, validate=False)
        if cfg.validates_in_training(self.round_of(message)):
            reply.content[Record.VALIDATION] = MetricRecord(self._evaluation_metrics(message, node))
        return reply

    def _scripted_evaluation(self, message: Message, context: Context) -> Message:
        """The evaluate handler's contract: its metrics, its val count as count and weight."""
        node = context.node_id
        remember(context, self.site_counts[node])
        return self._metrics_reply(message, node, self._evaluation_metrics(message, node))

    def _evaluation_metrics(self, message: Message, node: int) -> dict:
        """A validation of the received model: its metrics, its val count as count and weight
        (in an evaluation reply, or in a training reply before the site trains)."""
        val = self.site_counts[node].val
        evaluation = {**self.evaluation(message, node), Metric.NUM_EXAMPLES: val}
        evaluation[Metric.WEIGHT] = val
        return evaluation

    def _scripted_summary(self, message: Message, context: Context) -> Message:
        """The query handler's contract: the site's exact counts (the mods hide them)."""
        node = context.node_id
        counts = self.site_counts[node]
        remember(context, counts)
        summary = {
            Statistic.NUM_TRAIN: counts.train,
            Statistic.NUM_VAL: counts.val,
            Statistic.LABEL_HISTOGRAM: list(counts.histogram),
            Statistic.INTENSITY_HISTOGRAM: [0.5, 0.5],
        }
        return self._metrics_reply(message, node, summary)

    def training_reply(self, message: Message, node: int, arrays: dict[str, np.ndarray]) -> Message:
        """What a hospital's train handler returns: `arrays` and its training metrics."""
        metrics = {
            Metric.TRAIN_LOSS: 1.0,
            Metric.NUM_EXAMPLES: self.site_counts[node].train,
            Metric.WEIGHT: self.weights[node],
            Metric.SKIPPED_FILES: 0,
            Metric.IMAGES_PER_SECOND: 50.0,
            Metric.GENERATED_IMAGES: 0,
        }
        record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return self._metrics_reply(message, node, metrics, record)

    def _metrics_reply(
        self, message: Message, node: int, metrics: dict, arrays: ArrayRecord | None = None
    ) -> Message:
        content = RecordDict(
            {
                Record.METRICS: MetricRecord(metrics),
                Record.SITE: ConfigRecord({SiteKey.NAME: self.sites[node]}),
            }
        )
        if arrays is not None:
            content[Record.ARRAYS] = arrays
        return Message(content=content, reply_to=message)


def train_messages(
    nodes: Iterable[int],
    start: dict[str, np.ndarray],
    server_round: int = 1,
    run_config: RunConfig | None = None,
):
    """Training messages as Flower's strategies build them for `run_config` (one shared
    content): the round, FedProx's mu and the DP wrapper's clipping norm when it sets them."""
    arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    config: dict = {Config.SERVER_ROUND: server_round}
    if run_config is not None and run_config.strategy == "fedprox":
        config[Config.PROXIMAL_MU] = run_config.proximal_mu
    if run_config is not None and run_config.dp_mode == "client":
        config[KEY_CLIPPING_NORM] = run_config.dp_clipping_norm
    content = RecordDict({Record.ARRAYS: arrays, Record.CONFIG: ConfigRecord(config)})
    return [Message(content=content, dst_node_id=node, message_type="train") for node in nodes]


def secure_config(**overrides) -> RunConfig:
    values = {"secure-aggregation": True, "min-nodes": 2, "round-timeout-seconds": 0.2}
    values.update(overrides)
    return RunConfig.from_mapping(values)
