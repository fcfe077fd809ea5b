"""Where `medfed simulate` runs the hospitals: a private Ray on this machine, or a Ray cluster.

Flower's simulation engine has no setting for a cluster address: the run's
federation config reaches `ray.init` only as CPU/GPU counts and logging
options (flwr/simulation/app.py, `_run_simulation_settings`), and the Ray
backend calls `ray.init(runtime_env=..., **init_args)` without an address
(flwr/server/superlink/fleet/vce/backend/raybackend.py, `RayBackend.init_ray`).
`ray.init` then takes the address from the RAY_ADDRESS environment variable
(ray/_private/worker.py, `init`): an address joins that cluster, `local`
starts a private instance. medfed sets RAY_ADDRESS in the environment of the
SuperLink, which its SuperExec and `flwr-simulation` (the Ray driver) inherit,
so each hospital's ClientApp runs as a Ray actor wherever the cluster places
it. A private run always sets `local`: a RAY_ADDRESS left in the shell, or a
`ray start` on this machine, is never joined by accident.

The cluster's own processes (GCS, raylets, their workers) were not started by
medfed and carry none of its process tags, so stopping a run never stops them;
the run's actors end with its driver.
"""

from __future__ import annotations

import os
import socket

from medfed.shared_models.config import ConfigError

ADDRESS_ENV = "RAY_ADDRESS"
LOCAL = "local"  # a private Ray instance on this machine, stopped with the run
AUTO = "auto"  # the cluster RAY_ADDRESS names, else the last `ray start` on this machine
PROBE_SECONDS = 5.0


def resolve(given: str) -> str:
    """The RAY_ADDRESS for the run: `local`, or the HOST:PORT of a cluster that answers.

    Checked before anything starts, so that a wrong address is one line naming
    it rather than a run that fails inside Flower's driver.
    """
    if given == LOCAL:
        return LOCAL
    if "://" in given:  # Flower's driver needs a raylet on its own machine
        raise ConfigError(
            f"--ray-address {given}: Ray Client addresses are not supported; run medfed "
            "simulate on a node of the cluster and give the head's HOST:PORT"
        )
    address = _auto_address() if given == AUTO else given
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray-address {given}: expected HOST:PORT, '{AUTO}' or '{LOCAL}'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except OSError as err:
        shown = given if given == address else f"{given} ({address})"
        raise ConfigError(
            f"--ray-address {shown}: no Ray cluster answers there ({err.strerror or err}); "
            f"start its head with `ray start --head --port {port}` or check the address"
        ) from None
    return address


def _auto_address() -> str:
    """What Ray itself calls `auto`, minus its last resort: RAY_ADDRESS, else the address
    the last `ray start` on this machine recorded. Ray would then join any GCS it finds
    running here, which may be another simulation's private instance."""
    from_env = os.environ.get(ADDRESS_ENV, "")
    if from_env and from_env not in (AUTO, LOCAL):
        return from_env
    from ray._private.utils import read_ray_address  # the file `ray start` writes

    recorded = read_ray_address()
    if not recorded:
        raise ConfigError(
            f"--ray-address {AUTO}: no cluster found: {ADDRESS_ENV} is not set and no "
            "`ray start` on this machine recorded one; give the head's HOST:PORT"
        )
    return recorded
