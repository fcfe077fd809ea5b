"""What `medfed simulate` shows while a federation runs.

On a terminal: a live table, one row per round. In a log (CI, nohup, a
pipe): the plain round lines only, no cursor tricks.
"""

from __future__ import annotations

import json
import re
import sys
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.table import Table

from medfed.server.log_tags import PROGRESS_TAG, ROUND_EVENT_TAG, RUN_END_TAG

_PROGRESS = re.compile(re.escape(PROGRESS_TAG) + r" (.*)$")
_EVENT = re.compile(re.escape(ROUND_EVENT_TAG) + r" (\{.*\})\s*$")


def run_ended(raw: str) -> bool:
    """Whether a streamed log line is the ServerApp's last (RUN_END_TAG)."""
    return RUN_END_TAG in raw


class RoundView:
    """Feed it Flower's streamed log lines; it prints what a person needs."""

    def __init__(self, verbose: bool = False, interactive: bool | None = None) -> None:
        self.verbose = verbose
        self.interactive = (
            sys.stdout.isatty() if interactive is None else interactive
        ) and not verbose
        self.console = Console()
        self.table = Table(title="rounds", expand=False)
        for column in (
            "round",
            "sites",
            "failed",
            "train loss",
            "val metric",
            "val loss",
            "seconds",
        ):
            self.table.add_column(column, justify="right")
        self.live: Live | None = None

    def __enter__(self) -> RoundView:
        if self.interactive:
            self.live = Live(self.table, console=self.console, refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.live is not None:
            self.live.__exit__(kind, error, trace)

    def line(self, raw: str) -> None:
        if self.verbose:
            print(raw, end="")
            return
        event = _EVENT.search(raw)
        if event:
            if self.live is not None:
                self._add_row(json.loads(event.group(1)))
            return
        progress = _PROGRESS.search(raw.rstrip())
        if not progress:
            return
        text = progress.group(1)
        if self.live is not None:
            if not text.startswith("round "):  # rounds are in the table
                self.live.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def _add_row(self, row: dict) -> None:
        def number(value: float | None) -> str:
            return "-" if value is None else f"{value:.4f}"

        cells = [
            f"{row['round']}/{row['rounds']}",
            str(row["replied"]),
            str(row["failed"]),
            number(row["train-loss"]),
            f"{row['metric']} {number(row['value'])}",
            number(row["loss"]),
            f"{row['seconds']:.1f}",
        ]
        self.table.add_row(*cells)
