"""The round loop: quorum, bounded waits, reply checks, aggregation, records.

Flower's `Strategy.start` waits forever for nodes and silently drops failed
replies; a consortium needs the opposite. This loop drives the same Flower
strategy (configure/aggregate) but bounds every wait, checks every update
before it is averaged, and fails the run with the names of the missing
hospitals when the quorum is lost.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from medfed.server.messaging import send_and_receive
from medfed.server.run_record import RunRecord
from medfed.server.secagg import SecAggAbort
from medfed.server.secure_round import SecureAggregation
from medfed.server.statistics import format_statistics, request_statistics
from medfed.server.strategies import Federation
from medfed.server.telemetry import RoundTelemetry, record_bytes
from medfed.shared_models.audit import audit
from medfed.shared_models.config import RunConfig
from medfed.shared_models.tasks import TASKS
from medfed.shared_models.weights import incompatibilities


class QuorumError(RuntimeError):
    """Too few hospitals connected or replied; the message says how many and who."""


@dataclass
class RoundReplies:
    """One round's replies sorted into usable ones and failures (by site name)."""

    ok: list[Message] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # site -> reason


def wait_for_nodes(
    grid: Grid, minimum: int, wait_seconds: float, say: Callable[[str], None]
) -> list[int]:
    """Node ids once `minimum` are connected; QuorumError after `wait_seconds`."""
    deadline = time.monotonic() + wait_seconds
    announced = -1
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() >= deadline:
            raise QuorumError(
                f"only {len(nodes)} of the required {minimum} hospitals connected "
                f"after waiting {wait_seconds:.0f}s (config key 'node-wait-seconds')"
            )
        if len(nodes) != announced:
            say(f"waiting for hospitals: {len(nodes)} of {minimum} connected")
            announced = len(nodes)
        time.sleep(0.5)


def _arrays_sha256(arrays: ArrayRecord) -> str:
    digest = hashlib.sha256()
    for name, array in arrays.items():
        digest.update(name.encode())
        digest.update(array.data)
    return digest.hexdigest()


