"""Cross-site evaluation at the end of a run: which model works at which hospital.

NVFlare calls it cross-site validation. The matrix has one row per model and
one column per hospital evaluating it on its own validation split: the final
global model always; with `cross-site = "all"` also each hospital's last local
model, the update it sent in the final round before aggregation. A model that
does well at home and badly elsewhere has learnt its site's scanner, not the
disease.

The global row costs nothing: the final round already had every connected
hospital evaluate exactly that model, so its replies are reused. Each local
model goes out in one evaluate exchange to every hospital, answered by the
ClientApp's ordinary evaluate handler. The coordinator already holds those
local models (the plain final round's replies, checked before aggregation),
so nothing new is asked of the hospital that trained one; secure aggregation
and DP, under which it must not hold them, refuse "all" (`shared_models.config`).
Hospitals that fail are recorded by site, as the round loop records them, and
never fail the run; one that fails an exchange is not asked again, so a lost
hospital costs one timeout, not one per model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from medfed.server.run.hidden_counts import hidden_site
from medfed.server.run.replies import ReplyCollector, RoundReplies, SiteNames
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import Config, Metric, Record

GLOBAL = "global"  # the row of the final global model


@dataclass
class CrossSiteMatrix:
    """Each model's metrics at each hospital; a missing cell has its reason."""

    mode: str  # the run's `cross-site`: global | all
    server_round: int  # the round whose models were evaluated (the last one)
    metric: str  # the task's headline metric
    models: list[str] = field(default_factory=list)  # "global", then site names
    cells: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # model->site
    failures: dict[str, dict[str, str]] = field(default_factory=dict)  # model -> site -> reason
    unavailable: dict[str, str] = field(default_factory=dict)  # model -> why it has no weights
    extra_sites: set[str] = field(default_factory=set)  # hospitals without any cell
    seconds: float = 0.0

    @property
    def sites(self) -> list[str]:
        """The evaluating hospitals (columns): every one with a cell, a failure, or asked."""
        seen = set(self.extra_sites)
        for row in (*self.cells.values(), *self.failures.values()):
            seen |= set(row)
        return sorted(seen)

    def add_row(self, model: str, replies: RoundReplies, names: SiteNames) -> None:
        """One model's evaluation replies: usable ones become cells, the rest failures."""
        if model not in self.models:
            self.models.append(model)
        row = self.cells.setdefault(model, {})
        for reply in replies.ok:
            metrics = reply.content[Record.METRICS]
            if hidden_site(metrics):  # a site whose counts are hidden shows no metric
                row[names(reply.metadata.src_node_id)] = {}
                continue
            row[names(reply.metadata.src_node_id)] = {
                k: float(v)
                for k, v in metrics.items()
                if k not in Metric.BOOKKEEPING and isinstance(v, int | float)
            }
        if replies.failed:
            self.failures.setdefault(model, {}).update(replies.failed)

    def value(self, model: str, site: str) -> float | None:
        """The headline metric of `model` at `site`; None where there is none."""
        value = self.cells.get(model, {}).get(site, {}).get(self.metric)
        return value if value is not None and math.isfinite(value) else None

    def values(self) -> dict[str, dict[str, float | None]]:
        """model -> site -> headline metric (None: no value)."""
        sites = self.sites
        return {m: {s: self.value(m, s) for s in sites} for m in self.models}

    def to_json(self) -> dict[str, Any]:
        """metrics.json's `cross-site`: every model x site, null where a cell is missing."""
        sites = self.sites
        return {
            "mode": self.mode,
            "round": self.server_round,
            "metric": self.metric,
            "models": list(self.models),
            "sites": sites,
            "values": self.values(),
            "metrics": {m: {s: self.cells.get(m, {}).get(s) for s in sites} for m in self.models},
            "failures": {m: dict(sorted(f.items())) for m, f in self.failures.items() if f},
            "unavailable": dict(sorted(self.unavailable.items())),
            "seconds": round(self.seconds, 3),
        }

    def table(self) -> list[str]:
        """The matrix as fixed-width lines for the progress log ('-': no value)."""
        sites = self.sites
        lines = [
            f"cross-site evaluation after round {self.server_round} ({self.metric}; rows: "
            "model, columns: the site evaluating it on its validation split):",
            f"{'model':<12} " + " ".join(f"{s[:10]:>10}" for s in sites),
        ]
        for model in self.models:
            cells = (self.value(model, s) for s in sites)
            lines.append(
                f"{model[:12]:<12} "
                + " ".join(f"{v:>10.4f}" if v is not None else f"{'-':>10}" for v in cells)
            )
        for model, reason in sorted(self.unavailable.items()):
            lines.append(f"  {model} model: unavailable ({reason})")
        for model, row in self.failures.items():
            lines += [f"  {model} model at {site}: {why}" for site, why in sorted(row.items())]
        return lines


