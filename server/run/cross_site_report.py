"""The cross-site matrix in report.md: a table and a heat map, from metrics.json alone.

A missing cell (a hospital that failed, a model without weights) is blank in
both: a blank is no value, never a zero.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from medfed.shared_models.run_folder import CROSS_SITE_PNG, PLOTS

ANNOTATED_CELLS = 400  # beyond this many cells, numbers would not fit in theirs


def heat_grid(cross: dict[str, Any]) -> np.ma.MaskedArray:
    """The headline values, one row per model and one column per site; missing masked."""
    values = cross["values"]
    rows = [
        [math.nan if values[m].get(s) is None else float(values[m][s]) for s in cross["sites"]]
        for m in cross["models"]
    ]
    return np.ma.masked_invalid(np.array(rows, dtype=float).reshape(len(rows), -1))


def plot_heat_map(cross: dict[str, Any], path: Path) -> None:
    """models x sites, coloured by the headline metric, blank where a cell is missing."""
    grid = heat_grid(cross)
    models, sites, metric = cross["models"], cross["sites"], cross["metric"]
    fig, ax = plt.subplots(
        figsize=(min(3.0 + 0.9 * len(sites), 24), min(1.8 + 0.5 * len(models), 18))
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    limits = {} if grid.count() else {"vmin": 0.0, "vmax": 1.0}  # nothing to scale by
    image = ax.imshow(grid, cmap=cmap, aspect="auto", **limits)
    ax.set_xticks(range(len(sites)), sites, rotation=45, ha="right")
    ax.set_yticks(range(len(models)), [f"{m} model" for m in models])
    ax.set(
        xlabel="evaluating site (its own validation split)",
        title=f"cross-site {metric} after round {cross['round']}",
    )
    if grid.size <= ANNOTATED_CELLS:
        for (row, column), value in np.ndenumerate(grid.filled(math.nan)):
            if not math.isnan(value):
                shade = "white" if image.norm(value) < 0.5 else "black"
                ax.text(column, row, f"{value:.3f}", ha="center", va="center", color=shade)
    fig.colorbar(image, ax=ax, label=metric)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cross_site_section(data: dict[str, Any], run_dir: Path) -> list[str]:
    """report.md's cross-site section and its heat map (none, and no stale plot, without
    a matrix in metrics.json)."""
    path = run_dir / PLOTS / CROSS_SITE_PNG
    cross = data.get("cross-site")
    if not cross:
        path.unlink(missing_ok=True)
        return []
    plot_heat_map(cross, path)
    sites, values = cross["sites"], cross["values"]
    lines = [
        "",
        f"## Cross-site evaluation after round {cross['round']}",
        "",
        f"Each model (row) evaluated by each site on its own validation split "
        f"({cross['metric']}). *global* is the final global model; a site's row is its "
        "last local model (its final-round update, before aggregation). A blank cell has "
        "no value; the reasons follow the table.",
        "",
        "| model | " + " | ".join(sites) + " |",
        "|---|" + "---:|" * len(sites),
    ]
    for model in cross["models"]:
        cells = [_cell(values[model].get(site)) for site in sites]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines.append("")
    for model, reason in cross.get("unavailable", {}).items():
        lines.append(f"- {model} model: unavailable ({reason})")
    for model, row in cross.get("failures", {}).items():
        lines += [f"- {model} model at {site}: {reason}" for site, reason in row.items()]
    return [*lines, "", f"![cross-site]({PLOTS}/{CROSS_SITE_PNG})"]


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
