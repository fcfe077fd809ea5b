"""The fan-out of every finished round: one call from the round loop, every record of it.

RunOutputs takes one call per finished round and sends it everywhere a round
is recorded: the checkpoint and metrics.json (the run folder, RunRecord),
Prometheus (RoundTelemetry), the coordinator's audit log, a machine-readable
round event (the live table of `medfed simulate`) and a human progress line
(the log and progress.log).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from logging import INFO
from typing import Any, TextIO

from flwr.app import ArrayRecord
from flwr.supercore import log

from medfed.server.log_tags import PROGRESS_TAG, ROUND_EVENT_TAG
from medfed.server.run.coordinator_metrics import RoundTelemetry
from medfed.server.run.cross_site import CrossSiteMatrix
from medfed.server.run.federated_statistics import format_summaries
from medfed.server.run.run_record import RunRecord
from medfed.server.run.strategies import RunStrategy
from medfed.server.secagg.stats import SecureStats
from medfed.shared_models.audit import audit
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import Metric
from medfed.shared_models.tasks import TASKS


@dataclass
class RoundSummary:
    """Everything recorded about one finished round."""

    server_round: int
    rounds: int
    seconds: float
    global_metrics: dict[str, float]
    sites: dict[str, dict[str, Any]]  # validation and training metrics per site
    site_validation: dict[str, dict[str, Any]]  # validation metrics per site only
    replied: list[str]
    failures: dict[str, str]  # site -> reason
    sampled: int
    connected: int
    secure: SecureStats | None = None
    epsilon: float | None = None
    dp_noise_ratio: float | None = None  # DP noise norm / the largest update (strategies)
    # when each exchange went out and each hospital's reply arrived (ExchangeTiming)
    exchanges: list[dict[str, Any]] = field(default_factory=list)
    # the sites whose validation of the round's model is in it (None: not validated yet)
    validated_by: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        """The round's entry in metrics.json."""
        entry = {
            "round": self.server_round,
            "seconds": round(self.seconds, 3),
            "global": self.global_metrics,
            "sites": self.sites,
            "replied": self.replied,
            "failed": sorted(self.failures),
            "failures": self.failures,
            "exchanges": self.exchanges,
        }
        if self.server_round:
            entry["secure-aggregation"] = self.secure.to_json() if self.secure else None
        if self.validated_by is not None:
            entry["validated-by"] = self.validated_by
        if self.dp_noise_ratio is not None:
            entry["dp-noise-ratio"] = round(self.dp_noise_ratio, 3)
        return entry


def resumed_summary(record: RunRecord, server_round: int, cfg: RunConfig) -> RoundSummary:
    """The summary of a round the run this one carries on recorded (without validation):
    what its validation, arriving in this run, is added to."""
    entry = next(r for r in record.data["rounds"] if r["round"] == server_round)
    return RoundSummary(
        server_round=server_round,
        rounds=cfg.num_server_rounds,
        seconds=float(entry["seconds"]),
        global_metrics=dict(entry["global"]),
        sites={site: dict(m) for site, m in entry["sites"].items()},
        site_validation={},
        replied=list(entry["replied"]),
        failures=dict(entry["failures"]),
        sampled=len(entry["replied"]) + len(entry["failures"]),
        connected=len(entry["replied"]),
        exchanges=list(entry.get("exchanges", [])),
    )


def arrays_sha256(arrays: ArrayRecord) -> str:
    """A digest of the global model as sent: names and bytes of every array."""
    digest = hashlib.sha256()
    for name, array in arrays.items():
        digest.update(name.encode())
        digest.update(array.data)
    return digest.hexdigest()


