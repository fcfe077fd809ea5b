"""The round loop: quorum, bounded waits, checked replies, aggregation, one summary per round.

Flower's `Strategy.start` waits forever for nodes and silently drops failed
replies; a consortium needs the opposite. This loop drives the same Flower
strategy (configure / aggregate) but bounds every wait, has every update
checked before it is averaged (`replies`), runs secure rounds through the
SecAgg+ workflow, and fails the run with the names of the missing hospitals
when the quorum is lost. What each round produced goes to `RunOutputs`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from medfed.server.run import strategy_state
from medfed.server.run.cross_site import CrossSiteEvaluation
from medfed.server.run.exchange import Exchange
from medfed.server.run.federated_statistics import request_summaries
from medfed.server.run.hidden_counts import TRAIN_EXAMPLES, recorded
from medfed.server.run.replies import (
    QuorumError,
    ReplyCollector,
    RoundReplies,
    SiteNames,
    described,
    validation_replies,
)
from medfed.server.run.resume import ResumeError, ResumePoint
from medfed.server.run.round_outputs import RoundSummary, RunOutputs, resumed_summary
from medfed.server.run.strategies import RunStrategy, dp_noise_ratio
from medfed.server.secagg.workflow import SecureAggregation
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import Metric, Record


def wait_for_nodes(
    grid: Grid, minimum: int, wait_seconds: float, progress: Callable[[str], None]
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
            progress(f"waiting for hospitals: {len(nodes)} of {minimum} connected")
            announced = len(nodes)
        time.sleep(0.5)


class PlainTraining:
    """A training exchange in the clear: each hospital's update, checked against the sent model."""

    def __init__(self, replies: ReplyCollector) -> None:
        self.replies = replies

    def collect(
        self, server_round: int, messages: list[Message], sent: ArrayRecord
    ) -> RoundReplies:
        """Usable training replies; failures and rejected updates named by site."""
        return self.replies.collect(messages, sent)


@dataclass
class RoundOutcome:
    """What one round's exchanges returned, before it is summarised."""

    server_round: int
    started: float
    evaluated: RoundReplies
    trained: RoundReplies | None = None  # None for round 0 (evaluation only)
    train_metrics: MetricRecord | None = None


@dataclass
class Unvalidated:
    """A recorded round whose model the next exchange validates: its summary so far (None
    for the round a resumed run starts after, recorded by the run it carries on)."""

    server_round: int
    summary: RoundSummary | None


