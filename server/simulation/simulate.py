"""`medfed simulate`: a whole federation on this machine with Flower's simulation engine.

It runs the real thing, not a shortcut: a SuperLink in simulation mode on a
free 127.0.0.1 port and `flwr run` of this app, so the ServerApp and
ClientApp are exactly those that run in deployment. The SuperLink and its
Ray workers are stopped by pid when the run ends, fails or is interrupted.
With `--ray-address` the hospitals run as actors on an existing Ray cluster
instead (server/simulation/ray_cluster.py), which outlives the run.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from medfed.server.run import run_status
from medfed.server.run.report import LAUNCHER_WRITES_REPORT_ENV, write_report
from medfed.server.run.resume import check_network, load_resume_point
from medfed.server.simulation import failed_start, ray_cluster
from medfed.server.simulation.flower_app import app_dir
from medfed.server.simulation.progress import RoundView, run_ended
from medfed.shared_models import metrics_exporter, processes, supervision
from medfed.shared_models.config import ConfigError, RunConfig
from medfed.shared_models.run_folder import METRICS_JSON, REPORT_MD

if TYPE_CHECKING:
    from medfed.client.data.site_declarations import SiteDeclarations

CONNECTION = "medfed-simulation"
RUN_CONFIG = "run-config.toml"  # the run's settings, as `flwr run` got them (and --resume reads)
FEDERATION = "federation.toml"  # how many hospitals, their CPUs, which Ray (--resume reads)
COMPLETED_GRACE = 0.5  # s before SIGKILL for the processes of a run that completed
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
    resume: bool = False  # carry on the run in `out` from its last completed round
    ray_address: str = ray_cluster.LOCAL  # or an existing cluster: HOST:PORT, auto
    started: float = field(default_factory=time.monotonic)  # the command's start
    found: SiteDeclarations | None = None  # the sites of `data`, as the command line found them


MAX_SITES = 1000  # simulated hospitals (one Ray actor slot each)
# A synthetic site needs a few images for both its splits (synthetic.sites draws >= 8).
IMAGES_PER_SITE = (8, 100_000)


def prepare(sim: Simulation) -> tuple[RunConfig, Path]:
    """Validate everything, then lay out data, before any process starts."""
    if sim.resume:
        return prepare_resume(sim)
    cfg, sites = _checked_settings(sim)
    from medfed.client.synthetic import generate_federation

    if sites is not None:
        data, folders = Path(cfg.data_root), sites.folders
        if len(folders) < sim.sites:
            raise ConfigError(
                f"--data {data}: {len(folders)} site folders, but --sites is {sim.sites}"
            )
    else:
        data = cfg.out_path / "data"
        print(f"generating {sim.sites} synthetic hospitals ({cfg.task}) in {data}")
        folders = generate_federation(
            cfg.task, sim.sites, data, seed=cfg.seed, images_per_site=sim.images_per_site
        )
        cfg = RunConfig.from_mapping({**cfg.to_mapping(), "data-root": str(data)})
    check = _site_check(cfg)
    for folder in folders:
        check(folder)  # every hospital's data is checked before anything starts
    return cfg, data


def find_sites(data: Path) -> SiteDeclarations:
    """The site folders under `data`, with what their dataset.json declare: listed and read
    once per run, when first needed (the command line counts them and names the run's
    folder by them; `prepare` checks them and takes the task and classes they declare; the
    example predictions are drawn on the first)."""
    from medfed.client.data.site_declarations import SiteDeclarations

    return SiteDeclarations(root=data)


def site_declarations(folders: list[Path]) -> SiteDeclarations:
    """What the dataset.json of `folders` declare alike (task, classes), each read once."""
    from medfed.client.data.site_declarations import SiteDeclarations

    return SiteDeclarations(folders)


def _site_check(cfg: RunConfig) -> Callable[[Path], object]:
    """How a site folder is checked: medfed's scan, or for a bundle the site's datalist."""
    if cfg.task == "bundle":
        from medfed.client.bundle_data import bundle_datalist

        return partial(bundle_datalist, cfg=cfg)
    from medfed.client.data.site import load_site

    return partial(load_site, cfg=cfg)


def _checked_settings(sim: Simulation) -> tuple[RunConfig, SiteDeclarations | None]:
    """The run's config, with every check that needs no images done first: the output
    folder, the number of hospitals and images, the quorum, the classes, the initial
    weights; and the sites of --data it runs on (None: synthetic ones)."""
    if (sim.out / METRICS_JSON).exists():
        raise ConfigError(
            f"output folder {sim.out} already holds a run; choose another --out "
            f"(or carry it on with --resume {sim.out})"
        )
    if not 1 <= sim.sites <= MAX_SITES:
        raise ConfigError(f"--sites {sim.sites}: expected 1..{MAX_SITES} hospitals")
    low, high = IMAGES_PER_SITE
    if sim.images_per_site is not None and not low <= sim.images_per_site <= high:
        raise ConfigError(f"--images-per-site {sim.images_per_site}: expected {low}..{high}")
    overrides = {**sim.overrides, "out-dir": str(sim.out.resolve())}
    overrides.setdefault("min-nodes", min(2, sim.sites))
    sites = None
    if sim.data is not None:
        overrides["data-root"] = str(sim.data.expanduser().resolve())
        sites = (sim.found or find_sites(Path(overrides["data-root"]))).first(sim.sites)
        overrides = classes_from_sites(task_from_sites(overrides, sites), sites)
    cfg = RunConfig.from_mapping(overrides)
    if cfg.min_nodes > sim.sites:
        raise ConfigError(
            f"config key 'min-nodes' = {cfg.min_nodes}: more than the "
            f"{sim.sites} simulated hospitals"
        )
    if cfg.task == "bundle":  # its network builds; the hospitals and coordinator find it
        from medfed.shared_models.monai_bundle import Bundle

        if sim.data is None:
            raise ConfigError(
                "task = bundle trains on site folders: pass --data (a folder of site "
                "folders, each with a dataset.json); medfed makes no synthetic data for a bundle"
            )
        bundle = Bundle(cfg.bundle)
        bundle.network()
        cfg = RunConfig.from_mapping({**cfg.to_mapping(), "bundle": str(bundle.root)})
    if cfg.pretrained_weights:  # fail before anything starts, with the same report
        from medfed.shared_models.pretrained import load_pretrained
        from medfed.shared_models.tasks import TASKS

        path = Path(cfg.pretrained_weights).expanduser().resolve()
        load_pretrained(TASKS[cfg.task].build_network(cfg), path)
        cfg = RunConfig.from_mapping({**cfg.to_mapping(), "pretrained-weights": str(path)})
    return cfg, sites


def task_from_sites(values: dict[str, Any], sites: SiteDeclarations) -> dict[str, Any]:
    """`values` (run-config keys) with the task that the hospitals of `sites` declare
    alike in their dataset.json, where `values` names none (--task, -c task=... win);
    said in one line and recorded like any setting. `medfed simulate --data` and
    `medfed bench quality --data` resolve their runs with it."""
    if str(values.get("task") or "").strip():
        return values
    task = sites.task()
    if task is None:
        return values
    print(f"task from the sites' dataset.json: {task}")
    return {**values, "task": task}


def classes_from_sites(values: dict[str, Any], sites: SiteDeclarations) -> dict[str, Any]:
    """`values` with the classes that the hospitals of `sites` declare alike in their
    dataset.json, where `values` names none (-c class-names=... wins); said in one line
    and recorded like any setting (the ServerApp builds the network from them)."""
    if str(values.get("class-names") or "").strip():
        return values
    classes = sites.classes()
    if classes is None:
        return values
    values = _with_classes(values, classes)
    print(f"classes from the sites' dataset.json: {', '.join(classes)}")
    return values


def _with_classes(values: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """`values` with the sites' classes; ConfigError naming them where they do not suit the
    run's other settings. Settings faulty without them (or partial: the bench's methods
    add their own) are left to the caller's own check of the whole config."""
    named = {**values, "class-names": ",".join(classes)}
    try:
        RunConfig.from_mapping(named)
    except ConfigError as err:
        try:
            RunConfig.from_mapping(values)
        except ConfigError:
            return named  # not the classes' fault
        names = ", ".join(classes)
        raise ConfigError(f"classes from the sites' dataset.json ({names}): {err}") from None
    return named


