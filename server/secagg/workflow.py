"""SecAgg+ on the coordinator: the workflow the round loop calls for a secure training round.

Four exchanges with the sampled hospitals, each bounded by the round
timeout: advertise keys, share keys (ciphertexts routed through here),
upload the masked update (this is the training message the strategy built,
plus the ciphertexts for that hospital), unmask. In steady state the first
two ride along with the previous round's last two, so a round is two
exchanges. A hospital that drops at any point is recorded with the stage; the
round goes on while the threshold and the quorum hold, and aborts naming the
missing ones when not. Every reply is checked before it is used: a malformed
one drops its hospital, never the round. Each hospital weighs its own update
inside the masked vector, so the coordinator chooses no one's weight. The
weighted mean is computed here, once, by unmasking the sum
(strategies.GivenMean hands it to the strategy as it is; only with epsilon
accounted does Flower's FedAvg average its identical copies).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from medfed.server.run.replies import (
    QuorumError,
    ReplyCollector,
    RoundReplies,
    error_reason,
    keep_consistent_metrics,
    metrics_problems,
    update_problems,
)
from medfed.server.secagg.stage_replies import (
    MalformedReply,
    advertised_keys,
    masked_upload_problems,
    public_keys,
    returned_shares,
    sealed_shares,
)
from medfed.server.secagg.stats import SecureStats
from medfed.server.secagg.unmasking import (
    Commitments,
    MaskedSum,
    RoundPlan,
    SecAggAbort,
    plan_round,
    survivors_connected,
)
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import (
    SECAGG_MIN_PARTICIPANTS,
    Config,
    Key,
    MessageKind,
    Metric,
    Record,
    Stage,
    mask_purpose,
)
from medfed.shared_models.round_terms import model_digest, round_digest, run_config_digest
from medfed.shared_models.secagg.quantize import encoded_weight
from medfed.shared_models.weights import record_template

STAGE_MESSAGES = {
    Stage.ADVERTISE: MessageKind.SECAGG_ADVERTISE,
    Stage.SHARE: MessageKind.SECAGG_SHARE,
    Stage.UPLOAD: MessageType.TRAIN,
    Stage.CONFIRM: MessageKind.SECAGG_CONFIRM,
    Stage.UNMASK: MessageKind.SECAGG_UNMASK,
}


@dataclass
class SecureOutcome:
    """What a secure round produced: usable replies, failures, the mean update."""

    replies: list[Message] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # node id -> "stage: reason"
    mean_update: dict[str, np.ndarray] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    clipped_values: int = 0
    notes: list[str] = field(default_factory=list)  # hospitals that returned bad shares


@dataclass
class Prepared:
    """A round's plan and public keys, with the shares once they were exchanged."""

    server_round: int
    plan: RoundPlan
    keys: dict[str, tuple[bytes, bytes]]  # node -> (c-pk, s-pk)
    shared: dict[str, ConfigRecord] = field(default_factory=dict)  # node -> its sealed shares

    def commitments(self, run_id: int) -> Commitments:
        """The public keys, seed hashes and share commitments the round's shares and
        secrets are checked against."""
        hashes = {node: bytes(record[Key.SEED_HASH]) for node, record in self.shared.items()}
        return Commitments(run_id, self.server_round, self.keys, hashes, dict(self.shared))