class RoundLoop:
    """Round 0 evaluates the initial model; rounds 1..R train, aggregate and evaluate.

    With `separate-evaluation = false` (the default, when every hospital trains) a
    model is validated by the hospitals at the start of the training message that
    carries it, not in a message of its own: round r's training replies bring the
    validation of round r-1's model, which is then added to round r-1's record (its
    checkpoint was written when it ended), and only the last model is evaluated on
    its own. One message fewer per round, the same metrics.
    """

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        outputs: RunOutputs,
        make_strategy: Callable[[int], RunStrategy],
        run_id: int,
        request: Mapping[str, str] | None = None,
        run_config: bytes | None = None,
    ) -> None:
        """`run_config`: the digest of the run's config as the apps received it
        (round_terms.run_config_digest), which secure rounds bind their terms to."""
        self.grid, self.cfg, self.outputs, self.run_id = grid, cfg, outputs, run_id
        # what every training and evaluation request carries besides the round (a bundle hash)
        self.request = dict(request or {})
        self.make_strategy = make_strategy
        self.strategy: RunStrategy  # built in run(), once the connected hospitals are known
        self.dp_values = 0  # float values in the model (run() counts them)
        self.names = SiteNames()
        self.exchange = Exchange(grid, cfg.round_timeout_seconds, outputs.traffic)
        self.replies = ReplyCollector(self.exchange, self.names, cfg.update_norm_factor)
        self.training: PlainTraining | SecureAggregation = (
            SecureAggregation(self.replies, cfg, run_id, run_config)
            if cfg.secure_aggregation
            else PlainTraining(self.replies)
        )
        self.final: RoundOutcome | None = None  # the last round's replies, for cross-site
        # the round whose model the next exchange validates (RunConfig.validates_in_training)
        self.unvalidated: Unvalidated | None = None

    def run(self, arrays: ArrayRecord, resume: ResumePoint | None = None) -> ArrayRecord:
        """Every round from the initial `arrays`, or every round after `resume`'s with its
        strategy and random state restored; returns the final global arrays."""
        cfg = self.cfg
        nodes = wait_for_nodes(
            self.grid, cfg.min_nodes, cfg.node_wait_seconds, self.outputs.progress
        )
        # a resumed run's privacy accountant keeps the population it was built for
        recorded = strategy_state.population(resume.state) if resume else None
        self.strategy = self.make_strategy(recorded or len(nodes))
        self.dp_values = sum(
            array.numpy().size for array in arrays.values() if array.numpy().dtype.kind == "f"
        )  # the values a round's mean carries, and DP noises
        self.outputs.privacy_settings(self.strategy, self._dp_noise_ratio(len(nodes)))
        if resume is not None:
            self._restore(resume)
            arrays, first = resume.arrays, resume.server_round + 1
            if cfg.validates_in_training(first):  # by the first round trained here
                self.unvalidated = Unvalidated(resume.server_round, None)
        else:
            if cfg.federated_stats:
                self._site_summaries(nodes)
            started = self._round_clock()
            self.outputs.round_started(0)
            self._finish(RoundOutcome(0, started, self._evaluate(0, arrays)), arrays)
            first = 1
        for server_round in range(first, cfg.num_server_rounds + 1):
            arrays = self._train_round(server_round, arrays)
        if self.unvalidated is not None:  # the last model: evaluated in a message of its own
            self.exchange.timings.clear()
            evaluated = self._evaluate(cfg.num_server_rounds, arrays)
            self._validated(evaluated, [t.to_json(self.names) for t in self.exchange.timings])
        return arrays

    def cross_site(self) -> None:
        """Evaluate the final round's models at every hospital (config key 'cross-site');
        the matrix goes to metrics.json, report.md, Prometheus and the progress log."""
        if self.cfg.cross_site == "off" or self.final is None:
            return
        self.exchange.timings.clear()
        evaluation = CrossSiteEvaluation(
            self.replies, self.grid, self.cfg, self.outputs.headline_metric
        )
        final = self.final
        self.outputs.cross_site(evaluation.run(final.server_round, final.evaluated, final.trained))

    def _round_clock(self) -> float:
        """A round's start: its exchanges' timings are recorded from here on."""
        self.exchange.timings.clear()
        return time.monotonic()

    def _restore(self, resume: ResumePoint) -> None:
        try:
            strategy_state.restore(self.strategy.flower, resume.state, resume.lost_releases)
        except strategy_state.StateMismatch as err:
            raise ResumeError(f"resume-from {resume.folder}: {err}") from err
        streams = "random streams restored"
        if self.cfg.dp_mode != "off":
            streams += ", DP noise drawn afresh (it is never checkpointed)"
        if resume.lost_releases:
            counted = " (counted in the privacy ledger)" if self.strategy.accounted else ""
            streams += f"; {resume.lost_releases} noisy model(s) released after that round{counted}"
        self.outputs.progress(
            f"resumed after round {resume.server_round} of {resume.folder}: strategy state "
            f"restored, {streams}"
            + ("; secure aggregation starts fresh keys" if self.cfg.secure_aggregation else "")
        )

    def _train_round(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """Sample, train, check, aggregate, evaluate and record one round."""
        started = self._round_clock()
        self.outputs.round_started(server_round)
        wait_for_nodes(
            self.grid, self.cfg.min_nodes, self.cfg.node_wait_seconds, self.outputs.progress
        )
        messages = list(
            self.strategy.flower.configure_train(
                server_round, arrays, ConfigRecord(self.request), self.grid
            )
        )
        trained = self.training.collect(server_round, messages, arrays)
        self.outputs.failures(trained.failed)
        for note in trained.notes:
            self.outputs.progress(f"  {note}")
        self._require_quorum(trained, "training", server_round)
        validation = validation_replies(trained, self.names)  # (taken out of the replies)
        if self.unvalidated is not None:
            self.outputs.failures(validation.failed)
            self._require_quorum(validation, "validation", server_round - 1)
            self._validated(validation)
        aggregation_started = time.monotonic()
        new_arrays, train_metrics = self.strategy.flower.aggregate_train(server_round, trained.ok)
        self.outputs.aggregated(time.monotonic() - aggregation_started)
        if self.cfg.dp_mode != "off" and new_arrays is not None:
            self.outputs.record.released()  # before evaluation sends it out
        if new_arrays is None:
            accountant = (
                f" (the privacy accountant needs all {trained.sampled} sampled hospitals)"
                if self.strategy.accounted
                else ""
            )
            raise QuorumError(f"round {server_round}: aggregation produced no model{accountant}")
        folded = self.cfg.validates_in_training(server_round + 1)
        evaluated = RoundReplies() if folded else self._evaluate(server_round, new_arrays)
        self._finish(
            RoundOutcome(server_round, started, evaluated, trained, train_metrics), new_arrays
        )
        return new_arrays

    def _site_summaries(self, nodes: list[int]) -> None:
        """Every site's summary, side by side, before round 0."""
        replies = request_summaries(self.replies, nodes, self.cfg.stats_min_count)
        for site, reason in sorted(replies.failed.items()):
            self.outputs.progress(f"  {site}: no statistics ({reason})")
        summaries = {
            self.names(reply.metadata.src_node_id): recorded(reply.content[Record.METRICS])
            for reply in replies.ok
        }
        self.outputs.site_summaries(summaries)

    def _evaluate(self, server_round: int, arrays: ArrayRecord) -> RoundReplies:
        messages = self.strategy.flower.configure_evaluate(
            server_round, arrays, ConfigRecord(self.request), self.grid
        )
        evaluated = self.replies.collect(messages)
        self.outputs.failures(evaluated.failed)
        self._require_quorum(evaluated, "evaluation", server_round)
        return evaluated

    def _require_quorum(self, replies: RoundReplies, phase: str, server_round: int) -> None:
        """QuorumError naming the missing hospitals and why each is missing."""
        if len(replies.ok) < self.cfg.min_nodes:
            missing = "; ".join(
                f"{described(site)} ({reason})" for site, reason in sorted(replies.failed.items())
            )
            missing = missing or "none sampled"
            raise QuorumError(
                f"round {server_round} {phase}: {len(replies.ok)} hospitals replied, "
                f"quorum is {self.cfg.min_nodes} (config key 'min-nodes'); missing: {missing}"
            )

    def _finish(self, outcome: RoundOutcome, arrays: ArrayRecord) -> None:
        state = strategy_state.capture(self.strategy.flower)
        summary = self._summarise(outcome)
        # validated by the next round's training messages, or by the last evaluation
        later = outcome.server_round > 0 and self.cfg.validates_in_training(
            outcome.server_round + 1
        )
        self.outputs.round_finished(summary, arrays, state, validated=not later)
        if later:
            self.unvalidated = Unvalidated(outcome.server_round, summary)
        # the last round's replies only: no earlier round's updates are held on to
        if outcome.server_round == self.cfg.num_server_rounds:
            self.final = outcome

    def _validated(self, evaluated: RoundReplies, exchanges: list | None = None) -> None:
        """Round `self.unvalidated`'s model validated: into its record, then shown
        (`exchanges`: the evaluation's own, when it had a message of its own)."""
        assert self.unvalidated is not None
        server_round, summary = self.unvalidated.server_round, self.unvalidated.summary
        self.unvalidated = None
        if self.final is not None and self.final.server_round == server_round:
            self.final.evaluated = evaluated  # cross-site evaluation starts from it
        validation = {
            self.names(r.metadata.src_node_id): recorded(r.content[Record.METRICS])
            for r in evaluated.ok
        }
        aggregated = self.strategy.flower.aggregate_evaluate(server_round, evaluated.ok)
        if summary is None:  # recorded by the run this one carries on
            summary = resumed_summary(self.outputs.record, server_round, self.cfg)
        sites = {site: dict(m) for site, m in summary.sites.items()}
        for site, metrics in validation.items():
            sites.setdefault(site, {}).update(metrics)
        global_metrics = {**(dict(aggregated) if aggregated is not None else {})}
        global_metrics.update(summary.global_metrics)
        validated = dataclasses.replace(
            summary,
            global_metrics=global_metrics,
            sites=dict(sorted(sites.items())),
            site_validation=validation,
            failures={**{s: f"validation: {r}" for s, r in evaluated.failed.items()},
                      **summary.failures},
            validated_by=sorted(validation),
            exchanges=[*summary.exchanges, *(exchanges or [])],
        )  # fmt: skip
        self.outputs.round_validated(validated)

    def _dp_noise_ratio(self, hospitals: int) -> float | None:
        """The DP noise's norm over the largest update's, for a mean of `hospitals`."""
        if self.cfg.dp_mode == "off" or self.cfg.dp_noise_multiplier <= 0:
            return None
        return dp_noise_ratio(self.cfg.dp_noise_multiplier, self.dp_values, hospitals)

    def _summarise(self, outcome: RoundOutcome) -> RoundSummary:
        """The round's global and per-site metrics, who replied, who failed and why (its
        validation too, unless it comes later: `_validated`)."""
        evaluated, trained = outcome.evaluated, outcome.trained
        validation = {
            self.names(r.metadata.src_node_id): recorded(r.content[Record.METRICS])
            for r in evaluated.ok
        }
        sites: dict[str, dict[str, Any]] = {site: dict(m) for site, m in validation.items()}
        for reply in trained.ok if trained else []:
            metrics = dict(reply.content[Record.METRICS])
            entry = sites.setdefault(self.names(reply.metadata.src_node_id), {})
            metrics[TRAIN_EXAMPLES] = metrics.pop(Metric.NUM_EXAMPLES)
            entry.update(recorded(metrics))
        aggregated = self.strategy.flower.aggregate_evaluate(outcome.server_round, evaluated.ok)
        global_metrics = dict(aggregated) if aggregated is not None else {}
        # absent where every site that trained hides its counts (and so its losses)
        if outcome.train_metrics is not None and Metric.TRAIN_LOSS in outcome.train_metrics:
            global_metrics[Metric.TRAIN_LOSS] = outcome.train_metrics[Metric.TRAIN_LOSS]
        epsilon = self.strategy.epsilon() if trained else None
        if epsilon is not None:
            global_metrics[Metric.DP_EPSILON] = epsilon
        answered = trained or evaluated
        return RoundSummary(
            server_round=outcome.server_round,
            rounds=self.cfg.num_server_rounds,
            seconds=time.monotonic() - outcome.started,
            global_metrics=global_metrics,
            sites=dict(sorted(sites.items())),
            site_validation=validation,
            replied=sorted({self.names(m.metadata.src_node_id) for m in answered.ok}),
            failures={**evaluated.failed, **(trained.failed if trained else {})},
            sampled=answered.sampled,
            connected=len(list(self.grid.get_node_ids())),
            secure=trained.secure if trained else None,
            epsilon=epsilon,
            dp_noise_ratio=self._dp_noise_ratio(len(trained.ok)) if trained else None,
            exchanges=[timing.to_json(self.names) for timing in self.exchange.timings],
        )
