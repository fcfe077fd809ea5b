"""One SecAgg+ training round over a Flower Grid (Message API).

Four exchanges with the sampled hospitals, each bounded by the round
timeout: advertise keys, share keys (ciphertexts routed through here),
upload the masked update (this is the training message the strategy
built, plus the ciphertexts for that hospital), unmask. A hospital that
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


class SecureAggregation:
    """Drives the four SecAgg+ exchanges for the round loop."""

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        run_id: int,
        on_traffic: Callable[[list[Message], list[Message]], None] = lambda sent, got: None,
    ) -> None:
        self.grid, self.cfg, self.run_id = grid, cfg, run_id
        self.on_traffic = on_traffic
        # Keys for the next round arrive with this round's unmask replies, so a
        # hospital that stays in the federation skips the advertise exchange.
        self.next_round = 0
        self.next_keys: dict[str, tuple[bytes, bytes]] = {}
        self.weights: dict[str, float] = {}

    def train_round(
        self,
        server_round: int,
        train_messages: list[Message],
        template: Mapping[str, tuple[int, ...]],
    ) -> SecureRound:
        result = SecureRound()
        cfg = self.cfg
        by_node = {str(m.metadata.dst_node_id): m for m in train_messages}

        started = time.monotonic()
        keys = {
            node: self.next_keys[node]
            for node in by_node
            if self.next_round == server_round and node in self.next_keys
        }
        unknown = [node for node in by_node if node not in keys]
        if unknown:
            ads = self._exchange(
                ADVERTISE, {node: self._content(server_round) for node in unknown}, result
            )
            for node, reply in ads.items():
                keys[node] = (reply["secagg"]["c-pk"], reply["secagg"]["s-pk"])
                self.weights[node] = float(reply["metrics"]["aggregation-weight"])
            result.stage_seconds[ADVERTISE] = time.monotonic() - started
        self._require(keys, server_round, ADVERTISE, result)
        try:
            plan = plan_round(list(keys), cfg.secagg_neighbours, cfg.secagg_threshold)
        except ValueError as err:
            raise SecAggAbort(f"round {server_round}: {err}") from err
        fraction = fractions({node: self.weights[node] for node in keys})

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

        started = time.monotonic()
        uploads = {}
        for node in shared:
            inbox = {
                f"from.{sender}": reply["secagg"][f"to.{node}"]
                for sender, reply in shared.items()
                if f"to.{node}" in reply["secagg"]
            }
            # Flower's strategies share one content object between all their
            # messages: each hospital's inbox needs its own.
            content = RecordDict(dict(by_node[node].content.items()))
            content["secagg"] = ConfigRecord(inbox)
            uploads[node] = content
        summed = MaskedSum(
            template,
            cfg.secagg_clipping_range,
            cfg.secagg_quantization_bits,
            len(plan.participants),
        )
        uploaded = self._exchange(UPLOAD, uploads, result, keep_messages=True)
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
            self.weights[node] = float(reply.content["metrics"]["aggregation-weight"])
            result.clipped_values += int(reply.content["metrics"].get("secagg-clipped-values", 0))
        survivors = list(summed.added)
        dropped = sorted(set(shared) - set(survivors), key=int)
        self._require(dict.fromkeys(survivors), server_round, UPLOAD, result, plan.threshold)
        result.stage_seconds[UPLOAD] = time.monotonic() - started

        started = time.monotonic()
        unmask_config = {
            "survivors": survivors,
            "dropped": dropped,
            "next-round": server_round + 1,
        }
        answers = self._exchange(
            UNMASK,
            {node: self._content(server_round, unmask_config) for node in survivors},
            result,
        )
        responses = {node: dict(reply["secagg"]) for node, reply in answers.items()}
        self.next_round = server_round + 1
        self.next_keys = {
            node: (reply["next.c-pk"], reply["next.s-pk"])
            for node, reply in responses.items()
            if "next.c-pk" in reply
        }
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
