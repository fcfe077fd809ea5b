"""What the long-running commands share on their command line: options and metrics flags."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

Options = TypeVar("Options")


def options_from(cls: type[Options], args: argparse.Namespace, **given: Any) -> Options:
    """A command's options dataclass: `given` values, the rest from same-named arguments."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    taken = {name: getattr(args, name) for name in names if name not in given}
    return cls(**taken, **given)


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    """--metrics-port and --metrics-host of a long-running service (node or coordinator)."""
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address for --metrics-port (default: this host only; 0.0.0.0 for a Prometheus "
        "elsewhere)",
    )
