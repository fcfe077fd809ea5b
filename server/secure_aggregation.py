"""SecAgg+ on the coordinator: the workflow the round loop calls for a secure training round.

Four exchanges with the sampled hospitals, each bounded by the round
timeout: advertise keys, share keys (ciphertexts routed through here),
upload the masked update (this is the training message the strategy built,
plus the ciphertexts for that hospital), unmask. In steady state the first
two ride along with the previous round's last two, so a round is two
exchanges. A hospital that drops at any point is recorded with the stage; the
round goes on while the threshold and the quorum hold, and aborts naming the
missing ones when not. The weighted mean is computed here, once, by
unmasking the sum (strategies.GivenMean hands it to the strategy as it is;
only with epsilon accounted does Flower's FedAvg average its identical copies).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from medfed.server.exchange import (
    Exchange,
    QuorumError,
    RoundReplies,
    masked_upload_problems,
    short_reason,
    update_problems,
)
from medfed.server.unmasking import MaskedSum, RoundPlan, SecAggAbort, fractions, plan_round
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import (
    Config,
    Key,
    MessageKind,
    Metric,
    Record,
    Stage,
    mask_purpose,
)
from medfed.shared_models.weights import record_template

STAGE_MESSAGES = {
    Stage.ADVERTISE: MessageKind.SECAGG_ADVERTISE,
    Stage.SHARE: MessageKind.SECAGG_SHARE,
    Stage.UPLOAD: MessageType.TRAIN,
    Stage.UNMASK: MessageKind.SECAGG_UNMASK,
}


@dataclass
class SecureStats:
    """How a secure round went: stage timings, survivors, clipped values, dropouts' stages."""

    stage_seconds: dict[str, float]
    survivors: int
    clipped_values: int
    dropped_at: list[str]  # the stage each dropped hospital was lost at

    def to_json(self) -> dict[str, Any]:
        """The round's `secure-aggregation` entry in metrics.json."""
        return {
            "stage-seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "survivors": self.survivors,
            "clipped-values": self.clipped_values,
        }


@dataclass
class SecureOutcome:
    """What a secure round produced: usable replies, failures, the mean update."""

    replies: list[Message] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # node id -> "stage: reason"
    mean_update: dict[str, np.ndarray] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    clipped_values: int = 0


@dataclass
class Prepared:
    """A round's plan and keys, with the shares once they were exchanged."""

    server_round: int
    plan: RoundPlan
    keys: dict[str, tuple[bytes, bytes]]  # node -> (c-pk, s-pk)
    fraction: dict[str, float]
    shared: dict[str, ConfigRecord]  # node -> its sealed shares ("to.<node>")


