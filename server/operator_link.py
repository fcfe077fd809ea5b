"""`medfed operator connect`: `flwr` from an operator's own machine, with the operator's
certificate.

The coordinator's proxy opens the Control API only to a client certificate of
the consortium CA made for an operator (server/proxy.py). Flower's CLI cannot
present one, so this command runs a local Caddy on 127.0.0.1 that forwards to
the coordinator with it, and writes a Flower connection to that local port:
while it runs, `flwr run/ls/log/stop ... <connection>` work as usual.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from medfed.server import proxy
from medfed.shared_models import runtime


@dataclass(frozen=True)
class OperatorOptions:
    """What `medfed operator connect` was asked to do."""

    coordinator: str  # HOST:PORT of the coordinator's proxy
    cert: Path  # the operator's certificate (medfed certs add-operator)
    key: Path
    ca: Path  # the consortium CA certificate
    port: int = 9093  # the local port `flwr` connects to
    connection: str = "consortium"  # the Flower connection name written
    state: Path = Path("operator-state")


def flower_home() -> Path:
    """Where Flower's CLI keeps its connections (FLWR_HOME, else ~/.flwr)."""
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))


def write_connection(home: Path, name: str, port: int) -> Path:
    """Add (or replace) connection `name` -> 127.0.0.1:`port` in Flower's config.toml.

    The hop to the local proxy stays on this machine; the proxy speaks TLS with
    the operator's certificate to the coordinator.
    """
    path = home / "config.toml"
    config = tomllib.loads(path.read_text()) if path.is_file() else {}
    links = config.setdefault("superlink", {})
    links[name] = {"address": f"127.0.0.1:{port}", "insecure": True}
    links.setdefault("default", name)
    home.mkdir(parents=True, exist_ok=True)
    runtime.atomic_write(path, tomli_w.dumps(config).encode())
    return path


def connect(options: OperatorOptions) -> int:
    """Run the local proxy in the foreground; `flwr` uses it through the written connection."""
    runtime.require_files(
        [(options.cert, "--cert"), (options.key, "--key"), (options.ca, "--ca")],
        advice=" (the consortium gives operators a folder from `medfed certs add-operator`)",
    )
    options.state.mkdir(parents=True, exist_ok=True)
    caddyfile = options.state / "Caddyfile"
    caddyfile.write_text(
        proxy.operator_caddyfile(
            options.port,
            options.coordinator,
            (options.cert.resolve(), options.key.resolve(), options.ca.resolve()),
        )
    )
    config = write_connection(flower_home(), options.connection, options.port)
    print(
        f"connected to {options.coordinator} as an operator; wrote connection "
        f"'{options.connection}' to {config}. While this runs: flwr ls {options.connection}"
    )
    service = runtime.Service(proxy.caddy_command(caddyfile), runtime.flower_env())
    return runtime.supervise([service])
