"""Missing credentials stop a start before anything runs, named alike by both roles."""

import pytest

from medfed.shared_models.credentials import CredentialsError


def test_missing_credentials_are_named_the_same_way_by_node_and_coordinator(tmp_path):
    from medfed.client.node import NodeOptions, start_node
    from medfed.server.coordinator.start import CoordinatorOptions, start_coordinator

    site = tmp_path / "site"
    with pytest.raises(CredentialsError, match="no --ca given"):
        start_node(NodeOptions("127.0.0.1:9092", None, None, site, "site-a"))
    ca, key = tmp_path / "ca.pem", tmp_path / "site-a.key"
    with pytest.raises(CredentialsError, match=f"--ca {ca}: file not found"):
        start_node(NodeOptions("127.0.0.1:9092", ca, key, site, "site-a"))
    ca.write_text("a certificate")
    with pytest.raises(CredentialsError, match=f"--key {key}: file not found"):
        start_node(NodeOptions("127.0.0.1:9092", ca, key, site, "site-a"))
    with pytest.raises(CredentialsError, match="no --certs given"):
        start_coordinator(CoordinatorOptions(certs=None, state=tmp_path / "state"))
    with pytest.raises(
        CredentialsError, match=r"ca\.pem: file not found \(run `medfed certs init`\)"
    ):
        start_coordinator(CoordinatorOptions(certs=tmp_path / "certs", state=tmp_path / "state"))
    assert not (tmp_path / "state").exists(), "nothing is started or written"
