"""deploy/ cannot be run here (no Docker engine): check it statically against the code.

Every medfed flag in a Dockerfile, compose file, Kubernetes manifest or
systemd unit must exist in the CLI, and every Flower flag medfed passes to
flower-superlink / flower-supernode must exist in the installed Flower.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from medfed.client.node import supernode_command
from medfed.server.cli import build_parser
from medfed.server.coordinator.start import superlink_command
from medfed.shared_models.supervision import executable

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROOT = DEPLOY.parent


def _options(*command: str) -> set[str]:
    """The long options a `medfed ...` sub-command accepts, from its parser."""
    parser = build_parser()
    for word in command:
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = sub.choices[word]
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--")}


@functools.cache
def _flower_options(program: str) -> set[str]:
    text = subprocess.run([executable(program), "--help"], capture_output=True, text=True).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", text))


def _medfed_invocations() -> list[tuple[str, list[str]]]:
    """(source, argv after `medfed`) for every place deploy/ starts medfed."""
    found = []
    for path in (DEPLOY / "docker").glob("*.Dockerfile"):
        text = path.read_text()
        entry = re.search(r"^ENTRYPOINT \[(.*)\]$", text, re.M)
        cmd = re.search(r"^CMD \[(.*)\]$", text, re.M)
        words = yaml.safe_load(f"[{entry.group(1)}]") + yaml.safe_load(f"[{cmd.group(1)}]")
        found.append((path.name, words[1:]))
    compose = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            dockerfile = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
            entry = re.search(r"^ENTRYPOINT \[(.*)\]$", dockerfile.read_text(), re.M)
            words = yaml.safe_load(f"[{entry.group(1)}]")
            found.append((f"compose:{name}", [*words[1:], *service["command"]]))
    for path in (DEPLOY / "kubernetes").glob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document["kind"] == "Deployment":
                container = document["spec"]["template"]["spec"]["containers"][0]
                kind = "node" if "node" in container["image"] else "coordinator"
                found.append((path.name, [kind, "start", *container["args"]]))
    for path in (DEPLOY / "systemd").glob("*.service"):
        line = re.search(r"^ExecStart=(.*)$", path.read_text(), re.M).group(1)
        words = shlex.split(line)
        found.append((path.name, words[1:]))
    return found


def test_every_deploy_invocation_uses_existing_medfed_flags():
    invocations = _medfed_invocations()
    assert {source for source, _ in invocations} >= {
        "coordinator.Dockerfile",
        "node.Dockerfile",
        "node-cuda.Dockerfile",
        "compose:coordinator",
        "compose:hospital-a",
        "compose:hospital-b",
        "coordinator.yaml",
        "node.yaml",
        "medfed-node.service",
        "medfed-coordinator.service",
    }
    for source, argv in invocations:
        assert argv[:2] in (["coordinator", "start"], ["node", "start"]), source
        used = {w for w in argv[2:] if w.startswith("--")}
        assert used <= _options(*argv[:2]), (source, used - _options(*argv[:2]))


@pytest.mark.parametrize("tls", [True, False])
def test_medfed_passes_only_flags_flower_knows(tmp_path, tls):
    certs = tmp_path if tls else None
    link = superlink_command(certs, "127.0.0.1", 9092, tmp_path)
    assert {w for w in link if w.startswith("--")} <= _flower_options("flower-superlink")
    node = supernode_command(
        "127.0.0.1:9092",
        tmp_path / "ca.pem" if tls else None,
        tmp_path / "k.key" if tls else None,
        'data-path="/x"',
        9094,
    )
    assert {w for w in node if w.startswith("--")} <= _flower_options("flower-supernode")


def test_compose_and_manifests_parse_and_reference_real_files():
    compose = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    assert {"coordinator", "hospital-a", "hospital-b", "prometheus", "grafana"} <= set(
        compose["services"]
    )
    for service in compose["services"].values():
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    for path in (DEPLOY / "docker").glob("*.Dockerfile"):
        text = path.read_text()
        for source in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):
            assert (ROOT / source).exists(), (path.name, source)
        # the image runs the wheel built in its first stage, never an editable checkout
        assert "pip wheel" in text and "/tmp/dist/medfed-*.whl" in text and "-e ." not in text
    kinds = [
        d["kind"]
        for p in (DEPLOY / "kubernetes").glob("*.yaml")
        for d in yaml.safe_load_all(p.read_text())
        if d
    ]
    assert kinds.count("Deployment") == 2 and "Service" in kinds
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = {
        t
        for job in prometheus["scrape_configs"]
        for s in job["static_configs"]
        for t in s["targets"]
    }
    assert targets == {"coordinator:9400", "hospital-a:9401", "hospital-b:9401"}


def test_deploy_follows_the_roles():
    """Only the proxy's port is published; hospitals' keys are their own; the coordinator
    image carries the proxy."""
    every_file = "\n".join(p.read_text() for p in DEPLOY.rglob("*") if p.is_file())
    assert "add-hospital" not in every_file and "certs/hospitals" not in every_file
    assert "ca.key" not in every_file.replace("never certs/ca.key", "")
    compose = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    assert compose["services"]["coordinator"]["ports"] == ["9092:9092"]
    for name in ("hospital-a", "hospital-b"):
        assert "ports" not in compose["services"][name], "a node publishes nothing"
    for name in ("prometheus", "grafana"):
        assert all(p.startswith("127.0.0.1:") for p in compose["services"][name]["ports"])
    dockerfile = (DEPLOY / "docker" / "coordinator.Dockerfile").read_text()
    assert re.search(r"apt-get install[^\n]* nginx", dockerfile), "the image carries the proxy"
    services = [
        d
        for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "coordinator.yaml").read_text())
        if d and d["kind"] == "Service"
    ]
    assert [p["port"] for s in services for p in s["spec"]["ports"]] == [9092]
