"""`medfed simulate`: a whole federation on this machine with Flower's simulation engine.

It runs the real thing, not a shortcut: a SuperLink in simulation mode on a
free 127.0.0.1 port and `flwr run` of this app, so the ServerApp and
ClientApp are exactly those that run in deployment. The SuperLink and its
Ray workers are stopped by pid when the run ends, fails or is interrupted.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from medfed.server.flower_app import app_dir
from medfed.server.progress import RoundView
from medfed.server.report import write_report
from medfed.shared_models import runtime
from medfed.shared_models.config import ConfigError, RunConfig
from medfed.shared_models.run_folder import METRICS_JSON

CONNECTION = "medfed-simulation"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Simulation:
    """What one `medfed simulate` call runs."""

    overrides: dict[str, Any]
    sites: int
    out: Path
    data: Path | None
    images_per_site: int | None = None
    cpus_per_site: int = 1
    verbose: bool = False
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_linger: float = 0.0


def prepare(sim: Simulation) -> tuple[RunConfig, Path]:
    """Validate everything and lay out data before any process starts."""
    if (sim.out / "metrics.json").exists():
        raise ConfigError(f"output folder {sim.out} already holds a run; choose another --out")
    if sim.sites < 1:
        raise ConfigError(f"--sites {sim.sites}: expected a positive number of hospitals")
    from medfed.client.data.locate import site_folders
    from medfed.client.synthetic import generate_federation

    overrides = dict(sim.overrides)
    overrides.setdefault("min-nodes", min(2, sim.sites))
    if sim.data is not None:
        data = sim.data.expanduser().resolve()
        found = site_folders(data)
        if len(found) < sim.sites:
            raise ConfigError(
                f"--data {data}: {len(found)} site folders with a dataset.json "
                f"or manifest.csv, but --sites is {sim.sites}"
            )
        cfg = RunConfig.from_mapping(
            {**overrides, "data-root": str(data), "out-dir": str(sim.out.resolve())}
        )
    else:
        cfg = RunConfig.from_mapping({**overrides, "out-dir": str(sim.out.resolve())})
        data = sim.out.resolve() / "data"
        print(f"generating {sim.sites} synthetic hospitals ({cfg.task}) in {data}")
        generate_federation(
            cfg.task, sim.sites, data, seed=cfg.seed, images_per_site=sim.images_per_site
        )
        cfg = RunConfig.from_mapping({**cfg.to_mapping(), "data-root": str(data)})
    from medfed.client.data.site import load_site

    if cfg.pretrained_weights:  # fail before anything starts, with the same report
        from medfed.shared_models.pretrained import load_pretrained
        from medfed.shared_models.tasks import TASKS

        path = Path(cfg.pretrained_weights).expanduser().resolve()
        load_pretrained(TASKS[cfg.task].build_network(cfg), path)
        cfg = RunConfig.from_mapping({**cfg.to_mapping(), "pretrained-weights": str(path)})
    for folder in site_folders(data)[: sim.sites]:
        load_site(folder, cfg)  # every hospital's data is checked before anything starts
    if cfg.min_nodes > sim.sites:
        raise ConfigError(
            f"config key 'min-nodes' = {cfg.min_nodes}: more than the "
            f"{sim.sites} simulated hospitals"
        )
    return cfg, data


def run(sim: Simulation) -> int:
    """Run the simulation; 0 when the run completed, 1 otherwise."""
    cfg, data = prepare(sim)
    out = cfg.out_path
    out.mkdir(parents=True, exist_ok=True)
    run_config = out / "run-config.toml"
    run_config.write_text(tomli_w.dumps(cfg.to_mapping()))
    started = time.monotonic()
    extra_env: dict[str, str] = {}
    if sim.metrics_port is not None:
        metrics_dir = out / "logs" / "prometheus"
        runtime.export_metrics(metrics_dir, sim.metrics_port, sim.metrics_host, extra_env)
        print(f"metrics: http://{sim.metrics_host}:{sim.metrics_port}/metrics")
    with simulation_superlink(out / "logs", extra_env) as (env, port):
        print(
            f"federation: {sim.sites} hospitals, {cfg.task}/{cfg.model}, {cfg.strategy}, "
            f"{cfg.num_server_rounds} rounds (simulation SuperLink on 127.0.0.1:{port})"
        )
        with RoundView(sim.verbose) as view:
            flwr_run(
                run_config,
                sites=sim.sites,
                cpus_per_site=sim.cpus_per_site,
                env=env,
                log_file=out / "logs" / "flower-run.log",
                on_line=view.line,
            )
    code = _conclude(cfg, data, time.monotonic() - started)
    if sim.metrics_port is not None and sim.metrics_linger > 0:
        print(f"serving final metrics for {sim.metrics_linger:.0f}s more")
        time.sleep(sim.metrics_linger)
    return code


@contextmanager
def simulation_superlink(
    logs: Path, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[dict[str, str], int]]:
    """A SuperLink in simulation mode on a free port, with a private FLWR_HOME.

    Yields the environment for `flwr` commands (its connection is the default)
    and the port; the SuperLink and its workers are stopped by pid on exit.
    """
    home = Path(tempfile.mkdtemp(prefix="medfed-flwr-"))
    port = runtime.free_port()
    connection = {"address": f"127.0.0.1:{port}", "insecure": True}
    (home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}})
    )
    env = {**runtime.flower_env(home), **(extra_env or {})}
    log_file = logs / "superlink.log"
    command = [
        runtime.executable("flower-superlink"), "--insecure", "--simulation",
        "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation", "--database", str(home / "state.db"),
    ]  # fmt: skip
    superlink = runtime.start(command, log_file, env)
    try:
        runtime.wait_until(runtime.http_healthy(port), superlink, 60, "flower-superlink", log_file)
        yield env, port
    finally:
        runtime.stop(superlink)
        shutil.rmtree(home, ignore_errors=True)


def flwr_run(
    run_config: Path | str,
    *,
    sites: int,
    cpus_per_site: int,
    env: dict[str, str],
    log_file: Path,
    on_line: Callable[[str], None] = lambda line: None,
) -> None:
    """`flwr run` this app and stream its log until the run ends.

    `run_config` is a TOML file or a Flower `key=value ...` override string;
    `env` comes from `simulation_superlink` (its FLWR_HOME holds the app).
    """
    federation = (
        f"num-supernodes={sites} "
        f"client-resources-num-cpus={cpus_per_site} client-resources-num-gpus=0.0"
    )
    command = [
        runtime.executable("flwr"), "run", str(app_dir(Path(env["FLWR_HOME"]) / "app")), CONNECTION,
        "--run-config", str(run_config), "--federation-config", federation, "--stream",
    ]  # fmt: skip
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with (
        log_file.open("a") as log,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        ) as flwr,
    ):
        assert flwr.stdout is not None
        for raw in flwr.stdout:
            line = _ANSI.sub("", raw)
            log.write(line)
            on_line(line)
        if flwr.wait() != 0:
            raise RuntimeError(f"`flwr run` exited with code {flwr.returncode}; see {log_file}")


def _conclude(cfg: RunConfig, data: Path, seconds: float) -> int:
    out = cfg.out_path
    metrics_path = out / METRICS_JSON
    if not metrics_path.exists():
        print(f"the run did not start; see {out / 'logs'}", file=sys.stderr)
        return 1
    result = json.loads(metrics_path.read_text())
    if result["status"] != "completed":
        reason = result.get("error", "the ServerApp stopped early; see logs/flower-run.log")
        print(f"run {result['status']}: {reason}", file=sys.stderr)
        return 1
    from medfed.client.preview import save_predictions

    save_predictions(out, data)
    report = write_report(out)
    last = result["rounds"][-1]["global"]
    headline = _headline(cfg)
    print(
        f"done in {seconds:.0f}s: final global validation {headline} "
        f"{last.get(headline, float('nan')):.4f}"
    )
    print(f"report: {report}")
    return 0


def _headline(cfg: RunConfig) -> str:
    from medfed.shared_models.tasks import TASKS

    return TASKS[cfg.task].headline_metric