class SecureAggregation:
    """Drives the SecAgg+ exchanges of every secure round of one run.

    One object per run: it carries the next round's keys and shares over from
    the round that prepared them. A round whose sampled hospitals differ from
    the prepared ones runs all four exchanges.
    """

    def __init__(
        self, replies: ReplyCollector, cfg: RunConfig, run_id: int, run_config: bytes | None = None
    ) -> None:
        """`run_config`: the digest of the run's config as Flower hands it to the apps
        (round_terms.run_config_digest of `context.run_config`; default: of `cfg`'s)."""
        self.replies, self.cfg, self.run_id = replies, cfg, run_id
        self.run_config = run_config or run_config_digest(cfg.to_mapping())
        self.prepared: Prepared | None = None

    def collect(
        self, server_round: int, messages: list[Message], sent: ArrayRecord
    ) -> RoundReplies:
        """The round's usable replies, each carrying the one unmasked weighted mean.

        Raises QuorumError naming the dropped hospitals when too few are left.
        """
        names = self.replies.names
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
        result.notes += [names.in_text(note) for note in outcome.notes]
        for reply in outcome.replies:
            names.learn(reply)
            reply.content[Record.ARRAYS] = mean
            result.ok.append(reply)
        result.failed = {names(node): reason for node, reason in outcome.failed.items()}
        keep_consistent_metrics(result, names)
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
        """One secure round over the strategy's training messages; SecAggAbort if it fails.

        On an abort, every hospital of the round is told to forget its secrets.
        """
        result = SecureOutcome()
        by_node = {str(m.metadata.dst_node_id): m for m in train_messages}
        try:
            terms = self._round_terms(server_round, train_messages)
            prepared = self._prepared(server_round, list(by_node), result)
            summed = MaskedSum(template, self.cfg.secagg_encoding(), prepared.plan)
            next_keys = self._upload(prepared, by_node, summed, result)
            self._unmask(prepared, summed, next_keys, result, terms)
        except SecAggAbort:
            self._abort(server_round, list(by_node))
            raise
        return result

    def _advertised(self, reply: Message) -> tuple[bytes, bytes]:
        """An advertise reply's public keys, from a hospital holding this run's config."""
        return advertised_keys(reply, self.run_config)

    def _round_terms(self, server_round: int, messages: list[Message]) -> bytes:
        """The digest of the round's terms the hospitals bind their pairwise masks to: the
        run config, the training message's settings and the global model (one for all)."""
        contents = {id(m.content): m.content for m in messages}  # strategies share one
        digests = {
            round_digest(self.run_config, c[Record.CONFIG], model_digest(c[Record.ARRAYS]))
            for c in contents.values()
        }
        if len(digests) != 1:
            raise SecAggAbort(f"round {server_round}: the training messages differ between nodes")
        return digests.pop()

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
        keys = self._distinct_keys(
            {node: self._parsed(Stage.ADVERTISE, node, self._advertised, reply, result)
             for node, reply in ads.items()},
            result,
        )  # fmt: skip
        self._require(keys, server_round, Stage.ADVERTISE, result)
        try:
            plan = plan_round(list(keys), self.cfg.secagg_neighbours, self.cfg.secagg_threshold)
        except ValueError as err:
            raise SecAggAbort(f"round {server_round}: {err}") from err
        prepared = Prepared(server_round, plan, keys)
        result.stage_seconds[Stage.ADVERTISE] = time.monotonic() - started

        started = time.monotonic()
        replies = self._exchange(
            Stage.SHARE, {node: self._share_content(prepared, node) for node in keys}, result
        )
        for node, reply in replies.items():
            record = reply.content.config_records.get(Record.SECAGG)
            neighbours = plan.neighbours[node]
            checked = self._parsed(
                Stage.SHARE,
                node,
                lambda r, d=node, n=neighbours: sealed_shares(r, d, n),
                record,
                result,
            )
            if checked is not None:
                prepared.shared[node] = checked
        self._require(prepared.shared, server_round, Stage.SHARE, result, plan.threshold)
        result.stage_seconds[Stage.SHARE] = time.monotonic() - started
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
            inbox = {}
            for sender, sealed in prepared.shared.items():
                if Key.TO_PREFIX + node in sealed:  # its ciphertext, and what it committed to
                    inbox[Key.FROM_PREFIX + sender] = sealed[Key.TO_PREFIX + node]
                    for prefix in (Key.SEED_COMMIT_PREFIX, Key.KEY_COMMIT_PREFIX):
                        inbox[prefix + sender] = sealed[prefix + node]
            # Flower's strategies share one content object between all their
            # messages: each hospital's inbox needs its own.
            content = RecordDict(dict(by_node[node].content.items()))
            content[Record.SECAGG] = ConfigRecord(inbox)
            uploads[node] = content
        next_keys = {}
        for node, reply in self._exchange(Stage.UPLOAD, uploads, result).items():
            arrays = reply.content.array_records.get(Record.ARRAYS)
            problems = masked_upload_problems(arrays, summed.size) + metrics_problems(reply)
            problems += [p for p in [self.replies.names.problem(reply)] if p]
            if problems:
                result.failed[int(node)] = f"{Stage.UPLOAD}: rejected reply: " + "; ".join(
                    problems[:3]
                )
                continue
            weight = float(reply.content[Record.METRICS][Metric.WEIGHT])
            participants = len(prepared.plan.participants)
            summed.add(
                node,
                arrays[Key.MASKED_ARRAY].numpy(),
                encoded_weight(weight, summed.encoding, participants),
            )
            result.replies.append(reply)
            ahead = _next_keys(reply)
            if ahead is not None:
                next_keys[node] = ahead
        self._require(
            summed.added, prepared.server_round, Stage.UPLOAD, result, prepared.plan.threshold
        )
        result.stage_seconds[Stage.UPLOAD] = time.monotonic() - started
        return next_keys

    def _unmask(
        self,
        prepared: Prepared,
        summed: MaskedSum,
        next_keys: dict[str, tuple[bytes, bytes]],
        result: SecureOutcome,
        terms: bytes,
    ) -> None:
        """Ask the survivors for the shares that remove the masks (and for the next
        round's shares, when it can be prepared); unmask the weighted mean."""
        started = time.monotonic()
        server_round, plan = prepared.server_round, prepared.plan
        survivors = list(summed.added)
        # every planned hospital not surviving is dropped, so each hospital's group is
        # accounted for; only those that shared keys have masks to remove
        dropped = sorted(set(plan.participants) - set(survivors), key=int)
        shared_then_lost = [n for n in dropped if n in prepared.shared]
        self._require_unmaskable(prepared, survivors, dropped, result)
        ahead = self._plan_ahead(server_round + 1, next_keys)
        tags = self._confirmed(prepared, dropped, result) if shared_then_lost else {}
        contents = {
            node: self._unmask_content(prepared, node, dropped, ahead) for node in survivors
        }
        for node, relayed in tags.items():
            contents[node][Record.SECAGG] = ConfigRecord(relayed)
        answers = self._exchange(Stage.UNMASK, contents, result)
        responses = {}
        for node, reply in answers.items():
            allowed = {Key.SEED_SHARE_PREFIX + n for n in survivors if n in plan.group(node)}
            allowed |= {Key.KEY_SHARE_PREFIX + n for n in dropped if n in plan.group(node)}
            shares = self._parsed(
                Stage.UNMASK, node, lambda r, a=allowed: returned_shares(r, a), reply, result
            )
            if shares is not None:
                responses[node] = shares
        if ahead:
            ahead.shared = _next_sealed(answers, ahead.plan)
            self.prepared = ahead
        try:
            result.mean_update, _ = summed.unmask(
                prepared.commitments(self.run_id),
                responses,
                dropped=shared_then_lost,
                purpose=mask_purpose(self.run_id, server_round, terms),
            )
        except SecAggAbort as err:
            raise SecAggAbort(f"round {server_round}: {err}; {_missing(result)}") from err
        else:
            result.clipped_values = summed.clipped
        finally:
            result.notes += [
                f"node {node} {why}" for node, why in sorted(summed.bad_shares.items())
            ]
        result.stage_seconds[Stage.UNMASK] = time.monotonic() - started

    def _require_unmaskable(
        self, prepared: Prepared, survivors: list[str], dropped: list[str], result: SecureOutcome
    ) -> None:
        """Abort, asking for no share, when unmasking would reveal less than the round's sum
        (a split neighbour graph) or a sum with less DP noise than the run promises."""
        server_round = prepared.server_round
        if not survivors_connected(prepared.plan, survivors):
            raise SecAggAbort(
                f"round {server_round}: the dropouts split the surviving hospitals' "
                f"neighbourhoods (unmasking would reveal partial sums); {_missing(result)}"
            )
        if dropped and self.cfg.noise_at_hospitals:
            raise SecAggAbort(
                f"round {server_round}: {len(dropped)} hospital(s) planned for it are lost, and "
                "each carries a share of the DP noise (dp.noise at the hospitals): the sum "
                f"would hold less noise than the run promises; {_missing(result)}"
            )

    def _confirmed(
        self, prepared: Prepared, dropped: list[str], result: SecureOutcome
    ) -> dict[str, dict[str, bytes]]:
        """With hospitals dropped, the consistency step: every survivor commits to the
        round's view and tags it for its neighbours; returns, per survivor, the tags its
        neighbours made for it (relayed with its unmask request)."""
        started = time.monotonic()
        survivors = [n for n in prepared.plan.participants if n not in dropped]
        view = _content(prepared.server_round, {Key.SURVIVORS: survivors, Key.DROPPED: dropped})
        answers = self._exchange(Stage.CONFIRM, dict.fromkeys(survivors, view), result)
        relayed: dict[str, dict[str, bytes]] = {node: {} for node in survivors}
        for sender, reply in answers.items():
            record = reply.content.config_records.get(Record.SECAGG) or {}
            for key, tag in record.items():
                receiver = key.removeprefix(Key.TAG_PREFIX)
                if (
                    key.startswith(Key.TAG_PREFIX)
                    and receiver in relayed
                    and isinstance(tag, bytes)
                ):
                    relayed[receiver][Key.TAG_PREFIX + sender] = tag
        result.stage_seconds[Stage.CONFIRM] = time.monotonic() - started
        return relayed

    def _plan_ahead(
        self, server_round: int, next_keys: dict[str, tuple[bytes, bytes]]
    ) -> Prepared | None:
        """The next round's plan over the hospitals that sent keys for it, if one is possible
        (never past the run's last round: no hospital keeps secrets for a round to come)."""
        if server_round > self.cfg.num_server_rounds:
            return None
        if len(next_keys) < max(self.cfg.min_nodes, SECAGG_MIN_PARTICIPANTS):
            return None
        try:
            plan = plan_round(
                list(next_keys), self.cfg.secagg_neighbours, self.cfg.secagg_threshold
            )
        except ValueError:
            return None  # the next round sets itself up and reports the problem
        return Prepared(server_round, plan, dict(next_keys))

    def _share_content(self, prepared: Prepared, node: str) -> RecordDict:
        """What one hospital needs to share its secrets with its group."""
        plan = prepared.plan
        secagg = {Key.X_PREFIX + n: plan.xs[n] for n in plan.group(node)}
        for other in plan.neighbours[node]:
            c_pk, s_pk = prepared.keys[other]
            secagg[Key.C_PK_PREFIX + other], secagg[Key.S_PK_PREFIX + other] = c_pk, s_pk
        content = _content(
            prepared.server_round,
            {Key.THRESHOLD: plan.threshold, Key.PARTICIPANTS: len(plan.participants)},
        )
        content[Record.SECAGG] = ConfigRecord(secagg)
        return content

    def _unmask_content(
        self, prepared: Prepared, node: str, dropped: list[str], ahead: Prepared | None
    ) -> RecordDict:
        """Who survived and who dropped; with the next round planned, its share request."""
        survivors = [n for n in prepared.shared if n not in dropped]
        content = _content(prepared.server_round, {Key.SURVIVORS: survivors, Key.DROPPED: dropped})
        if ahead and node in ahead.plan.participants:
            shares_ahead = self._share_content(ahead, node)
            content[Record.NEXT_CONFIG] = shares_ahead[Record.CONFIG]
            content[Record.NEXT_SECAGG] = shares_ahead[Record.SECAGG]
        return content

    def _abort(self, server_round: int, nodes: list[str]) -> None:
        """Tell every hospital of the round to forget its secrets (no reply awaited)."""
        self.prepared = None
        messages = [
            Message(
                content=_content(server_round),
                dst_node_id=int(node),
                message_type=MessageKind.SECAGG_ABORT,
            )
            for node in nodes
        ]
        self.replies.exchange.grid.push_messages(messages)

    def _distinct_keys(
        self, keys: Mapping[str, tuple[bytes, bytes] | None], result: SecureOutcome
    ) -> dict[str, tuple[bytes, bytes]]:
        """The well-formed key pairs; any key advertised twice drops every node that sent it."""
        valid = {node: pair for node, pair in keys.items() if pair is not None}
        counts = Counter(key for pair in valid.values() for key in pair)
        for node, pair in list(valid.items()):
            if any(counts[key] > 1 for key in pair):
                result.failed[int(node)] = f"{Stage.ADVERTISE}: a public key another node also sent"
                del valid[node]
        return valid

    @staticmethod
    def _parsed(
        stage: str,
        node: str,
        parse: Callable[[Any], Any],
        reply: Any,
        result: SecureOutcome,
    ) -> Any:
        """`parse(reply)`, or None with the node recorded as failed when it is malformed."""
        try:
            return parse(reply)
        except MalformedReply as err:
            result.failed[int(node)] = f"{stage}: malformed reply: {err}"
            return None

    def _exchange(
        self, stage: str, contents: Mapping[str, RecordDict], result: SecureOutcome
    ) -> dict[str, Message]:
        """Send one stage; the good replies by node id, failures recorded with the stage."""
        messages = [
            Message(content=content, dst_node_id=int(node), message_type=STAGE_MESSAGES[stage])
            for node, content in contents.items()
        ]
        good: dict[str, Message] = {}
        delivery = self.replies.exchange.send(messages)
        for answer in delivery.answers:
            node = str(answer.node)
            if answer.reply.has_error():
                result.failed[int(node)] = f"{stage}: {error_reason(answer)}"
            else:
                good[node] = answer.reply
        for node in set(contents) - set(good) - {str(n) for n in result.failed}:
            result.failed[int(node)] = f"{stage}: {self.replies.silence(delivery.waited)}"
        return good

    def _require(
        self,
        alive: Collection,
        server_round: int,
        stage: str,
        result: SecureOutcome,
        threshold: int = 2,
    ) -> None:
        needed = max(self.cfg.min_nodes, threshold, SECAGG_MIN_PARTICIPANTS)
        if len(alive) < needed:
            raise SecAggAbort(
                f"round {server_round} secure aggregation, {stage} stage: {len(alive)} "
                f"hospitals left, {needed} needed (quorum 'min-nodes' {self.cfg.min_nodes}, "
                f"threshold {threshold}, at least {SECAGG_MIN_PARTICIPANTS}); {_missing(result)}"
            )


