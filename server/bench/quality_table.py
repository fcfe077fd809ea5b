"""The quality bench's table: per method, each site's metric and the average over sites,
mean ± standard deviation over seeds, and the gap to pooled training (JSON, markdown, PNG)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from medfed.shared_models.atomic_files import atomic_write
from medfed.shared_models.tasks import TASKS

LOWER_IS_BETTER = {"mae", "loss"}
LOCAL_ELSEWHERE = "local, on other sites"  # each site's model scored at the other sites
QUALITY_JSON, QUALITY_MD, QUALITY_PNG = "quality.json", "quality.md", "quality.png"


@dataclass
class QualityResults:
    """Every run's outcome, by method and seed, and the summaries drawn from them."""

    task: str
    sites: list[str]
    config: dict[str, Any]
    runs: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)  # the runs' class-names, in index order

    @property
    def metric(self) -> str:
        return TASKS[self.task].headline_metric

    def add(self, method: str, seed: int, outcome: dict[str, Any]) -> None:
        self.runs.setdefault(method, {})[seed] = outcome

    def complete(self) -> bool:
        """Every run completed with a finite metric at every site."""
        return all(
            outcome.get("status") == "completed"
            and all(math.isfinite(v) for v in _site_values(outcome, self.metric, self.sites))
            and len(_site_values(outcome, self.metric, self.sites)) == len(self.sites)
            for by_seed in self.runs.values()
            for outcome in by_seed.values()
        )

    def rows(self) -> list[dict[str, Any]]:
        """One row per method (local twice: at home and elsewhere), summarised over seeds."""
        rows = [self._row(method, by_seed) for method, by_seed in self.runs.items()]
        if "local" in self.runs:
            elsewhere = {s: _elsewhere(o, self.metric) for s, o in self.runs["local"].items()}
            rows.insert(2 if "pooled" in self.runs else 1, self._row(LOCAL_ELSEWHERE, elsewhere))
        pooled = next((r for r in rows if r["method"] == "pooled"), None)
        for row in rows:
            row["gap-to-pooled-percent"] = _gap(row["average"]["mean"], pooled)
        return rows

    def _row(self, method: str, by_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
        done = [o for o in by_seed.values() if o.get("status") == "completed"]
        per_site = {
            site: _spread(v for o in done for v in _site_values(o, self.metric, [site]))
            for site in self.sites
        }
        averages = [
            statistics.fmean(values)
            for o in done
            if (values := _site_values(o, self.metric, self.sites))
        ]
        seconds = [o.get("seconds", math.nan) for o in done]
        return {
            "method": method,
            "runs": f"{len(done)}/{len(by_seed)}",
            "sites": per_site,
            "average": _spread(averages),
            "seconds": statistics.fmean(seconds) if seconds else math.nan,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "classes": self.classes,
            "metric": self.metric,
            "lower-is-better": self.metric in LOWER_IS_BETTER,
            "sites": self.sites,
            "config": self.config,
            "table": self.rows(),
            "runs": {m: {str(s): o for s, o in r.items()} for m, r in self.runs.items()},
        }

    def markdown(self) -> str:
        better = "lower" if self.metric in LOWER_IS_BETTER else "higher"
        header = ["method", *self.sites, "average", "vs pooled", "runs", "s/run"]
        lines = [
            f"Validation {self.metric} ({better} is better), mean ± sd over seeds; "
            "average = mean over sites.",
            "",
            "| " + " | ".join(header) + " |",
            "|---|" + "---:|" * (len(header) - 1),
        ]
        for row in self.rows():
            cells = [row["method"], *(_fmt(row["sites"][s]) for s in self.sites)]
            gap = row["gap-to-pooled-percent"]
            cells += [_fmt(row["average"]), "—" if math.isnan(gap) else f"{gap:+.1f} %"]
            cells += [row["runs"], f"{row['seconds']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def write_outputs(results: QualityResults, out: Path) -> list[Path]:
    """quality.json, quality.md and quality.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / QUALITY_JSON, out / QUALITY_MD, out / QUALITY_PNG]
    atomic_write(paths[0], json.dumps(_no_nan(results.to_json()), indent=1).encode())
    atomic_write(paths[1], (results.markdown() + "\n").encode())
    _plot(results, paths[2])
    return paths


def _site_values(outcome: dict[str, Any], metric: str, sites: list[str]) -> list[float]:
    """The sites' values of `metric`; a site that hid it (below its floor: "hidden") has
    none, as a site that did not report it."""
    found = outcome.get("sites", {})
    values = [found[s].get(metric) for s in sites if s in found]
    return [float(v) for v in values if isinstance(v, int | float)]


def _elsewhere(outcome: dict[str, Any], metric: str) -> dict[str, Any]:
    """Each site's metric for the models of the other sites (the mean over them)."""
    if outcome.get("status") != "completed":
        return outcome
    cross = outcome["cross"]
    sites = {
        site: {metric: statistics.fmean(cross[t][site][metric] for t in cross if t != site)}
        for site in cross
    }
    return {"status": "completed", "sites": sites, "seconds": outcome.get("seconds", math.nan)}


def _spread(values: Iterable[float]) -> dict[str, float]:
    values = list(values)
    if not values:
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


def _gap(value: float, pooled: dict[str, Any] | None) -> float:
    """Percent difference from pooled training's average (NaN without one)."""
    if pooled is None or not pooled["average"]["n"] or pooled["average"]["mean"] == 0:
        return math.nan
    reference = pooled["average"]["mean"]
    return (value - reference) / abs(reference) * 100


def _fmt(spread: dict[str, float]) -> str:
    if math.isnan(spread["mean"]):
        return "—"
    sd = "" if math.isnan(spread["sd"]) else f" ± {spread['sd']:.3f}"
    return f"{spread['mean']:.3f}{sd}"


def _no_nan(value: Any) -> Any:
    """`value` with every NaN as null: strict JSON readers reject NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def _plot(results: QualityResults, path: Path) -> None:
    """The average over sites per method with its spread, and each site's mean as a dot."""
    rows = results.rows()
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 4))
    for i, row in enumerate(rows):
        mean, sd = row["average"]["mean"], row["average"]["sd"]
        ax.bar(i, mean, yerr=None if math.isnan(sd) else sd, color="#4c72b0", capsize=4)
        dots = [row["sites"][s]["mean"] for s in results.sites]
        ax.scatter([i] * len(dots), dots, color="#dd8452", zorder=3, s=12)
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel(f"validation {results.metric}")
    ax.set_title(f"{results.task}: average over sites (bars), each site (dots)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