def prepare_resume(sim: Simulation) -> tuple[RunConfig, Path]:
    """The interrupted run's own settings (with the overrides a resumed run may change),
    its data, and a check of its last checkpoint, before any process starts."""
    out = sim.out.expanduser().resolve()
    settings = out / RUN_CONFIG
    if not settings.is_file():
        raise ConfigError(f"--resume {out}: no {RUN_CONFIG}: not a folder `medfed simulate` wrote")
    run_status.close(out, "failed", run_status.DIED)  # its ServerApp is gone
    recorded = tomllib.loads(settings.read_text())
    if failed_start.nothing_completed(out):
        kept = failed_start.set_aside(out)
        print(f"no round of {out} completed: starting it again with its own settings "
              f"(the failed attempt's record: {kept})")  # fmt: skip
        again = {**recorded, **sim.overrides, "out-dir": str(out), "resume-from": ""}
        cfg = RunConfig.from_mapping(again)
        return cfg, Path(cfg.data_root)
    cfg = RunConfig.from_mapping(
        {**recorded, **sim.overrides, "out-dir": str(out), "resume-from": str(out)}
    )
    point = load_resume_point(cfg, None)
    check_network(cfg, point)
    print(f"resuming {out} after round {point.server_round} of {cfg.num_server_rounds}")
    return cfg, Path(cfg.data_root)