def _next_keys(reply: Message) -> tuple[bytes, bytes] | None:
    """The next round's public keys riding on an upload, if valid (else that round sets
    itself up, and its advertise step names a hospital whose keys are refused)."""
    try:
        return public_keys(reply.content.config_records.get(Record.SECAGG), Key.NEXT_PREFIX)
    except MalformedReply:
        return None


def _next_sealed(answers: Mapping[str, Message], plan: RoundPlan) -> dict[str, ConfigRecord]:
    """The next round's shares riding on the unmask replies; a malformed one is left out
    (that round then sets itself up again)."""
    shared = {}
    for node, reply in answers.items():
        if node not in plan.participants:
            continue
        try:
            record = reply.content.config_records.get(Record.NEXT_SEALED)
            shared[node] = sealed_shares(record, node, plan.neighbours[node])
        except MalformedReply:
            continue
    return shared


def _content(server_round: int, extra: Mapping | None = None) -> RecordDict:
    return RecordDict(
        {Record.CONFIG: ConfigRecord({Config.SERVER_ROUND: server_round, **dict(extra or {})})}
    )


def _missing(result: SecureOutcome) -> str:
    return "dropped: " + (
        ", ".join(f"node {n} ({why})" for n, why in sorted(result.failed.items())) or "none"
    )
