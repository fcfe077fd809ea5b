"""The coordinator's front door: nginx routes each API to who may use it, within bounds.

Flower 1.42's SuperLink serves the Fleet API (hospitals), the Control API
(operators: start and stop runs, register nodes) and the Runtime API (its own
ServerApp processes) on one port; the open-source build authenticates no one
on Control, and it parses a Fleet request's whole body before it checks the
node's signature. So the SuperLink listens on loopback only, and nginx (the
Debian package `nginx`) listens where hospitals connect:

- `/v1/fleet/*` and `/health`: everyone with TLS (hospitals then prove who
  they are with their SuperNode keys, as Flower checks);
- `/v1/control/*`: only a client certificate of the consortium CA made for an
  operator (`medfed certs add-operator`, subject OU=operators); anyone else
  gets 403;
- anything else, the Runtime API included, and any request whose raw path is
  not a plain endpoint path (nginx routes on the normalised path but forwards
  the raw one): 404. The Runtime API never leaves the host.

Every request is bounded before the SuperLink sees a byte of it: nginx
receives the whole body first (refusing it with 413 past its route's limit),
each client address gets a share of connections and of the request rate
(beyond it: 503, which Flower's HTTP client retries with back-off), and slow
senders time out. nginx is chosen over Caddy for the per-client connection
and rate limits, which stock Caddy does not have.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
from dataclasses import dataclass, field
from pathlib import Path

OPERATOR_OU = "operators"
# OU=operators as an attribute of the verified client certificate's subject (RFC 2253,
# as nginx's $ssl_client_s_dn writes it): after the start or an unescaped comma (a name
# holding "\,OU=operators" does not match).
OPERATOR_SUBJECT = rf"(^|[^\\],)OU={OPERATOR_OU}(,|$)"
# Debian installs nginx in /usr/sbin, which is not on an ordinary user's PATH.
NGINX_DIRS = ("/usr/sbin", "/usr/local/sbin")
# Requests the SuperLink works on at once (nginx answers 502 beyond, which Flower
# retries): with the Fleet body limit, this bounds what the SuperLink holds in parsing.
UPSTREAM_CONNECTIONS = 32
NGINX_MISSING = (
    "nginx not found (on PATH or in /usr/sbin): the coordinator's proxy needs it; "
    "install the Debian package 'nginx' (apt-get install nginx, or make tools)"
)


@dataclass(frozen=True)
class Limits:
    """What one request and one client address may take (docs/operator.md, "Limits").

    Fleet bodies are sized from the largest request a hospital sends: one
    push-object of an array chunk, at most 5 MiB (Flower's
    FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE) plus its framing, whatever the model's
    size (tests/bench/fleet_requests.py measures it). Control bodies carry a
    run's app package on start-run, at most 10 MB (Flower's FAB_MAX_SIZE).
    """

    fleet_body_mib: int = 8
    control_body_mib: int = 16
    connections_per_client: int = 32
    requests_per_second: int = 50  # sustained; bursts of twice this pass at once


@dataclass(frozen=True)
class Upstream:
    """The SuperLink behind the proxy: on loopback, with TLS from the consortium CA."""

    port: int
    ca: Path


@dataclass(frozen=True)
class FrontDoor:
    """Everything the coordinator's nginx configuration is made of."""

    listen: tuple[str, int]
    certs: tuple[Path, Path, Path]  # server certificate, its key, the consortium CA
    upstream: Upstream
    folder: Path  # nginx's pid file and temporary request bodies (in the coordinator's state)
    limits: Limits = field(default_factory=Limits)


def nginx_executable() -> str:
    """The nginx binary: on PATH, else in the sbin folders; RuntimeError naming the fix."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *NGINX_DIRS])
    found = shutil.which("nginx", path=search)
    if found is None:
        raise RuntimeError(NGINX_MISSING)
    return found


def nginx_command(conf: Path, nginx: str | None = None) -> list[str]:
    """The command that serves `conf` (an absolute path) in the foreground, logging to
    its stderr; `nginx`: the binary (default: found by `nginx_executable`)."""
    binary = nginx or nginx_executable()
    return [binary, "-e", "stderr", "-p", str(conf.parent), "-c", str(conf)]


def worker_user(folder: Path) -> str | None:
    """Whom nginx's workers run as: None unless started as root, then the owner of
    `folder`, since the workers write request bodies under it (nginx's own default,
    `nobody`, may not even reach a private state folder)."""
    if os.geteuid() != 0:
        return None
    status = folder.stat()
    try:
        return f"{pwd.getpwuid(status.st_uid).pw_name} {grp.getgrgid(status.st_gid).gr_name}"
    except KeyError:
        raise RuntimeError(
            f"{folder}: its owner (uid {status.st_uid}, gid {status.st_gid}) has no name, which "
            "nginx's workers need to run as it; chown the state folder to a named user"
        ) from None


def nginx_conf(door: FrontDoor, user: str | None = None) -> str:
    """The coordinator's nginx.conf: TLS on `door.listen` for everyone, routes by role,
    every request bounded. `user`: the workers' user and group (see `worker_user`)."""
    folder = door.folder
    head = f"user {user};\n" if user else ""
    return f"""# Written by `medfed coordinator start` (server/coordinator/proxy.py);
# changes are overwritten.
{head}daemon off;
worker_processes auto;
pid {_q(folder / "nginx.pid")};
events {{
	worker_connections 1024;
}}
http {{
	server_tokens off;
	access_log off;
	default_type text/plain;
{_temp_paths(folder)}
{_bounds(door.limits)}
{_operator_map()}
{_upstream(door.upstream)}
{_server(door)}
}}
"""