def evaluate_messages(
    arrays: ArrayRecord, nodes: list[int], server_round: int, model: str
) -> list[Message]:
    """Evaluate messages as Flower's FedAvg.configure_evaluate builds them, naming the
    model so that the hospital's audit log says whose model it ran."""
    content = RecordDict(
        {
            Record.ARRAYS: arrays,
            Record.CONFIG: ConfigRecord(
                {Config.SERVER_ROUND: server_round, Config.CROSS_SITE_MODEL: model}
            ),
        }
    )
    return [
        Message(content=content, dst_node_id=node, message_type=MessageType.EVALUATE)
        for node in nodes
    ]


class CrossSiteEvaluation:
    """Builds the matrix from the final round's replies and one exchange per local model."""

    def __init__(self, replies: ReplyCollector, grid: Grid, cfg: RunConfig, metric: str) -> None:
        self.replies, self.grid, self.cfg, self.metric = replies, grid, cfg, metric

    def run(
        self, server_round: int, evaluated: RoundReplies, trained: RoundReplies | None
    ) -> CrossSiteMatrix:
        """The matrix of the final round's global model and, under "all", local models."""
        started = time.monotonic()
        names = self.replies.names
        matrix = CrossSiteMatrix(self.cfg.cross_site, server_round, self.metric)
        matrix.add_row(GLOBAL, evaluated, names)
        if self.cfg.cross_site == "all" and trained is not None:
            self._local_rows(matrix, server_round, trained)
        matrix.extra_sites |= {names(node) for node in self.grid.get_node_ids()}
        matrix.seconds = time.monotonic() - started
        return matrix

    def _local_rows(
        self, matrix: CrossSiteMatrix, server_round: int, trained: RoundReplies
    ) -> None:
        names = self.replies.names
        local = {names(r.metadata.src_node_id): r.content[Record.ARRAYS] for r in trained.ok}
        for site, reason in trained.failed.items():
            matrix.unavailable[site] = f"its final-round update failed: {reason}"
        for node in self.grid.get_node_ids():
            site = names(node)
            if site not in local and site not in matrix.unavailable:
                matrix.unavailable[site] = f"not sampled for training in round {server_round}"
        matrix.models += sorted(matrix.unavailable)  # rows of nulls, with the reason
        failed_before: dict[str, str] = {}  # site -> the model whose evaluation it failed
        for model, arrays in sorted(local.items()):
            asked = [n for n in self.grid.get_node_ids() if names(n) not in failed_before]
            messages = evaluate_messages(arrays, asked, server_round, model)
            replies = self.replies.collect(messages) if messages else RoundReplies()
            for site, earlier in failed_before.items():
                replies.failed[site] = f"not asked: it failed the evaluation of {earlier}'s model"
            matrix.add_row(model, replies, names)
            for site in replies.failed:
                failed_before.setdefault(site, model)
        matrix.models = [GLOBAL, *sorted(m for m in matrix.models if m != GLOBAL)]
