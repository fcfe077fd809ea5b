"""report.md and its plots, rebuilt from metrics.json alone (so it can be re-run)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from medfed.server.run.cross_site_report import cross_site_section
from medfed.server.run.hidden_counts import HIDDEN, HIDEABLE, is_hidden, shown_count
from medfed.shared_models.config import RunConfig
from medfed.shared_models.protocol import Metric, Statistic
from medfed.shared_models.run_folder import METRICS_JSON, PLOTS, PREDICTIONS_PNG, REPORT_MD
from medfed.shared_models.tasks import TASKS

# Set by `medfed simulate` for its ServerApp: the launcher writes a completed run's report
# itself, once, after it has drawn the hospitals' example predictions for it.
LAUNCHER_WRITES_REPORT_ENV = "MEDFED_LAUNCHER_WRITES_REPORT"


def write_report(run_dir: Path) -> Path:
    """Plot every round globally and per site, and summarise the run in markdown."""
    data = json.loads((run_dir / METRICS_JSON).read_text())
    config, rounds = data["config"], data["rounds"]
    headline = TASKS[config["task"]].headline_metric
    plots = run_dir / PLOTS
    plots.mkdir(exist_ok=True)
    _plot_global(rounds, headline, plots / "global.png")
    _plot_sites(rounds, headline, plots / "sites.png")

    lines = [
        f"# medfed run: {config['task']} / {config['model']} / {config['strategy']}",
        "",
        f"Status: **{data['status']}**" + (f" — {data['error']}" if data.get("error") else ""),
        "",
    ]
    if rounds:
        first, last = rounds[0]["global"], rounds[-1]["global"]
        lines += [
            f"Global validation {headline}: {_fmt(first.get(headline))} at round 0 → "
            f"{_fmt(last.get(headline))} after round {rounds[-1]['round']} "
            f"({sum(r['seconds'] for r in rounds):.0f}s of rounds).",
            "",
            "## Rounds",
            "",
            "| round | sites replied | failed | train loss | val loss "
            f"| val {headline} | seconds |",
            "|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in rounds:
            g = r["global"]
            lines.append(
                f"| {r['round']} | {len(r['replied'])} | {', '.join(r['failed']) or '-'} | "
                f"{_fmt(g.get(Metric.TRAIN_LOSS))} | {_fmt(g.get(Metric.LOSS))} | "
                f"{_fmt(g.get(headline))} | {r['seconds']:.1f} |"
            )
        lines += _sites_section(rounds[-1])
    lines += cross_site_section(data, run_dir)
    lines += _statistics_section(data, config)
    lines += ["", "![global](plots/global.png)", "", "![sites](plots/sites.png)", ""]
    if (plots / PREDICTIONS_PNG).exists():
        lines += [
            "## Predictions of the global model",
            "",
            f"![predictions](plots/{PREDICTIONS_PNG})",
            "",
        ]
    lines += ["## Configuration", "", "```json", json.dumps(config, indent=2), "```", ""]
    report = run_dir / REPORT_MD
    report.write_text("\n".join(lines))
    return report


def _sites_section(last: dict[str, Any]) -> list[str]:
    """Each site's metrics in the last round; counts under a site's floor never arrived.

    The aggregation weight is bookkeeping (under the floor it is raised to it),
    not something to read, so it is left out.
    """
    keys = sorted({k for s in last["sites"].values() for k in s} - {Metric.WEIGHT})
    lines = [
        "",
        f"## Sites after round {last['round']}",
        "",
        "Counts a site hides (below its floor, or a count a hidden one would follow from) "
        "never leave it: shown as *hidden*.",
        "",
        "| site | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for site, metrics in last["sites"].items():
        cells = [
            "*hidden*"
            if metrics.get(k) == HIDDEN or (k in HIDEABLE and is_hidden(metrics.get(k)))
            else _fmt(metrics.get(k))
            for k in keys
        ]
        lines.append(f"| {site} | " + " | ".join(cells) + " |")
    return lines


def _statistics_section(data: dict[str, Any], config: dict[str, Any]) -> list[str]:
    stats = data.get("site-statistics")
    if not stats:
        return []
    classes = TASKS[config["task"]].label_bins(RunConfig.from_mapping(config))
    lines = [
        "",
        "## Sites before training",
        "",
        "Each site hides the counts below its minimum (its own floor, or `stats-min-count` "
        "if larger) and the counts they would follow from; they never leave it: shown as "
        "hidden.",
        "",
        "| " + " | ".join(["site", "min", "train", "val", *classes, "intensity p1", "p99"]) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(classes) + "---:|---:|",
    ]
    for site, s in sorted(stats.items()):
        cells = [
            site,
            str(s.get(Statistic.MIN_COUNT, "-")),
            shown_count(s[Statistic.NUM_TRAIN]),
            shown_count(s[Statistic.NUM_VAL]),
            *(shown_count(v) for v in s.get(Statistic.LABEL_HISTOGRAM, [])),
            _percentile(s, Statistic.INTENSITY_P1),
            _percentile(s, Statistic.INTENSITY_P99),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _percentile(summary: dict[str, Any], key: str) -> str:
    """An intensity percentile; "-" from a site that sends none (a bundle run's)."""
    return f"{summary[key]:.4g}" if key in summary else "-"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return "-" if value is None else str(value)


def _number(value: Any) -> float:
    """A value to plot: a number, or NaN (a gap) where the site's value is hidden or absent."""
    return float(value) if isinstance(value, int | float) else math.nan


def _plot_global(rounds: list[dict[str, Any]], headline: str, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = [r["round"] for r in rounds]
    left.plot(xs, [r["global"].get(headline, math.nan) for r in rounds], "o-")
    left.set(title=f"global validation {headline}", xlabel="round", ylabel=headline)
    right.plot(xs, [r["global"].get(Metric.LOSS, math.nan) for r in rounds], "o-", label="val loss")
    right.plot(
        xs,
        [r["global"].get(Metric.TRAIN_LOSS, math.nan) for r in rounds],
        "s--",
        label="train loss",
    )
    right.set(title="loss", xlabel="round")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_sites(rounds: list[dict[str, Any]], headline: str, path: Path) -> None:
    sites = sorted({s for r in rounds for s in r["sites"]})
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for site in sites:
        xs = [r["round"] for r in rounds if site in r["sites"]]
        left.plot(
            xs,
            [_number(r["sites"][site].get(headline)) for r in rounds if site in r["sites"]],
            "o-",
            label=site,
        )
        right.plot(
            xs,
            [_number(r["sites"][site].get(Metric.LOSS)) for r in rounds if site in r["sites"]],
            "o-",
            label=site,
        )
    left.set(title=f"validation {headline} per site", xlabel="round")
    right.set(title="validation loss per site", xlabel="round")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