class SecureAggregation:
    """Drives the SecAgg+ exchanges of every secure round of one run.

    One object per run: it carries the next round's keys and shares over from
    the round that prepared them. A round whose sampled hospitals differ from
    the prepared ones runs all four exchanges.
    """

    def __init__(self, exchange: Exchange, cfg: RunConfig, run_id: int) -> None:
        self.exchange, self.cfg, self.run_id = exchange, cfg, run_id
        self.prepared: Prepared | None = None
        self.weights: dict[str, float] = {}

    def collect(
        self, server_round: int, messages: list[Message], sent: ArrayRecord
    ) -> RoundReplies:
        """The round's usable replies, each carrying the one unmasked weighted mean.

        Raises QuorumError naming the dropped hospitals when too few are left.
        """
        names = self.exchange.names
        try:
            outcome = self.train_round(server_round, messages, record_template(sent))
        except SecAggAbort as err:
            raise QuorumError(names.in_text(str(err))) from err
        mean = ArrayRecord(
            {
                key: Array((sent[key].numpy() + outcome.mean_update[key]).astype(np.float32))
                for key in sent
            }
        )
        problems = update_problems(mean, sent)
        if problems:
            raise QuorumError(f"round {server_round}: unmasked aggregate unusable: {problems[:3]}")
        result = RoundReplies(sampled=len(messages))
        for reply in outcome.replies:
            names.learn(reply)
            reply.content[Record.ARRAYS] = mean
            result.ok.append(reply)
        result.failed = {names(node): reason for node, reason in outcome.failed.items()}
        result.secure = SecureStats(
            stage_seconds=outcome.stage_seconds,
            survivors=len(outcome.replies),
            clipped_values=outcome.clipped_values,
            dropped_at=[why.split(":")[0] for why in outcome.failed.values()],
        )
        return result

    def train_round(
        self,
        server_round: int,
        train_messages: list[Message],
        template: Mapping[str, tuple[int, ...]],
    ) -> SecureOutcome:
        """One secure round over the strategy's training messages; SecAggAbort if it fails."""
        result = SecureOutcome()
        by_node = {str(m.metadata.dst_node_id): m for m in train_messages}
        prepared = self._prepared(server_round, list(by_node), result)
        summed = MaskedSum(
            template, self.cfg.secagg_clipping_range, self.cfg.secagg_quantization_bits,
            prepared.plan,
        )  # fmt: skip
        next_keys = self._upload(prepared, by_node, summed, result)
        self._unmask(prepared, summed, next_keys, result)
        return result

    def _prepared(self, server_round: int, nodes: list[str], result: SecureOutcome) -> Prepared:
        """The round prepared during the previous one, else a fresh advertise and share."""
        prepared, self.prepared = self.prepared, None
        if (
            prepared
            and prepared.server_round == server_round
            and set(prepared.shared) == set(nodes)
        ):
            return prepared
        return self._set_up(server_round, nodes, result)

    def _set_up(self, server_round: int, nodes: list[str], result: SecureOutcome) -> Prepared:
        """The advertise and share exchanges, for a round nothing was prepared for."""
        started = time.monotonic()
        ads = self._exchange(
            Stage.ADVERTISE, {node: _content(server_round) for node in nodes}, result
        )
        keys = {}
        for node, reply in ads.items():
            keys[node] = (
                reply.content[Record.SECAGG][Key.C_PK],
                reply.content[Record.SECAGG][Key.S_PK],
            )
            self.weights[node] = float(reply.content[Record.METRICS][Metric.WEIGHT])
        self._require(keys, server_round, Stage.ADVERTISE, result)
        try:
            plan = plan_round(list(keys), self.cfg.secagg_neighbours, self.cfg.secagg_threshold)
        except ValueError as err:
            raise SecAggAbort(f"round {server_round}: {err}") from err
        prepared = Prepared(server_round, plan, keys, self._fractions(keys), {})
        result.stage_seconds[Stage.ADVERTISE] = time.monotonic() - started

        started = time.monotonic()
        shared = self._exchange(
            Stage.SHARE, {node: self._share_content(prepared, node) for node in keys}, result
        )
        self._require(shared, server_round, Stage.SHARE, result, plan.threshold)
        result.stage_seconds[Stage.SHARE] = time.monotonic() - started
        prepared.shared = {
            node: r.content.config_records[Record.SECAGG] for node, r in shared.items()
        }
        return prepared

    def _upload(
        self,
        prepared: Prepared,
        by_node: Mapping[str, Message],
        summed: MaskedSum,
        result: SecureOutcome,
    ) -> dict[str, tuple[bytes, bytes]]:
        """Send each hospital its training message with its neighbours' shares; add the
        masked uploads. Returns the next round's public keys that rode along."""
        started = time.monotonic()
        uploads = {}
        for node in prepared.shared:
            inbox = {
                Key.FROM_PREFIX + sender: sealed[Key.TO_PREFIX + node]
                for sender, sealed in prepared.shared.items()
                if Key.TO_PREFIX + node in sealed
            }
            # Flower's strategies share one content object between all their
            # messages: each hospital's inbox needs its own.
            content = RecordDict(dict(by_node[node].content.items()))
            content[Record.SECAGG] = ConfigRecord(inbox)
            uploads[node] = content
        next_keys = {}
        for node, reply in self._exchange(Stage.UPLOAD, uploads, result).items():
            arrays = reply.content.array_records.get(Record.ARRAYS)
            problems = masked_upload_problems(arrays, summed.size)
            if problems:
                result.failed[int(node)] = f"{Stage.UPLOAD}: rejected masked update: " + "; ".join(
                    problems
                )
                continue
            summed.add(node, arrays[Key.MASKED_ARRAY].numpy())
            result.replies.append(reply)
            metrics = reply.content[Record.METRICS]
            self.weights[node] = float(metrics[Metric.WEIGHT])
            result.clipped_values += int(metrics.get(Metric.SECAGG_CLIPPED, 0))
            ahead = reply.content.config_records.get(Record.SECAGG)
            if ahead is not None:
                next_keys[node] = (
                    ahead[Key.NEXT_PREFIX + Key.C_PK],
                    ahead[Key.NEXT_PREFIX + Key.S_PK],
                )
        server_round = prepared.server_round
        self._require(
            dict.fromkeys(summed.added), server_round, Stage.UPLOAD, result, prepared.plan.threshold
        )
        result.stage_seconds[Stage.UPLOAD] = time.monotonic() - started
        return next_keys

    def _unmask(
        self,
        prepared: Prepared,
        summed: MaskedSum,
        next_keys: dict[str, tuple[bytes, bytes]],
        result: SecureOutcome,
    ) -> None:
        """Ask the survivors for the shares that remove the masks (and for the next
        round's shares, when it can be prepared); unmask the weighted mean."""
        started = time.monotonic()
        server_round = prepared.server_round
        survivors = list(summed.added)
        dropped = sorted(set(prepared.shared) - set(survivors), key=int)
        ahead = self._plan_ahead(server_round + 1, next_keys)
        contents = {}
        for node in survivors:
            content = _content(server_round, {Key.SURVIVORS: survivors, Key.DROPPED: dropped})
            if ahead and node in ahead.plan.participants:
                shares_ahead = self._share_content(ahead, node)
                content[Record.NEXT_CONFIG] = shares_ahead[Record.CONFIG]
                content[Record.NEXT_SECAGG] = shares_ahead[Record.SECAGG]
            contents[node] = content
        answers = self._exchange(Stage.UNMASK, contents, result)
        if ahead:
            ahead.shared = {
                node: reply.content.config_records[Record.NEXT_SEALED]
                for node, reply in answers.items()
                if Record.NEXT_SEALED in reply.content.config_records
            }
            self.prepared = ahead
        try:
            result.mean_update = summed.unmask(
                {node: pair[1] for node, pair in prepared.keys.items()},
                {node: dict(reply.content[Record.SECAGG]) for node, reply in answers.items()},
                dropped=dropped,
                fraction_sum=sum(prepared.fraction[n] for n in survivors),
                purpose=mask_purpose(self.run_id, server_round),
            )
        except SecAggAbort as err:
            raise SecAggAbort(f"round {server_round}: {err}; {_missing(result)}") from err
        result.stage_seconds[Stage.UNMASK] = time.monotonic() - started

    def _plan_ahead(
        self, server_round: int, next_keys: dict[str, tuple[bytes, bytes]]
    ) -> Prepared | None:
        """The next round's plan over the hospitals that sent keys for it, if one is possible."""
        if len(next_keys) < max(self.cfg.min_nodes, 2):
            return None
        try:
            plan = plan_round(
                list(next_keys), self.cfg.secagg_neighbours, self.cfg.secagg_threshold
            )
        except ValueError:
            return None  # the next round sets itself up and reports the problem
        return Prepared(server_round, plan, dict(next_keys), self._fractions(next_keys), {})

    def _fractions(self, nodes: Mapping[str, object]) -> dict[str, float]:
        return fractions({node: self.weights[node] for node in nodes})

    def _share_content(self, prepared: Prepared, node: str) -> RecordDict:
        """What one hospital needs to share its secrets with its group."""
        plan = prepared.plan
        secagg = {Key.X_PREFIX + n: plan.xs[n] for n in plan.group(node)}
        for other in plan.neighbours[node]:
            c_pk, s_pk = prepared.keys[other]
            secagg[Key.C_PK_PREFIX + other], secagg[Key.S_PK_PREFIX + other] = c_pk, s_pk
        content = _content(
            prepared.server_round,
            {
                Key.THRESHOLD: plan.threshold,
                Key.FRACTION: prepared.fraction[node],
                Key.WEIGHT: self.weights[node],
                Key.CLIPPING_RANGE: self.cfg.secagg_clipping_range,
                Key.QUANTIZATION_BITS: self.cfg.secagg_quantization_bits,
            },
        )
        content[Record.SECAGG] = ConfigRecord(secagg)
        return content

    def _exchange(
        self, stage: str, contents: Mapping[str, RecordDict], result: SecureOutcome
    ) -> dict[str, Message]:
        """Send one stage; the good replies by node id, failures recorded with the stage."""
        messages = [
            Message(content=content, dst_node_id=int(node), message_type=STAGE_MESSAGES[stage])
            for node, content in contents.items()
        ]
        good: dict[str, Message] = {}
        for reply in self.exchange.send(messages):
            node = str(reply.metadata.src_node_id)
            if reply.has_error():
                result.failed[int(node)] = f"{stage}: {short_reason(reply.error.reason)}"
            else:
                good[node] = reply
        for node in set(contents) - set(good) - {str(n) for n in result.failed}:
            result.failed[int(node)] = f"{stage}: {self.exchange.silence()}"
        return good

    def _require(
        self,
        alive: Mapping,
        server_round: int,
        stage: str,
        result: SecureOutcome,
        threshold: int = 2,
    ) -> None:
        needed = max(self.cfg.min_nodes, threshold)
        if len(alive) < needed:
            raise SecAggAbort(
                f"round {server_round} secure aggregation, {stage} stage: {len(alive)} "
                f"hospitals left, {needed} needed (quorum 'min-nodes' {self.cfg.min_nodes}, "
                f"threshold {threshold}); {_missing(result)}"
            )


def _content(server_round: int, extra: Mapping | None = None) -> RecordDict:
    return RecordDict(
        {Record.CONFIG: ConfigRecord({Config.SERVER_ROUND: server_round, **dict(extra or {})})}
    )


def _missing(result: SecureOutcome) -> str:
    return "dropped: " + (
        ", ".join(f"node {n} ({why})" for n, why in sorted(result.failed.items())) or "none"
    )
