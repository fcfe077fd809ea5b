"""`medfed coordinator start` as an operator runs it: what the services it supervises get."""

from __future__ import annotations

import pytest

from medfed.server.coordinator import certificates as certs
from medfed.server.coordinator import start as coordinator
from medfed.shared_models import supervision


@pytest.fixture(params=["tls", "insecure"])
def started(request, tmp_path, supervised):
    """Run `start_coordinator` up to the point it would supervise its services; returns
    the services it would have started (SuperLink, and with certificates the proxy)."""
    folder = tmp_path / "certs"
    insecure = request.param == "insecure"
    if not insecure:
        certs.init_consortium(folder, ["127.0.0.1"])
    options = coordinator.CoordinatorOptions(
        certs=None if insecure else folder,
        state=tmp_path / "state",
        port=supervision.free_port(),
        insecure=insecure,
    )
    assert coordinator.start_coordinator(options) == 0
    return supervised


def test_no_coordinator_service_inherits_flowers_internal_api_switches(started):
    """FLWR_INTERNAL_GRPC_* would open Flower's legacy gRPC APIs on every interface, past
    the proxy: neither the SuperLink nor the proxy is started with them."""
    assert started
    for service in started:
        assert not [k for k in service.env if k.startswith("FLWR_INTERNAL_")], service.command