class RunOutputs:
    """The progress, records, metrics and audit trail of one run."""

    def __init__(
        self,
        record: RunRecord,
        telemetry: RoundTelemetry,
        progress_log: TextIO,
        run_id: int,
        cfg: RunConfig,
    ) -> None:
        self.record, self.telemetry, self.progress_log = record, telemetry, progress_log
        self.run_id, self.cfg = run_id, cfg
        self.headline_metric = TASKS[cfg.task].headline_metric
        self.hidden_said = False  # the note on rounds whose every site hid its metrics

    def progress(self, line: str) -> None:
        """One human-readable line, to the ServerApp's log and progress.log."""
        log(INFO, "%s %s", PROGRESS_TAG, line)
        self.progress_log.write(line + "\n")

    def round_started(self, server_round: int) -> None:
        """The round the coordinator is in (Prometheus)."""
        self.telemetry.round_started(server_round)

    def traffic(self, sent: int, received: int) -> None:
        """Model bytes sent to and received from the hospitals (Prometheus)."""
        self.telemetry.traffic(sent=sent, received=received)

    def aggregated(self, seconds: float) -> None:
        """How long the strategy took to aggregate a round (Prometheus)."""
        self.telemetry.aggregated(seconds)

    def privacy_settings(self, strategy: RunStrategy, noise_ratio: float | None) -> None:
        """Say which privacy protections this run uses, whether epsilon is accounted, and
        whether its DP noise swamps any update (`noise_ratio`, strategies.dp_noise_ratio)."""
        cfg = self.cfg
        if cfg.secure_aggregation:
            self.progress(
                "secure aggregation on (SecAgg+): neighbours "
                f"{cfg.secagg_neighbours or 'all'}, threshold {cfg.secagg_threshold or 'majority'}"
                f", values clipped to ±{cfg.secagg_clipping_range:g} at "
                f"{cfg.secagg_quantization_bits} bits"
            )
        if cfg.dp_mode != "off":
            accounting = (
                f"epsilon reported at delta {cfg.dp_delta:g}"
                if strategy.accounted
                else f"epsilon NOT reported: {strategy.unaccounted_reason}"
            )
            self.progress(
                f"differential privacy: {cfg.dp_mode}-side "
                f"{'adaptive' if cfg.dp_adaptive else 'fixed'} clipping, norm "
                f"{cfg.dp_clipping_norm:g}, noise multiplier {cfg.dp_noise_multiplier:g}; "
                + accounting
            )
        if noise_ratio is not None and noise_ratio > 1:
            self.progress(
                f"WARNING: the DP noise added to each round's mean is {noise_ratio:.0f}x the "
                "largest update it can carry (noise multiplier x sqrt(model values) / "
                "hospitals): expect the model not to learn. Fewer values (a smaller network), "
                "more hospitals or a lower dp.noise-multiplier (a larger epsilon) reduce it "
                "(docs/security.md, 'Choosing the DP settings')"
            )

    def site_summaries(self, summaries: dict[str, dict[str, Any]]) -> None:
        """The sites' summaries before training: to metrics.json and the progress log."""
        self.record.set_statistics(summaries)
        columns = TASKS[self.cfg.task].label_bins(self.cfg)
        for line in format_summaries(summaries, columns):
            self.progress(line)

    def failures(self, failed: dict[str, str]) -> None:
        """Each hospital lost in an exchange, by site, with the reason (as it happens)."""
        for site, reason in sorted(failed.items()):
            self.progress(f"  {site}: {reason}")

    def round_finished(
        self,
        summary: RoundSummary,
        arrays: ArrayRecord,
        state: dict[str, Any],
        validated: bool = True,
    ) -> None:
        """Record a finished round everywhere it is recorded (checkpoint before metrics.json,
        so a round in metrics.json always has its checkpoint); `state` is what a resumed
        run needs besides the arrays (strategy_state.capture). A round whose model is not
        `validated` yet is shown once it is (`round_validated`)."""
        if summary.secure and summary.secure.clipped_values:
            self.progress(
                f"  {summary.secure.clipped_values} update values exceeded "
                f"±{self.cfg.secagg_clipping_range:g} and were clipped "
                "(raise 'secagg-clipping-range')"
            )
        entry = summary.to_json()
        entry["checkpoint-sha256"] = self.record.checkpoint(summary.server_round, arrays, state)
        self.record.add_round(entry)
        self.telemetry.checkpointed(summary.server_round, time.time())
        audit(
            "round",
            run=self.run_id,
            round=summary.server_round,
            replied=summary.replied,
            failed=sorted(summary.failures),
            model_sha256=arrays_sha256(arrays),
        )
        if validated:
            self._announce(summary)

    def round_validated(self, summary: RoundSummary) -> None:
        """A round's model validated after the round was recorded: its entry gets the
        validation metrics, and the round is shown (progress, Prometheus, round event)."""
        self.record.validate_round(summary.server_round, summary.to_json())
        self._announce(summary)

    def _announce(self, summary: RoundSummary) -> None:
        self._telemetry(summary)
        self._round_event(summary)
        self.progress(self._round_line(summary))
        hidden = summary.replied and self.headline_metric not in summary.global_metrics
        if hidden and not self.hidden_said:
            self.hidden_said = True
            self.progress(
                f"  no validation {self.headline_metric} reached the coordinator: every site "
                "that replied holds fewer validation images than its floor (stats-min-count "
                f"{self.cfg.stats_min_count} in simulation; a node's --min-count), so it sends "
                "no metric (docs/hospital.md, 'Federated statistics'); synthetic sites are "
                "not patients: -c stats-min-count=1 shows theirs"
            )

    def cross_site(self, matrix: CrossSiteMatrix) -> None:
        """The cross-site matrix everywhere a run's results go; the audit names the models
        and the hospitals that evaluated them (values stay in metrics.json)."""
        self.record.set_cross_site(matrix.to_json())
        self.telemetry.cross_site(matrix.metric, matrix.values())
        failed = sorted({site for row in matrix.failures.values() for site in row})
        audit(
            "cross-site",
            run=self.run_id,
            round=matrix.server_round,
            models=matrix.models,
            sites=matrix.sites,
            failed=failed,
        )
        for line in matrix.table():
            self.progress(line)

    def _telemetry(self, summary: RoundSummary) -> None:
        telemetry = self.telemetry
        if summary.epsilon is not None:
            telemetry.privacy_spent(summary.epsilon)
        if summary.secure:
            telemetry.secure_round(summary.secure.stage_seconds, summary.secure.dropped_at)
        counts = {
            "connected": summary.connected,
            "sampled": summary.sampled,
            "replied": len(summary.replied),
            "failed": len(summary.failures),
        }
        telemetry.round_finished(
            summary.server_round, summary.seconds, counts, summary.global_metrics,
            summary.site_validation,
        )  # fmt: skip

    def _round_event(self, summary: RoundSummary) -> None:
        """One machine-readable line per round (medfed simulate draws its table from it)."""
        row = {
            "round": summary.server_round,
            "rounds": summary.rounds,
            "replied": len(summary.replied),
            "failed": len(summary.failures),
            "seconds": summary.seconds,
            "train-loss": summary.global_metrics.get(Metric.TRAIN_LOSS),
            "metric": self.headline_metric,
            "value": summary.global_metrics.get(self.headline_metric),
            "loss": summary.global_metrics.get(Metric.LOSS),
        }
        log(INFO, "%s %s", ROUND_EVENT_TAG, json.dumps(row))

    def _round_line(self, summary: RoundSummary) -> str:
        metrics = summary.global_metrics
        loss = metrics.get(Metric.TRAIN_LOSS)
        return (
            f"round {summary.server_round}/{summary.rounds} | sites {len(summary.replied)}"
            f"/{len(set(summary.replied) | set(summary.failures))} | train-loss "
            + (f"{loss:.4f}" if loss is not None else "   -  ")
            + f" | val {self.headline_metric} {_shown(metrics.get(self.headline_metric))}"
            + f" | val loss {_shown(metrics.get(Metric.LOSS))} | {summary.seconds:.1f}s"
            + (f" | ε {summary.epsilon:.2f}" if summary.epsilon is not None else "")
            + (
                f" | DP noise {summary.dp_noise_ratio:.0f}x the largest update"
                if summary.dp_noise_ratio is not None and summary.dp_noise_ratio > 1
                else ""
            )
        )


def _shown(value: float | None) -> str:
    """A round line's metric: absent where no site sent one (below their floors)."""
    return "hidden" if value is None else f"{value:.4f}"