def resumed(out: Path, overrides: dict[str, Any]) -> Simulation:
    """The simulation of the run in `out` again, as `medfed simulate --resume` carries it on:
    the same hospitals, CPUs and Ray (runs recorded before clusters were supported ran on
    a private one)."""
    federation = out / FEDERATION
    if not federation.is_file():
        raise ConfigError(f"--resume {out}: no {FEDERATION}: not a folder `medfed simulate` wrote")
    recorded = tomllib.loads(federation.read_text())
    return Simulation(
        overrides=overrides,
        sites=int(recorded["sites"]),
        out=out,
        data=None,
        cpus_per_site=int(recorded["cpus-per-site"]),
        resume=True,
        ray_address=str(recorded.get("ray-address", ray_cluster.LOCAL)),
    )


def run(sim: Simulation) -> int:
    """Run the simulation; 0 when the run completed, 1 otherwise.

    SIGINT or SIGTERM stops every process it started, the detached ones
    included, and marks the run interrupted (StopRequested is re-raised).
    A Ray cluster it joined is not one of them.
    """
    ray_address = ray_cluster.resolve(sim.ray_address)  # first: nothing is written on a miss
    if sim.data is not None and sim.found is None:  # listed once, when a step first needs them
        sim = replace(sim, found=find_sites(sim.data.expanduser().resolve()))
    cfg, data = prepare(sim)
    out = cfg.out_path
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_CONFIG).write_text(tomli_w.dumps(cfg.to_mapping()))
    federation = {
        "sites": sim.sites,
        "cpus-per-site": sim.cpus_per_site,
        "ray-address": sim.ray_address,  # as given: `auto` is looked up again on --resume
    }
    (out / FEDERATION).write_text(tomli_w.dumps(federation))
    try:
        with processes.stop_signals_raise():
            code = _run(sim, cfg, data, ray_address)
            failure = failed_start.ray_failure(out) if code else None
            if failure is not None:
                kept = failed_start.set_aside(out)
                print(f"Ray failed while the federation started ({failure}; the record: "
                      f"{kept}): starting it once more", file=sys.stderr)  # fmt: skip
                code = _run(sim, cfg, data, ray_address)
            return code
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        reason = f"stopped by {signal.Signals(signum).name}; carry it on with --resume {out}"
        with processes.signals_ignored():
            if run_status.close(out, "interrupted", reason):
                print(f"run interrupted: {reason}", file=sys.stderr)
            else:
                _report_if_missing(out)
        raise