def _temp_paths(folder: Path) -> str:
    """Every temporary folder nginx makes at start-up, inside `folder` (its compiled-in
    defaults are under /var/lib/nginx, which only root may write)."""
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    return "\n".join(f"\t{kind}_temp_path {_q(folder / kind)};" for kind in kinds)


def _bounds(limits: Limits) -> str:
    """Per-client connection and rate limits, and timeouts for slow senders."""
    rate = limits.requests_per_second
    return f"""	limit_conn_zone $binary_remote_addr zone=per_client:10m;
	limit_req_zone $binary_remote_addr zone=per_client_rate:10m rate={rate}r/s;
	limit_conn per_client {limits.connections_per_client};
	limit_req zone=per_client_rate burst={2 * rate} nodelay;
	limit_conn_status 503;
	limit_req_status 503;
	limit_conn_log_level warn;
	limit_req_log_level warn;
	client_header_timeout 10s;
	client_body_timeout 30s;
	send_timeout 30s;
	keepalive_timeout 30s;
	client_body_buffer_size 64k;
	client_max_body_size {limits.fleet_body_mib}m;"""


def _operator_map() -> str:
    """$operator is 1 for a client certificate that the consortium CA verified and whose
    subject has OU=operators as an attribute of its own."""
    return f"""	map $ssl_client_verify $verified_subject {{
		SUCCESS $ssl_client_s_dn;
		default "";
	}}
	map $verified_subject $operator {{
		{_q("~" + OPERATOR_SUBJECT)} 1;
		default 0;
	}}"""


def _upstream(upstream: Upstream) -> str:
    """The SuperLink on loopback, over TLS checked against the consortium CA; a request
    reaches it only once nginx holds its whole body."""
    return f"""	upstream superlink {{
		zone superlink 64k;
		server 127.0.0.1:{upstream.port} max_conns={UPSTREAM_CONNECTIONS};
		keepalive 16;
	}}
	proxy_http_version 1.1;
	proxy_set_header Connection "";
	proxy_request_buffering on;
	proxy_next_upstream off;
	proxy_ssl_trusted_certificate {_q(upstream.ca)};
	proxy_ssl_verify on;
	proxy_ssl_name localhost;  # the certificate names it (nginx matches no IP address)
	proxy_ssl_session_reuse on;"""


def _server(door: FrontDoor) -> str:
    (host, port), (cert, key, ca) = door.listen, door.certs
    address = f"[{host}]" if ":" in host else host
    control = door.limits.control_body_mib
    return f"""	server {{
		listen {address}:{port} ssl;
		ssl_protocols TLSv1.2 TLSv1.3;
		ssl_certificate {_q(cert)};
		ssl_certificate_key {_q(key)};
		ssl_client_certificate {_q(ca)};
		ssl_verify_client optional;
		location = /health {{
{_forward("/health")}
		}}
		location /v1/fleet/ {{
{_forward("/v1/fleet/[a-z-]+")}
		}}
		location /v1/control/ {{
			client_max_body_size {control}m;
			if ($operator != 1) {{
				return 403 "the Control API answers operators only (medfed certs add-operator)\\n";
			}}
			proxy_buffering off;
			proxy_read_timeout 1h;
{_forward("/v1/control/[a-z-]+")}
		}}
		location / {{
			return 404;
		}}
	}}"""


def _forward(plain: str) -> str:
    """Forward to the SuperLink only a request whose raw path, as sent, is `plain`: nginx
    forwards the raw path, so "/v1/fleet/%2e%2e/control/..." must not reach it."""
    return f"""			if ($request_uri !~ {_q(f"^{plain}$")}) {{
				return 404;
			}}
			proxy_pass https://superlink;"""


def _q(value: object) -> str:
    """`value` as one quoted nginx word (a state folder's path may hold spaces)."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
