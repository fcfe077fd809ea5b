"""One SecAgg+ training round over a Flower Grid (Message API).

Four exchanges with the sampled hospitals, each bounded by the round
timeout: advertise keys, share keys (ciphertexts routed through here),
upload the masked update (this is the training message the strategy
built, plus the ciphertexts for that hospital), unmask. In steady state the
first two ride along with the previous round's last two. A hospital that
drops at any point is recorded with the stage; the round goes on while the
threshold and the quorum hold, and aborts naming the missing ones when not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from medfed.client.secure_stage import MASKED_KEY
from medfed.server.messaging import send_and_receive
from medfed.server.secagg import MaskedSum, RoundPlan, SecAggAbort, fractions, plan_round
from medfed.shared_models.config import RunConfig

ADVERTISE, SHARE, UPLOAD, UNMASK = "advertise", "share", "upload", "unmask"


@dataclass
class SecureRound:
    """What a secure round produced: usable replies, failures, the mean update."""

    replies: list[Message] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # node id -> reason
    mean_update: dict[str, np.ndarray] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    clipped_values: int = 0


def _reason(reply: Message) -> str:
    lines = [line.strip() for line in reply.error.reason.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:300]


@dataclass
class Prepared:
    """A round whose keys and shares were already exchanged during the previous one."""

    server_round: int
    plan: RoundPlan
    keys: dict[str, tuple[bytes, bytes]]
    fraction: dict[str, float]
    shared: dict[str, ConfigRecord]  # node -> its sealed shares ("to.<node>")


class SecureAggregation:
    """Drives the SecAgg+ exchanges for the round loop.

    In steady state a round is two exchanges, not four: each masked upload
    carries the hospital's public keys for the next round, and each unmask
    reply carries its encrypted shares for the next round. A round whose
    sampled hospitals differ from the prepared ones runs all four.
    """

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        run_id: int,
        on_traffic: Callable[[list[Message], list[Message]], None] = lambda sent, got: None,
    ) -> None:
        self.grid, self.cfg, self.run_id = grid, cfg, run_id
        self.on_traffic = on_traffic
        self.prepared: Prepared | None = None
        self.weights: dict[str, float] = {}

    def train_round(
        self,
        server_round: int,
        train_messages: list[Message],
        template: Mapping[str, tuple[int, ...]],
    ) -> SecureRound:
        result = SecureRound()
        by_node = {str(m.metadata.dst_node_id): m for m in train_messages}
        prepared = self.prepared
        self.prepared = None
        if not (
            prepared
            and prepared.server_round == server_round
            and set(prepared.shared) == set(by_node)
        ):
            prepared = self._set_up(server_round, list(by_node), result)
        plan, keys, fraction, shared = (
            prepared.plan,
            prepared.keys,
            prepared.fraction,
            prepared.shared,
        )

        started = time.monotonic()
        uploads = {}
        for node in shared:
            inbox = {
                f"from.{sender}": sealed[f"to.{node}"]
                for sender, sealed in shared.items()
                if f"to.{node}" in sealed
            }
            # Flower's strategies share one content object between all their
            # messages: each hospital's inbox needs its own.
            content = RecordDict(dict(by_node[node].content.items()))
            content["secagg"] = ConfigRecord(inbox)
            uploads[node] = content
        summed = MaskedSum(
            template,
            self.cfg.secagg_clipping_range,
            self.cfg.secagg_quantization_bits,
            len(plan.participants),
        )
        uploaded = self._exchange(UPLOAD, uploads, result, keep_messages=True)
        next_keys = {}
        for node, reply in uploaded.items():
            arrays = reply.content["arrays"]
            if list(arrays) != [MASKED_KEY]:
                result.failed[int(node)] = f"{UPLOAD}: expected one '{MASKED_KEY}' array"
                continue
            masked = arrays[MASKED_KEY].numpy()
            problems = summed.problems(masked)
            if problems:
                result.failed[int(node)] = f"{UPLOAD}: rejected masked update: " + "; ".join(
                    problems
                )
                continue
            summed.add(node, masked)
            result.replies.append(reply)
            metrics = reply.content["metrics"]
            self.weights[node] = float(metrics["aggregation-weight"])
            result.clipped_values += int(metrics.get("secagg-clipped-values", 0))
            if "secagg" in reply.content.config_records:
                ahead = reply.content.config_records["secagg"]
                next_keys[node] = (ahead["next.c-pk"], ahead["next.s-pk"])
        survivors = list(summed.added)
        dropped = sorted(set(shared) - set(survivors), key=int)
        self._require(dict.fromkeys(survivors), server_round, UPLOAD, result, plan.threshold)
        result.stage_seconds[UPLOAD] = time.monotonic() - started

        started = time.monotonic()
        ahead = self._plan_ahead(server_round + 1, next_keys)
        contents = {}
        for node in survivors:
            content = self._content(server_round, {"survivors": survivors, "dropped": dropped})
            if ahead and node in ahead.plan.participants:
                shares_ahead = self._share_content(
                    ahead.server_round, ahead.plan, node, ahead.keys, ahead.fraction[node]
                )
                content["next-config"] = shares_ahead["config"]
                content["next-secagg"] = shares_ahead["secagg"]
            contents[node] = content
        answers = self._exchange(UNMASK, contents, result)
        responses = {node: dict(reply["secagg"]) for node, reply in answers.items()}
        if ahead:
            ahead.shared = {
                node: reply.config_records["next-sealed"]
                for node, reply in answers.items()
                if "next-sealed" in reply.config_records
            }
            self.prepared = ahead
        try:
            result.mean_update = summed.unmask(
                plan,
                {node: pair[1] for node, pair in keys.items()},
                dropped,
                responses,
                sum(fraction[n] for n in survivors),
                self.run_id,
                server_round,
            )
        except SecAggAbort as err:
            raise SecAggAbort(f"round {server_round}: {err}; {self._missing(result)}") from err
        result.stage_seconds[UNMASK] = time.monotonic() - started
        return result

    def _set_up(self, server_round: int, nodes: list[str], result: SecureRound) -> Prepared:
        """The advertise and share exchanges, for a round nothing was prepared for."""
        started = time.monotonic()
        ads = self._exchange(
            ADVERTISE, {node: self._content(server_round) for node in nodes}, result
        )
        keys = {}
        for node, reply in ads.items():
            keys[node] = (reply["secagg"]["c-pk"], reply["secagg"]["s-pk"])
            self.weights[node] = float(reply["metrics"]["aggregation-weight"])
        self._require(keys, server_round, ADVERTISE, result)
        try:
            plan = plan_round(list(keys), self.cfg.secagg_neighbours, self.cfg.secagg_threshold)
        except ValueError as err:
            raise SecAggAbort(f"round {server_round}: {err}") from err
        fraction = fractions({node: self.weights[node] for node in keys})
        result.stage_seconds[ADVERTISE] = time.monotonic() - started

        started = time.monotonic()
        shared = self._exchange(
            SHARE,
            {
                node: self._share_content(server_round, plan, node, keys, fraction[node])
                for node in keys
            },
            result,
        )
        self._require(shared, server_round, SHARE, result, plan.threshold)
        result.stage_seconds[SHARE] = time.monotonic() - started
        sealed = {node: reply.config_records["secagg"] for node, reply in shared.items()}
        return Prepared(server_round, plan, keys, fraction, sealed)

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
        fraction = fractions({node: self.weights[node] for node in next_keys})
        return Prepared(server_round, plan, dict(next_keys), fraction, {})

    @staticmethod
    def _content(server_round: int, extra: Mapping | None = None) -> RecordDict:
        return RecordDict(
            {"config": ConfigRecord({"server-round": server_round, **dict(extra or {})})}
        )

    def _share_content(
        self,
        server_round: int,
        plan: RoundPlan,
        node: str,
        keys: Mapping[str, tuple[bytes, bytes]],
        fraction: float,
    ) -> RecordDict:
        secagg = {f"x.{n}": plan.xs[n] for n in plan.group(node)}
        for other in plan.neighbours[node]:
            secagg[f"c-pk.{other}"], secagg[f"s-pk.{other}"] = keys[other]
        content = self._content(
            server_round,
            {
                "threshold": plan.threshold,
                "fraction": fraction,
                "weight": self.weights[node],
                "clipping-range": self.cfg.secagg_clipping_range,
                "quantization-bits": self.cfg.secagg_quantization_bits,
            },
        )
        content["secagg"] = ConfigRecord(secagg)
        return content

    def _exchange(
        self,
        stage: str,
        contents: Mapping[str, RecordDict],
        result: SecureRound,
        keep_messages: bool = False,
    ) -> dict:
        """Send one stage; good replies by node id (content, or the message)."""
        message_type = "train" if stage == UPLOAD else f"train.secagg_{stage}"
        messages = [
            Message(content=content, dst_node_id=int(node), message_type=message_type)
            for node, content in contents.items()
        ]
        replies = send_and_receive(self.grid, messages, self.cfg.round_timeout_seconds)
        self.on_traffic(messages, replies)
        good: dict = {}
        for reply in replies:
            node = str(reply.metadata.src_node_id)
            if reply.has_error():
                result.failed[int(node)] = f"{stage}: {_reason(reply)}"
            else:
                good[node] = reply if keep_messages else reply.content
        for node in set(contents) - set(good) - {str(n) for n in result.failed}:
            result.failed[int(node)] = (
                f"{stage}: no reply within {self.cfg.round_timeout_seconds:.0f}s"
            )
        return good

    def _require(
        self,
        alive: Mapping,
        server_round: int,
        stage: str,
        result: SecureRound,
        threshold: int = 2,
    ) -> None:
        needed = max(self.cfg.min_nodes, threshold)
        if len(alive) < needed:
            raise SecAggAbort(
                f"round {server_round} secure aggregation, {stage} stage: {len(alive)} "
                f"hospitals left, {needed} needed (quorum 'min-nodes' {self.cfg.min_nodes}, "
                f"threshold {threshold}); {self._missing(result)}"
            )

    @staticmethod
    def _missing(result: SecureRound) -> str:
        return "dropped: " + (
            ", ".join(f"node {n} ({why})" for n, why in sorted(result.failed.items())) or "none"
        )
