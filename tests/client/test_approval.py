"""Code approval: a node installs and runs only app packages its hospital approved."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile

import pytest

from medfed.client import app_runner, approval
from tests.audit_log import read_audit


def package(files: dict[str, str]) -> bytes:
    """A Flower app package (FAB): a zip of the app's files."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        for name, text in files.items():
            fab.writestr(name, text)
    return buffer.getvalue()


PYPROJECT = """
[tool.flwr.app.components]
serverapp = "medfed.server.app:app"
clientapp = "evil.app:app"
[tool.flwr.app.config]
lr = 0.1
"""
EVIL = package({"pyproject.toml": PYPROJECT, "evil/app.py": "open('/tmp/x', 'w')\n"})


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A node's state folder, as `medfed node start` points its processes at it."""
    monkeypatch.setenv(approval.STATE_ENV, str(tmp_path))
    monkeypatch.setenv(approval.SITE_ENV, "site-a")
    return tmp_path


def test_an_unapproved_package_is_refused_kept_and_audited(node):
    installed = []
    install = app_runner._checked_install(lambda content, **kw: installed.append(content))
    with pytest.raises(approval.AppNotApproved, match="is not approved at site-a") as err:
        install(EVIL, skip_prompt=True)
    digest = approval.package_hash(EVIL)
    assert digest in str(err.value) and installed == [], "nothing of it was installed"
    assert (node / approval.REFUSED_DIR / f"{digest}.fab").read_bytes() == EVIL
    refusal = [e for e in read_audit(node / "audit.jsonl") if e["event"] == "app-refused"]
    assert refusal[0]["app_sha256"] == digest and refusal[0]["site"] == "site-a"


def test_an_approved_package_installs_and_loads(node):
    approval.approve(node, approval.package_hash(EVIL), note="reviewed by IT")
    installed = []
    app_runner._checked_install(lambda content, **kw: installed.append(content))(EVIL)
    assert installed == [EVIL]
    loader = app_runner._checked_loader(lambda **kw: lambda *a: "the ClientApp")
    assert loader()("fab", "1.0", approval.package_hash(EVIL)) == "the ClientApp"
    approval.revoke(node, approval.package_hash(EVIL))
    with pytest.raises(approval.AppNotApproved):
        app_runner._checked_install(lambda content, **kw: None)(EVIL)
    events = [e["event"] for e in read_audit(node / "audit.jsonl")]
    assert events[:2] == ["app-approved", "app-revoked"]


def test_no_app_loads_from_a_package_that_was_not_checked(node):
    loader = app_runner._checked_loader(lambda **kw: lambda *a: "the ClientApp")
    with pytest.raises(approval.AppNotApproved, match="was not checked"):
        loader()("fab", "1.0", "0" * 64)


def test_without_a_node_state_everything_is_refused(monkeypatch):
    monkeypatch.delenv(approval.STATE_ENV, raising=False)
    with pytest.raises(approval.AppNotApproved):
        approval.check(EVIL)


def test_inspect_shows_what_the_package_would_run(node):
    with pytest.raises(approval.AppNotApproved):
        approval.check(EVIL)  # the node refused it and kept it
    digest = approval.package_hash(EVIL)
    result = subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", "node", "inspect", digest[:12],
         "--state", str(node)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"app package sha256 {digest} (NOT approved" in result.stdout
    assert "runs clientapp = evil.app:app (code from this package)" in result.stdout
    assert "runs serverapp = medfed.server.app:app (code installed at this node: medfed " in (
        result.stdout
    )
    assert "evil/app.py" in result.stdout
    approved = subprocess.run(
        [sys.executable, "-m", "medfed.server.cli", "node", "approve", digest, "--state",
         str(node), "--note", "read every line"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert approved.returncode == 0 and digest in approval.approved(node)
    with pytest.raises(ValueError, match="64 hex characters"):
        approval.approve(node, "not-a-hash")


def test_flowers_clientapp_process_installs_and_loads_only_through_the_check(node, monkeypatch):
    """The check must sit where Flower's ClientApp process looks its install and load
    functions up: after hooking, the very names `run_clientapp` calls refuse an
    unapproved package before a byte of it is written, and load only checked ones."""
    from flwr.supernode.runtime import run_clientapp as flower_process

    for name in app_runner.HOOKED:  # restored after the test
        monkeypatch.setattr(flower_process, name, getattr(flower_process, name))
    monkeypatch.setattr(app_runner, "CHECKED", set())  # a fresh ClientApp process
    monkeypatch.setenv("FLWR_HOME", str(node / "flwr-home"))
    app_runner.hook_approval()
    with pytest.raises(approval.AppNotApproved, match="is not approved at site-a"):
        flower_process.install_from_fab(EVIL, skip_prompt=True)
    assert not (node / "flwr-home").exists(), "nothing of the package was installed"
    load = flower_process.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    with pytest.raises(approval.AppNotApproved, match="was not checked"):
        load("evil", "1.0", approval.package_hash(EVIL))
    assert set(app_runner.HOOKED) <= set(flower_process.run_clientapp.__code__.co_names)