def _report_if_missing(out: Path) -> None:
    """The report of a run that completed, where this command was stopped before writing it
    (the ServerApp leaves a completed run's report to the command)."""
    metrics = out / METRICS_JSON
    missing = metrics.is_file() and not (out / REPORT_MD).exists()
    if missing and json.loads(metrics.read_text()).get("status") == "completed":
        write_report(out)


def _run(sim: Simulation, cfg: RunConfig, data: Path, ray_address: str) -> int:
    out = cfg.out_path
    run_config = out / RUN_CONFIG
    # a completed run's report.md is this command's to write, once, with the predictions
    # it draws (_conclude); the ServerApp writes any other run's
    extra_env = {LAUNCHER_WRITES_REPORT_ENV: "1"}
    if sim.metrics_port is not None:
        metrics_dir = out / "logs" / "prometheus"
        metrics_exporter.export_metrics(metrics_dir, sim.metrics_port, sim.metrics_host, extra_env)
        print(f"metrics: http://{sim.metrics_host}:{sim.metrics_port}/metrics")
    with simulation_superlink(out / "logs", extra_env, ray_address) as (env, port):
        where = "" if ray_address == ray_cluster.LOCAL else f", Ray cluster at {ray_address}"
        print(
            f"federation: {sim.sites} hospitals, {cfg.task}/{cfg.model}, {cfg.strategy}, "
            f"{cfg.num_server_rounds} rounds (simulation SuperLink on 127.0.0.1:{port}{where})"
        )
        with RoundView(sim.verbose) as view:
            ended = flwr_run(
                run_config,
                sites=sim.sites,
                cpus_per_site=sim.cpus_per_site,
                env=env,
                log_file=out / "logs" / "flower-run.log",
                on_line=view.line,
                ended=partial(completed, out),
                gone=partial(run_status.is_orphaned, out),
            )
        if ended:  # everything the run writes is written: Flower's and Ray's own shutdown
            processes.stop_started(grace=COMPLETED_GRACE)  # (~3 s after SIGTERM) gains nothing
    run_status.close(out, "failed", run_status.DIED)  # `flwr run` exits 0 even then
    code = _conclude(cfg, sim.found or find_sites(data), time.monotonic() - sim.started)
    if sim.metrics_port is not None and sim.metrics_linger > 0:
        print(f"serving final metrics for {sim.metrics_linger:.0f}s more")
        time.sleep(sim.metrics_linger)
    return code


@contextmanager
def simulation_superlink(
    logs: Path, extra_env: dict[str, str] | None = None, ray_address: str = ray_cluster.LOCAL
) -> Iterator[tuple[dict[str, str], int]]:
    """A SuperLink in simulation mode on a free port, with a private FLWR_HOME, whose
    runs put their hospitals on `ray_address` (from `ray_cluster.resolve`).

    Yields the environment for `flwr` commands (its connection is the default)
    and the port; the SuperLink and its workers are stopped by pid on exit.
    """
    home = Path(tempfile.mkdtemp(prefix="medfed-flwr-"))
    port = supervision.free_port()
    connection = {"address": f"127.0.0.1:{port}", "insecure": True}
    (home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}})
    )
    env = {**supervision.flower_env(home), **(extra_env or {})}
    env[ray_cluster.ADDRESS_ENV] = ray_address  # flwr-simulation's ray.init() reads it
    log_file = logs / "superlink.log"
    command = [
        supervision.executable("flower-superlink"), "--insecure", "--simulation",
        "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation", "--database", str(home / "state.db"),
    ]  # fmt: skip
    superlink = supervision.start(command, log_file, env)
    try:
        supervision.wait_until(
            supervision.http_healthy(port), superlink, 60, "flower-superlink", log_file
        )
        yield env, port
    finally:
        with processes.signals_ignored():  # a second Ctrl-C must not leave workers behind
            # the SuperLink, its SuperExec, flwr-simulation and Ray's workers at once: the
            # ServerApp ends by its own signal, not failing over a vanished SuperLink
            processes.stop_started()
            supervision.stop(superlink, grace=5.0)
            shutil.rmtree(home, ignore_errors=True)