def short_reason(reason: str) -> str:
    """The last line of a remote traceback: the exception a hospital's node raised."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:300]


class FederatedRun:
    """Runs round 0 (initial evaluation) and rounds 1..R, recording everything."""

    def __init__(
        self,
        grid: Grid,
        federation_for: Callable[[int], Federation],
        cfg: RunConfig,
        net: nn.Module,
        record: RunRecord,
        headline: str,
        say: Callable[[str], None],
        run_id: int = 0,
        event: Callable[[dict[str, Any]], None] = lambda row: None,
    ) -> None:
        self.grid, self.cfg, self.net = grid, cfg, net
        self.federation_for = federation_for
        self.record, self.headline, self.say = record, headline, say
        self.site_of: dict[int, str] = {}
        self.telemetry = RoundTelemetry(run_id, cfg.task)
        self.run_id = run_id
        self.event = event
        self.sampled = 0
        self.secure_summary: dict[str, Any] | None = None
        self.secure: SecureAggregation | None = None

    def run(self, arrays: ArrayRecord) -> ArrayRecord:
        cfg = self.cfg
        nodes = wait_for_nodes(self.grid, cfg.min_nodes, cfg.node_wait_seconds, self.say)
        self.federation = self.federation_for(len(nodes))
        self.strategy = self.federation.strategy
        self._announce_privacy()
        if cfg.federated_stats:
            self._statistics(nodes)
        start = time.monotonic()
        self.telemetry.round_started(0)
        evaluation = self._evaluate(0, arrays)
        self._finish_round(0, start, evaluation, None, RoundReplies(), arrays)
        for server_round in range(1, cfg.num_server_rounds + 1):
            start = time.monotonic()
            self.telemetry.round_started(server_round)
            wait_for_nodes(self.grid, cfg.min_nodes, cfg.node_wait_seconds, self.say)
            messages = self.strategy.configure_train(
                server_round, arrays, ConfigRecord(), self.grid
            )
            if cfg.secure_aggregation:
                trained = self._secure_collect(server_round, list(messages), arrays)
            else:
                trained = self._collect(messages, is_train=True)
            self._require_quorum(trained, "training", server_round)
            aggregation_start = time.monotonic()
            new_arrays, train_metrics = self.strategy.aggregate_train(server_round, trained.ok)
            self.telemetry.aggregated(time.monotonic() - aggregation_start)
            if new_arrays is None:
                raise QuorumError(
                    f"round {server_round}: aggregation produced no model"
                    + (
                        f" (the privacy accountant needs all {self.sampled} sampled hospitals)"
                        if self.federation.accounted
                        else ""
                    )
                )
            arrays = new_arrays
            evaluation = self._evaluate(server_round, arrays)
            self._finish_round(server_round, start, evaluation, train_metrics, trained, arrays)
        return arrays

    def _announce_privacy(self) -> None:
        cfg = self.cfg
        if cfg.secure_aggregation:
            self.say(
                "secure aggregation on (SecAgg+): neighbours "
                f"{cfg.secagg_neighbours or 'all'}, threshold {cfg.secagg_threshold or 'majority'}"
                f", values clipped to ±{cfg.secagg_clipping_range:g} at "
                f"{cfg.secagg_quantization_bits} bits"
            )
        if cfg.dp_mode != "off":
            self.say(
                f"differential privacy: {cfg.dp_mode}-side "
                f"{'adaptive' if cfg.dp_adaptive else 'fixed'} clipping, norm "
                f"{cfg.dp_clipping_norm:g}, noise multiplier {cfg.dp_noise_multiplier:g}; "
                + (
                    f"epsilon reported at delta {cfg.dp_delta:g}"
                    if self.federation.accounted
                    else f"epsilon NOT reported: {self.federation.unaccounted_reason}"
                )
            )

    def _secure_collect(
        self, server_round: int, messages: list[Message], arrays: ArrayRecord
    ) -> RoundReplies:
        """A SecAgg+ round: each usable reply carries the unmasked weighted mean.

        The weighted mean of identical arrays is those arrays, so any
        weighted-mean strategy (and Flower's DP wrappers around it) turns the
        replies into exactly the secure aggregate plus its own server step
        (FedAdam's moments, DP noise), while still aggregating the clear
        scalar metrics per hospital.
        """
        self.sampled = len(messages)

        def traffic(sent: list[Message], got: list[Message]) -> None:
            self.telemetry.traffic(
                sent=record_bytes(r for m in sent for r in m.content.array_records.values()),
                received=record_bytes(
                    r for m in got if not m.has_error() for r in m.content.array_records.values()
                ),
            )

        if self.secure is None:  # one per run: it carries next round's keys over
            self.secure = SecureAggregation(self.grid, self.cfg, self.run_id, traffic)
        secure = self.secure
        template = {key: tuple(array.shape) for key, array in arrays.items()}
        try:
            outcome = secure.train_round(server_round, messages, template)
        except SecAggAbort as err:
            raise QuorumError(self._named(str(err))) from err
        result = RoundReplies()
        for node, reason in outcome.failed.items():
            result.failed[self._name(node)] = reason
        self.telemetry.secure_round(
            outcome.stage_seconds, [why.split(":")[0] for why in outcome.failed.values()]
        )
        self.secure_summary = {
            "stage-seconds": {k: round(v, 3) for k, v in outcome.stage_seconds.items()},
            "survivors": len(outcome.replies),
            "clipped-values": outcome.clipped_values,
        }
        averaged = ArrayRecord(
            {
                key: Array((arrays[key].numpy() + outcome.mean_update[key]).astype(np.float32))
                for key in arrays
            }
        )
        problems = incompatibilities(averaged, self.net)
        if problems:
            raise QuorumError(f"round {server_round}: unmasked aggregate unusable: {problems[:3]}")
        for reply in outcome.replies:
            node = reply.metadata.src_node_id
            if "site" in reply.content.config_records:
                self.site_of[node] = str(reply.content.config_records["site"]["name"])
            reply.content["arrays"] = averaged
            result.ok.append(reply)
        if outcome.clipped_values:
            self.say(
                f"  {outcome.clipped_values} update values exceeded ±"
                f"{self.cfg.secagg_clipping_range:g} and were clipped "
                "(raise 'secagg-clipping-range')"
            )
        for site, reason in sorted(result.failed.items()):
            self.say(f"  {site}: {reason}")
        return result

    def _named(self, text: str) -> str:
        """Replace 'node <id>' by the hospital's site name where it is known."""
        for node, site in self.site_of.items():
            text = text.replace(f"node {node}", site)
        return text

    def _statistics(self, nodes: list[int]) -> None:
        replies = request_statistics(
            self.grid, nodes, self.cfg.stats_min_count, self.cfg.round_timeout_seconds
        )
        stats: dict[str, dict] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.say(
                    f"  {self._name(node)}: no statistics ({short_reason(reply.error.reason)})"
                )
                continue
            self.site_of[node] = str(reply.content.config_records["site"]["name"])
            stats[self.site_of[node]] = dict(reply.content.metric_records["metrics"])
        self.record.set_statistics(stats)
        columns = TASKS[self.cfg.task].label_bins(self.cfg)
        for line in format_statistics(stats, columns, self.cfg.stats_min_count):
            self.say(line)

    def _evaluate(self, server_round: int, arrays: ArrayRecord) -> RoundReplies:
        messages = self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(), self.grid)
        evaluated = self._collect(messages, is_train=False)
        self._require_quorum(evaluated, "evaluation", server_round)
        return evaluated

    def _collect(self, messages: Iterable[Message], is_train: bool) -> RoundReplies:
        messages = list(messages)
        sampled = {m.metadata.dst_node_id for m in messages}
        self.sampled = len(sampled)
        replies = send_and_receive(self.grid, messages, self.cfg.round_timeout_seconds)
        self.telemetry.traffic(
            sent=record_bytes(r for m in messages for r in m.content.array_records.values()),
            received=record_bytes(
                r for m in replies if not m.has_error() for r in m.content.array_records.values()
            ),
        )
        result = RoundReplies()
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                result.failed[self._name(node)] = f"error: {short_reason(reply.error.reason)}"
                continue
            if "site" in reply.content.config_records:
                self.site_of[node] = str(reply.content.config_records["site"]["name"])
            if is_train:
                problems = (
                    incompatibilities(reply.content.array_records["arrays"], self.net)
                    if "arrays" in reply.content.array_records
                    else ["no 'arrays' record"]
                )
                if problems:
                    result.failed[self._name(node)] = "rejected update: " + "; ".join(problems[:3])
                    continue
            result.ok.append(reply)
        for node in sampled - answered:
            result.failed[self._name(node)] = (
                f"no reply within {self.cfg.round_timeout_seconds:.0f}s"
                " (config key 'round-timeout-seconds')"
            )
        for site, reason in sorted(result.failed.items()):
            self.say(f"  {site}: {reason}")
        return result

    def _require_quorum(self, replies: RoundReplies, phase: str, server_round: int) -> None:
        if len(replies.ok) < self.cfg.min_nodes:
            missing = ", ".join(sorted(replies.failed)) or "none sampled"
            raise QuorumError(
                f"round {server_round} {phase}: {len(replies.ok)} hospitals replied, "
                f"quorum is {self.cfg.min_nodes} (config key 'min-nodes'); missing: {missing}"
            )

    def _name(self, node: int) -> str:
        return self.site_of.get(node, f"node-{node}")

    def _finish_round(
        self,
        server_round: int,
        start: float,
        evaluation: RoundReplies,
        train_metrics: MetricRecord | None,
        trained: RoundReplies,
        arrays: ArrayRecord,
    ) -> None:
        sites: dict[str, dict[str, Any]] = {}
        for reply in evaluation.ok:
            sites[self._name(reply.metadata.src_node_id)] = dict(
                reply.content.metric_records["metrics"]
            )
        for reply in trained.ok:
            train = reply.content.metric_records["metrics"]
            entry = sites.setdefault(self._name(reply.metadata.src_node_id), {})
            entry.update({k: v for k, v in train.items() if k != "num-examples"})
            entry["train-examples"] = train["num-examples"]
        aggregated = self.strategy.aggregate_evaluate(server_round, evaluation.ok)
        global_metrics = dict(aggregated) if aggregated is not None else {}
        if train_metrics is not None:
            global_metrics["train-loss"] = train_metrics["train-loss"]
        epsilon = self.federation.epsilon() if server_round else None
        if epsilon is not None:
            global_metrics["dp-epsilon"] = epsilon
            self.telemetry.privacy_spent(epsilon)
        self.record.checkpoint(server_round, arrays)
        self.telemetry.checkpointed(server_round, time.time())
        seconds = time.monotonic() - start
        replied = sorted(
            {
                self._name(m.metadata.src_node_id)
                for m in (trained.ok if server_round else evaluation.ok)
            }
        )
        failed = {**evaluation.failed, **trained.failed}
        self.record.add_round(
            {
                "round": server_round,
                "seconds": round(seconds, 3),
                "global": global_metrics,
                "sites": dict(sorted(sites.items())),
                "replied": replied,
                "failed": sorted(failed),
                "failures": failed,
                **({"secure-aggregation": self.secure_summary} if server_round else {}),
            }
        )
        counts = {
            "connected": len(list(self.grid.get_node_ids())),
            "sampled": self.sampled,
            "replied": len(replied),
            "failed": len(failed),
        }
        self.telemetry.round_finished(server_round, seconds, counts, global_metrics, sites)
        audit(
            "round",
            run=self.run_id,
            round=server_round,
            replied=replied,
            failed=sorted(failed),
            model_sha256=_arrays_sha256(arrays),
        )
        self.event(
            {
                "round": server_round,
                "rounds": self.cfg.num_server_rounds,
                "replied": len(replied),
                "failed": len(failed),
                "seconds": seconds,
                "train-loss": global_metrics.get("train-loss"),
                "metric": self.headline,
                "value": global_metrics.get(self.headline),
                "loss": global_metrics.get("loss"),
            }
        )
        loss = global_metrics.get("train-loss")
        self.say(
            f"round {server_round}/{self.cfg.num_server_rounds} | sites {len(replied)}"
            f"/{len(replied) + len(failed)} | train-loss "
            + (f"{loss:.4f}" if loss is not None else "   -  ")
            + f" | val {self.headline} {global_metrics.get(self.headline, float('nan')):.4f}"
            + f" | val loss {global_metrics.get('loss', float('nan')):.4f} | {seconds:.1f}s"
            + (f" | ε {epsilon:.2f}" if epsilon is not None else "")
        )