def flwr_run(
    run_config: Path | str,
    *,
    sites: int,
    cpus_per_site: int,
    env: dict[str, str],
    log_file: Path,
    on_line: Callable[[str], None] = lambda line: None,
    ended: Callable[[str], bool] = lambda line: False,
    gone: Callable[[], bool] = lambda: False,
) -> bool:
    """`flwr run` this app and stream its log until the run ends, or until a line is
    `ended`: the ServerApp has written everything, and waiting for Flower to wind
    down its simulation (about 3 s) gains nothing; the caller stops it by pid.
    Returns whether it stopped at such a line. The stream also ends once `gone()`
    (checked every second): the ServerApp died, which Flower notices only about a
    minute later, streaming nothing meanwhile.

    `run_config` is a TOML file or a Flower `key=value ...` override string;
    `env` comes from `simulation_superlink` (its FLWR_HOME holds the app).
    """
    federation = (
        f"num-supernodes={sites} "
        f"client-resources-num-cpus={cpus_per_site} client-resources-num-gpus=0.0"
    )
    command = [
        supervision.executable("flwr"), "run", str(app_dir(Path(env["FLWR_HOME"]) / "app")),
        CONNECTION,
        "--run-config", str(run_config), "--federation-config", federation, "--stream",
    ]  # fmt: skip
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as log:
        flwr = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        watch = threading.Thread(target=_end_when, args=(gone, flwr), daemon=True)
        watch.start()
        try:
            assert flwr.stdout is not None
            code, stopped = 0, False
            for raw in flwr.stdout:
                line = _ANSI.sub("", raw)
                log.write(line)
                on_line(line)
                if stopped := ended(line):
                    break
            else:
                code = flwr.wait()
        finally:
            _end(flwr)  # on a stop, before the SuperLink it streams from
    if code != 0 and not gone():
        raise RuntimeError(f"`flwr run` exited with code {code}; see {log_file}")
    return stopped


def _end_when(gone: Callable[[], bool], flwr: subprocess.Popen) -> None:
    """End the `flwr run` stream once `gone()`, checked every second while it runs."""
    while flwr.poll() is None:
        if gone():
            _end(flwr)
            return
        time.sleep(1.0)


def completed(out: Path, line: str) -> bool:
    """Whether `line` is the ServerApp's last one and the run's record says it completed
    (a site's name that mimics the line ends nothing)."""
    if not run_ended(line):
        return False
    try:
        return json.loads((out / METRICS_JSON).read_text()).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def _end(process: subprocess.Popen) -> None:
    """Terminate a child of this command's own process group, then kill it after 2 s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=2)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _conclude(cfg: RunConfig, sites: SiteDeclarations, seconds: float) -> int:
    """The run's outcome in a line or two; a completed run's example predictions (on the
    first of its `sites`) and its report."""
    out = cfg.out_path
    metrics_path = out / METRICS_JSON
    if not metrics_path.exists():
        print(f"the run did not start; see {out / 'logs'}", file=sys.stderr)
        return 1
    result = json.loads(metrics_path.read_text())
    if result["status"] != "completed":
        reason = result.get("error", "the ServerApp stopped early; see logs/flower-run.log")
        print(f"run {result['status']}: {reason}", file=sys.stderr)
        if failed_start.nothing_completed(out):
            print(f"no round completed, so there is nothing to carry on: "
                  f"`medfed simulate --resume {out}` starts the run again with its own "
                  "settings", file=sys.stderr)  # fmt: skip
        return 1
    try:
        if cfg.task != "bundle":  # a bundle's own transforms and outputs are not medfed's
            from medfed.client.preview import save_predictions

            save_predictions(out, sites.folders[0])
    finally:  # the run's report, written once (the ServerApp leaves it to this command)
        report = write_report(out)
    last = result["rounds"][-1]["global"].get(_headline(cfg))
    shown = "hidden (every site below its floor)" if last is None else f"{last:.4f}"
    print(f"done in {seconds:.0f}s (the whole command): final global validation "
          f"{_headline(cfg)} {shown}")  # fmt: skip
    print(f"report: {report}")
    return 0


def _headline(cfg: RunConfig) -> str:
    from medfed.shared_models.tasks import TASKS

    return TASKS[cfg.task].headline_metric
